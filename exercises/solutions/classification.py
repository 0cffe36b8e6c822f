"""Finetuning for classification: the answers, and the cases each one is checked on.

References: the project's own ``src.classify.collate``, ``last_token_logits`` and
``confusion_matrix``, which the chapter explains and its tests check against running each text alone.
"""

import torch

from exercises.checker import Case, Exercise
from src import classify


# --8<-- [start:pad_batch]
def pad_batch(
    batch: list[tuple[list[int], int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(ids) for ids, _ in batch])  # (B,)
    ids = torch.full((len(batch), int(lengths.max())), pad_id)  # (B, T), all padding at first
    for row, (tokens, _) in enumerate(batch):
        ids[row, : len(tokens)] = torch.tensor(tokens)  # the text from position 0, pads after it
    return ids, lengths, torch.tensor([label for _, label in batch])


# --8<-- [end:pad_batch]


# --8<-- [start:last_token_logits]
def last_token_logits(logits: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    rows = torch.arange(logits.shape[0])  # (B,)
    return logits[rows, lengths - 1]  # (B, C): row b at position lengths[b] - 1


# --8<-- [end:last_token_logits]


# --8<-- [start:confusion_matrix]
def confusion_matrix(
    predicted: torch.Tensor, true: torch.Tensor, num_classes: int
) -> list[list[int]]:
    matrix = [[0] * num_classes for _ in range(num_classes)]
    for t, p in zip(true.tolist(), predicted.tolist(), strict=True):
        matrix[t][p] += 1  # row: what it is; column: what the model said
    return matrix


# --8<-- [end:confusion_matrix]


def _texts(g, n, vocab=100):
    lengths = torch.randint(1, 12, (n,), generator=g).tolist()
    return [(torch.randint(0, vocab, (k,), generator=g).tolist(), k % 2) for k in lengths]


def _pad_cases(g):
    return [
        Case("two texts of 3 and 1 tokens: the pads go on the right, after the text",
             ([([5, 6, 7], 1), ([8], 0)], 0)),
        Case("the pad id is not 0: GPT-2 pads with end-of-text, 50256", ([([1, 2], 0), ([3, 4, 5, 6], 1)], 50256)),
        Case("texts of equal length: no padding", ([([1, 2], 0), ([3, 4], 1)], 0)),
        Case("one text", ([([9, 9, 9], 1)], 0)),
        Case("random texts", (_texts(g, 6), 0)),
    ]  # fmt: skip


def _last_token_cases(g):
    return [
        Case("right-padded rows of 2, 4 and 1 tokens: the last real token is at length - 1, not "
             "at the end of the row", (torch.arange(24.0).view(3, 4, 2), torch.tensor([2, 4, 1]))),
        Case("every row full", (torch.randn(2, 3, 2, generator=g), torch.tensor([3, 3]))),
        Case("random", (torch.randn(5, 9, 3, generator=g), torch.randint(1, 10, (5,), generator=g))),
    ]  # fmt: skip


def _confusion_cases(g):
    return [
        Case("rows are the truth: one spam (1) predicted as ham (0) goes to matrix[1][0]",
             (torch.tensor([0, 0, 1, 0]), torch.tensor([0, 1, 1, 0]), 2)),
        Case("a class that never occurs still has its row and column",
             (torch.tensor([0, 1, 0]), torch.tensor([1, 1, 0]), 3)),
        Case("all wrong", (torch.tensor([1, 0, 1]), torch.tensor([0, 1, 0]), 2)),
        Case("random, four classes", (torch.randint(0, 4, (50,), generator=g), torch.randint(0, 4, (50,), generator=g), 4)),
    ]  # fmt: skip


EXERCISES = [
    Exercise(
        "pad_batch", "pad a batch of texts on the right; their lengths and labels",
        reference=classify.collate, cases=_pad_cases,
        hint="the row is as long as the batch's longest text; text first, from position 0, then "
        "pad_id; padding on the left moves every text's last token to the end of the row and its "
        "first tokens to positions it never had",
    ),
    Exercise(
        "last_token_logits", "each row's logits at its last real token, (B, T, C) -> (B, C)",
        reference=classify.last_token_logits, cases=_last_token_cases,
        hint="index two dimensions at once: logits[torch.arange(B), lengths - 1]; logits[:, -1] "
        "reads a padding position whenever a text is shorter than the row",
    ),
    Exercise(
        "confusion_matrix", "matrix[true][predicted]: how many of each class went where",
        reference=classify.confusion_matrix, cases=_confusion_cases,
        hint="rows are the true class and columns the prediction (matrix[t][p]), not the other "
        "way round; make it num_classes x num_classes whatever classes the data holds",
    ),
]  # fmt: skip
