"""Batches of tokens: the answers, and the cases each one is checked on.

References: ``windows`` and ``batch_at`` against the book's ``GPTDataset`` (its ``__getitem__`` and
``batch``, which cut one window at a time), ``step_batch`` against ``src.data.step_batch`` itself.
"""

import torch

from exercises.checker import Case, Exercise
from src import data


# --8<-- [start:windows]
def windows(
    tokens: torch.Tensor, context_length: int, stride: int
) -> tuple[torch.Tensor, torch.Tensor]:
    # unfold cuts every slice of T + 1 tokens that starts at a multiple of stride and fits whole
    cut = tokens.unfold(0, context_length + 1, stride)  # (N, T + 1)
    return cut[:, :-1], cut[:, 1:]  # the targets are the inputs moved one position on


# --8<-- [end:windows]


# --8<-- [start:batch_at]
def batch_at(
    tokens: torch.Tensor, starts: torch.Tensor, context_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    offsets = torch.arange(context_length + 1)  # (T + 1,)
    cut = tokens[starts[:, None] + offsets]  # (B, T + 1): row b is tokens[starts[b] + j]
    return cut[:, :-1], cut[:, 1:]


# --8<-- [end:batch_at]


# --8<-- [start:step_batch]
def step_batch(step: int, n: int, batch_size: int, seed: int) -> torch.Tensor:
    steps_per_epoch = n // batch_size  # whole batches only
    epoch, k = divmod(step, steps_per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return order[k * batch_size : (k + 1) * batch_size]


# --8<-- [end:step_batch]


def _dataset_windows(tokens, context_length, stride):
    dataset = data.GPTDataset(tokens.numpy(), context_length, stride)
    return dataset.batch(torch.arange(len(dataset)))


def _dataset_batch(tokens, starts, context_length):
    return data.GPTDataset(tokens.numpy(), context_length, stride=1).batch(starts)


def _ids(g, n, vocab=1000):
    return torch.randint(0, vocab, (n,), generator=g)


def _windows_cases(g):
    return [
        Case("ten tokens 0..9, T = 4, stride 4: two windows; each target is its input + 1",
             (torch.arange(10), 4, 4)),
        Case("13 tokens, T = 4, stride 4: three windows, the last one ends on the last token",
             (torch.arange(13), 4, 4)),
        Case("exactly T + 1 tokens: one window", (torch.arange(6), 5, 5)),
        Case("stride 1: windows overlap in all but one token", (torch.arange(8), 3, 1)),
        Case("stride 5 > T = 2: the tokens between windows are never inputs", (torch.arange(16), 2, 5)),
        Case("random ids", (_ids(g, 300), 16, 16)),
        Case("random ids, a stride that does not divide the length", (_ids(g, 301), 32, 7)),
    ]  # fmt: skip


def _batch_at_cases(g):
    return [
        Case("tokens 0..19 (every id is its position): the last target is the token after the "
             "window, not its first", (torch.arange(20), torch.tensor([0, 7]), 4)),
        Case("a window that ends on the last token of the stream",
             (torch.arange(100, 110), torch.tensor([5]), 4)),
        Case("the same start twice, and starts out of order", (torch.arange(30), torch.tensor([9, 2, 9]), 3)),
        Case("random ids, random starts", (_ids(g, 500), torch.randint(0, 500 - 33, (8,), generator=g), 32)),
    ]  # fmt: skip


def _step_batch_cases(g):
    return [
        Case("step 0: the first batch_size numbers of epoch 0's order", (0, 10, 4, 0)),
        Case("n = 10, batch 4: an epoch has 2 steps (2 examples are dropped), so step 2 begins "
             "epoch 1", (2, 10, 4, 0)),
        Case("step 5 with 2 steps per epoch: the second batch of epoch 2", (5, 10, 4, 7)),
        Case("one batch per epoch: every step is a new permutation of all", (3, 6, 6, 1)),
        Case("a large seed", (11, 50, 8, 12345)),
    ]  # fmt: skip


EXERCISES = [
    Exercise(
        "windows", "every (input, target) window of a token stream, stacked to (N, T)",
        reference=_dataset_windows, cases=_windows_cases,
        hint="a window needs T + 1 tokens, so the last one starts at most at n - T - 1, and that "
        "one counts too; the targets are the inputs' positions plus one, not a copy of the inputs",
    ),
    Exercise(
        "batch_at", "the (B, T) inputs and targets of windows starting at given offsets",
        reference=_dataset_batch, cases=_batch_at_cases,
        hint="index the tokens with starts[:, None] + torch.arange(T + 1) and cut that (B, T + 1) "
        "block in two; rolling the inputs by one puts a window's own first token at its end",
    ),
    Exercise(
        "step_batch", "the example numbers of a step's batch: a function of the step alone",
        reference=data.step_batch, cases=_step_batch_cases,
        hint="an epoch has n // batch_size steps (round down: the partial batch is dropped); "
        "epoch, k = divmod(step, steps_per_epoch); draw the order with the epoch in the seed",
    ),
]  # fmt: skip
