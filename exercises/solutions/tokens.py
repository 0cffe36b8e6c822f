"""Text to tokens: the answers, and the cases each one is checked on.

References: ``merge`` against the tokenizer's own ``_merge``, ``encode_word`` against the tokenizer's
``_bpe`` (which is itself tested equal to tiktoken), ``most_frequent_pair`` against a brute-force
count written for the purpose.
"""

from collections import Counter
from itertools import pairwise

import torch

from exercises.checker import Case, Exercise
from src.tokenizer import BPETokenizer, _merge


# --8<-- [start:merge]
def merge(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    out, i = [], 0
    while i < len(ids):
        if tuple(ids[i : i + 2]) == pair:  # the pair starts here: take both, emit one
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


# --8<-- [end:merge]


# --8<-- [start:most_frequent_pair]
def most_frequent_pair(ids: list[int]) -> tuple[int, int] | None:
    counts = Counter(pairwise(ids))
    if not counts:
        return None
    return min(counts, key=lambda pair: (-counts[pair], pair))  # most often, then smallest


# --8<-- [end:most_frequent_pair]


# --8<-- [start:encode_word]
def encode_word(word: bytes, ranks: dict[bytes, int]) -> list[int]:
    parts = [word[i : i + 1] for i in range(len(word))]
    while len(parts) > 1:
        candidates = [(ranks.get(a + b), i) for i, (a, b) in enumerate(pairwise(parts))]
        known = [(rank, i) for rank, i in candidates if rank is not None]
        if not known:
            break
        _, i = min(known)  # the lowest rank; among equal ranks, the leftmost pair
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return [ranks[p] for p in parts]


# --8<-- [end:encode_word]


def _count_pairs_by_hand(ids: list[int]) -> tuple[int, int] | None:
    """Brute force: count every distinct pair by scanning, keep the best by (count, smallest)."""
    best, best_count = None, 0
    for pair in sorted({(ids[i], ids[i + 1]) for i in range(len(ids) - 1)}):
        n = sum(1 for i in range(len(ids) - 1) if (ids[i], ids[i + 1]) == pair)
        if n > best_count:
            best, best_count = pair, n
    return best


def _random_ids(g: torch.Generator, n: int, vocab: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=g).tolist()


def _merge_cases(g):
    return [
        Case("a pair in the middle", ([5, 1, 2, 7], (1, 2), 9)),
        Case(
            "overlapping: the pair (1, 1) in 1 1 1 merges once, from the left",
            ([1, 1, 1], (1, 1), 9),
        ),
        Case("every occurrence, back to back", ([1, 2, 1, 2, 1, 2], (1, 2), 9)),
        Case("the reversed pair is another pair", ([1, 2, 1, 2], (2, 1), 9)),
        Case("the pair at the very end", ([3, 4, 1, 2], (1, 2), 9)),
        Case("no occurrence", ([1, 3, 2, 1], (1, 2), 9)),
        Case("an empty list", ([], (1, 2), 9)),
        *(Case(f"random ids {k}", (_random_ids(g, 50, 4), (1, 1), 99)) for k in range(3)),
    ]


_TRAINED = BPETokenizer.train("the theme of the thesis: then they thought it through. " * 20, 300)


def _encode_cases(g):
    ranks = _TRAINED.mergeable_ranks
    words = [b"the", b" the", b" thought", b"thesis", b"x", b"", b"\xf0\x9f\x99\x82", b" through."]
    return [Case(f"the word {w!r}", (w, ranks)) for w in words]


EXERCISES = [
    Exercise(
        "merge", "replace every occurrence of a pair of ids by a new id, left to right, no overlaps",
        reference=_merge, cases=_merge_cases,
        hint="scan left to right; after a match, skip past both ids, so 1 1 1 with (1, 1) is 9 1",
    ),
    Exercise(
        "most_frequent_pair", "the adjacent pair that occurs most often (ties: the smallest pair)",
        reference=_count_pairs_by_hand,
        cases=lambda g: [
            Case("one clear winner", ([1, 2, 3, 1, 2, 4, 1, 2],)),
            Case("a tie between (1, 2) and (2, 3): the smaller pair wins", ([1, 2, 3, 1, 2, 3],)),
            Case("a tie where the larger pair comes first", ([3, 4, 1, 2, 3, 4, 1, 2],)),
            Case("overlapping pairs count: 5 5 5 holds (5, 5) twice", ([5, 5, 5, 1, 2],)),
            Case("a single id has no pair", ([7],)),
            Case("no ids", ([],)),
            *(Case(f"random ids {k}", (_random_ids(g, 200, 6),)) for k in range(3)),
        ],
        hint="count every adjacent position (overlaps included); on a tie return the smallest "
        "pair, as a tuple; with fewer than two ids return None",
    ),
    Exercise(
        "encode_word", "encode one pre-token: merge the lowest-ranked known pair until none is left",
        reference=lambda word, ranks: BPETokenizer(ranks)._bpe(word),
        cases=_encode_cases,
        hint="start from single bytes; each round merge the adjacent pair whose joined bytes have "
        "the LOWEST rank (learned first), the leftmost among equals; stop when no pair is known",
    ),
]  # fmt: skip
