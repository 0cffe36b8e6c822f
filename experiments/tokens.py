"""Break it, chapter "Text to tokens": train BPE without its split pattern; decode token by token.

Neither experiment trains a model: both look at the tokenizer alone, trained on the default corpus.
"""

import re

import numpy as np

from benchmarks.harness import markdown_table
from src.data import load_corpus, train_tokenizer_cached
from src.files import cache_dir
from src.tokenizer import BPETokenizer

# --8<-- [start:no-pretokenizer]
WHOLE_LINES = r"[^\n]+|\n"  # the "split pattern" that splits nothing but lines


def train_without_split(text: str, vocab_size: int) -> BPETokenizer:
    """BPE on whole lines: merges may now cross the spaces between words."""
    return BPETokenizer.train(text, vocab_size, pattern=WHOLE_LINES)


# --8<-- [end:no-pretokenizer]


def no_pretokenizer(vocab_size: int = 2048) -> str:
    """BPE trained with and without the split pattern: without it, merges glue words together."""
    text = load_corpus().text
    rows = []
    for label, tokenizer in (
        ("GPT-2 split pattern", BPETokenizer.train(text, vocab_size)),
        ("no split (whole lines)", train_without_split(text, vocab_size)),
    ):
        by_rank = sorted(tokenizer.mergeable_ranks, key=tokenizer.mergeable_ranks.get)
        # A token that holds a space between two visible characters spans a word boundary.
        spanning = [t for t in by_rank if re.search(rb"\S \S", t)]
        shown = ", ".join(repr(t.decode("utf-8", "replace")) for t in spanning[:5]) or "none"
        compression = len(text.encode()) / len(tokenizer.encode(text))
        rows.append([label, f"{compression:.2f}", str(len(spanning)), shown])
    header = ["", "bytes per token", "tokens spanning words", "first learned of them"]
    return markdown_table(header, rows)


# --8<-- [start:per-token-decoding]
def decode_one_by_one(tokenizer: BPETokenizer, ids: list[int]) -> list[str]:
    """Each token's bytes decoded alone, as a naive streaming printer would."""
    return [tokenizer.decode([i]) for i in ids]


# --8<-- [end:per-token-decoding]

TEXTS = ("It’s “quoted” — done…", "Café, naïve, résumé, Zürich", "東京で寿司を食べた", "Ship it 🚀")


def per_token_decoding(vocab_size: int = 1024) -> str:
    """Decode every token on its own and join the texts, instead of decoding the joined bytes."""
    tokenizer = train_tokenizer_cached(load_corpus(), vocab_size, cache_dir())
    token_bytes = {rank: token for token, rank in tokenizer.mergeable_ranks.items()}
    rows = []
    for text in TEXTS:
        ids = tokenizer.encode(text)
        pieces = decode_one_by_one(tokenizer, ids)
        # A character is corrupted when a token boundary falls inside its bytes.
        cuts = set(np.cumsum([len(token_bytes[i]) for i in ids]).tolist())
        ends = np.cumsum([len(ch.encode()) for ch in text]).tolist()
        starts = [0] + ends[:-1]
        corrupted = sum(any(s < c < e for c in cuts) for s, e in zip(starts, ends, strict=True))
        rows.append([
            f"`{text}`",
            str(len(ids)),
            str(sum("\ufffd" in piece for piece in pieces)),
            f"{corrupted} of {len(text)} ({corrupted / len(text):.0%})",
            f"`{''.join(pieces)}`",
            "exact" if tokenizer.decode(ids) == text else "differs",
        ])  # fmt: skip
    header = ["text", "tokens", "tokens that are not valid UTF-8 alone", "characters corrupted",
              "decoded token by token", "joined bytes, decoded once"]  # fmt: skip
    return markdown_table(header, rows)


EXPERIMENTS = {"no-pretokenizer": no_pretokenizer, "per-token-decoding": per_token_decoding}
