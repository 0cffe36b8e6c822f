"""Typical wrong answers to the tokens chapter's exercises: the checker must catch every one."""

from collections import Counter


def merge(ids, pair, new_id):
    # Overlapping matches: 1 1 1 with (1, 1) becomes 9 9 instead of 9 1.
    out = list(ids)
    for i in range(len(ids) - 1):
        if (ids[i], ids[i + 1]) == pair:
            out[i : i + 2] = [new_id, new_id]
    return out


def most_frequent_pair(ids):
    # Ties broken by first occurrence instead of by the smallest pair.
    counts = Counter(zip(ids, ids[1:], strict=False))
    return max(counts, key=counts.get) if counts else None


def encode_word(word, ranks):
    # Greedy left to right: joins the first known pair instead of the lowest-ranked one.
    parts = [bytes([b]) for b in word]
    i = 0
    while i < len(parts) - 1:
        if parts[i] + parts[i + 1] in ranks:
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        else:
            i += 1
    return [ranks[p] for p in parts]
