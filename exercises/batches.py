"""Your turn: batches of tokens. Check with ``uv run python -m exercises batches``."""

import torch


def windows(
    tokens: torch.Tensor, context_length: int, stride: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every training window of a token stream, stacked: (inputs, targets), each (N, T).

    ``tokens`` is (n,) int64 with n >= T + 1, T = ``context_length``. Window ``i`` starts at
    ``i * stride``: its inputs are ``tokens[start : start + T]`` and its targets the same positions
    shifted by one, ``tokens[start + 1 : start + T + 1]``. Take every window whose targets fit in
    the stream: ``GPTDataset`` has exactly these windows.
    """
    raise NotImplementedError


def batch_at(
    tokens: torch.Tensor, starts: torch.Tensor, context_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (inputs, targets) of the windows that start at ``starts``, each (B, T).

    ``tokens`` is (n,) int64, ``starts`` is (B,) int64 with ``start + T + 1 <= n``. Row ``b`` holds
    ``tokens[starts[b] : starts[b] + T]`` and, as targets, the T tokens one position later. This is
    how a run draws windows at random offsets from a corpus too large to cut into windows first;
    gather them with one index tensor, without a Python loop over the rows.
    """
    raise NotImplementedError


def step_batch(step: int, n: int, batch_size: int, seed: int) -> torch.Tensor:
    """The example numbers of optimizer step ``step``'s batch, (batch_size,) int64, out of ``n``.

    The project's one batching rule: an epoch has ``n // batch_size`` steps (the last partial batch
    of an epoch is dropped). Epoch ``e`` visits the examples in the order
    ``torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + e))``, and the
    ``k``-th step of the epoch takes the ``k``-th slice of ``batch_size`` numbers of that order.
    The batch of a step then depends on the step alone: a resumed run needs nothing but the step.
    """
    raise NotImplementedError
