"""Your turn: fusing the softmax. Check with ``uv run python -m exercises fused-softmax``."""

import torch


def online_softmax(x: torch.Tensor) -> torch.Tensor:
    """The softmax of a 1-D tensor ``x`` (n,) of finite values, n >= 1; returns (n,), x's dtype.

    Find the two statistics in ONE pass over ``x``: a running maximum ``m`` and a running sum
    ``s`` of ``exp(x_j - m)`` over the values seen so far. When a new value raises the maximum,
    the sum so far was taken relative to the old one and must be brought to the new one. Then
    write ``exp(x_j - m) / s``. This is how a GPU kernel, and flash attention, handle a row that
    is read once, in pieces, with no room to keep it.
    """
    raise NotImplementedError


def softmax_backward(y: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """The backward pass of a softmax over the last dimension: ``dx`` (..., n) from the output
    ``y = softmax(x)`` (..., n) and the incoming gradient ``dy = dL/dy`` (..., n).

    Every output of a row depends on every input of that row, so ``dx_j`` is not ``y_j dy_j``
    alone (the chapter's "The math" derives it). It needs ``y`` and ``dy`` only, never ``x``.
    """
    raise NotImplementedError


def causal_softmax(scores: torch.Tensor, scale: float) -> torch.Tensor:
    """The fused kernel's job: ``softmax(scale * scores)`` over each row of ``scores`` (..., T, T),
    where row ``i`` sees columns ``0..i`` and the columns ``j > i`` come out exactly 0.

    Returns (..., T, T), the dtype of ``scores``. As the kernel does, treat each row as its
    visible prefix, ``scores[..., i, : i + 1]``: the rest of the row is never read.
    """
    raise NotImplementedError
