"""Your turn: pretraining. Check with ``uv run python -m exercises pretraining``."""

import torch


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The mean negative log-likelihood of the targets: ``logits`` (N, V), ``targets`` (N,) int64
    with values in 0..V-1; returns a 0-d tensor.

    Write the log-softmax yourself, in a numerically stable way: logits of 1000 must work in
    float32, where ``exp(1000)`` is inf. (Not ``F.cross_entropy`` or ``F.log_softmax``: those are
    what the checker compares with.)
    """
    raise NotImplementedError


def lr_at(step: int, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based), as ``src.training.Schedule`` sets it.

    Warmup: step ``s < warmup_steps`` gets ``lr * (s + 1) / warmup_steps``, so the first step
    already moves and the last warmup step reaches ``lr``. Then a half cosine from ``lr`` at
    ``warmup_steps`` down to ``min_lr`` at ``max_steps``, with progress
    ``(s - warmup_steps) / (max_steps - warmup_steps)``; from ``max_steps`` on, ``min_lr``.
    """
    raise NotImplementedError


def clip_grad_norm(grads: tuple[torch.Tensor, ...], max_norm: float) -> tuple[torch.Tensor, ...]:
    """``grads`` (a tuple of tensors, any shapes) after clipping their *total* norm to ``max_norm``;
    returns a tuple of the same shapes.

    The total norm is the 2-norm of all gradients together, as if they were one long vector. If
    it exceeds ``max_norm``, every gradient is multiplied by the same factor
    ``max_norm / (norm + 1e-6)`` (PyTorch's small constant); otherwise they stay as they are. One
    factor for all keeps the update's direction and only shortens it.
    """
    raise NotImplementedError
