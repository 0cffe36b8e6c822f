"""Your turn: scaling out. Check with ``uv run python -m exercises scaling-out``."""

import torch


def shard(batch: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Process ``rank``'s share of the global batch, as the trainer takes it.

    ``batch`` is (B, ...) (example numbers, or windows of tokens), with B divisible by
    ``world_size``. Every process computes the same global batch from the step number; rank
    ``r`` keeps the ``r``-th of ``world_size`` consecutive blocks of B / world_size examples, so
    that together the processes see each example exactly once. Returns (B / world_size, ...).
    """
    raise NotImplementedError


def average_gradients(
    per_replica: tuple[tuple[torch.Tensor, ...], ...],
) -> tuple[torch.Tensor, ...]:
    """What the all-reduce of data parallelism leaves on every replica.

    ``per_replica[w][i]`` is replica ``w``'s gradient of parameter ``i`` (W replicas, each with
    the same parameters, the same shapes). Return one tensor per parameter: the mean of its
    gradients over the replicas. Each replica computed the mean loss of its own share, so this
    mean is the gradient of the mean loss of the whole batch.
    """
    raise NotImplementedError


def accumulated_gradient(
    weight: torch.Tensor, x: torch.Tensor, y: torch.Tensor, n_micro: int
) -> torch.Tensor:
    """The gradient of a batch's mean loss, computed ``n_micro`` micro-batches at a time.

    The model is one matrix: ``logits = x @ weight`` with ``weight`` (d, C), ``x`` (N, d), and the
    loss is ``F.cross_entropy(logits, y)`` for ``y`` (N,) int64, the mean over the examples. Cut
    the batch into ``n_micro`` equal consecutive micro-batches (N is divisible by it), run a
    backward pass for each, and let the gradients add up in ``weight.grad``, as gradient
    accumulation does when the whole batch does not fit in memory. Return that gradient, (d, C):
    it must equal the gradient of the whole batch's mean loss.
    """
    raise NotImplementedError
