"""Your turn: fusing the whole attention. Check with ``uv run python -m exercises flash-attention``."""

import torch


def visited_tiles(T: int, tile: int) -> list[tuple[int, int]]:
    """The (query tile, key tile) pairs a causal flash forward computes, for a sequence of ``T``
    positions cut into tiles of ``tile`` (the last tile may be shorter), in the order the kernel
    visits them: query tile by query tile, and within one, key tile by key tile.

    A pair is visited when at least one of its scores is visible (key position <= query position);
    every other pair is skipped whole.
    """
    raise NotImplementedError


def flash_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, tile: int):
    """Causal attention of one head, ``q``, ``k``, ``v`` (T, hd), by tiles of ``tile`` keys and an
    online softmax: returns ``(out, lse)``, ``out`` (T, hd) and ``lse`` (T,), the log-sum-exp of
    each row's visible scaled scores, which is all the backward will need.

    Keep, for each query row, a running maximum ``m``, a running sum ``l`` and an unnormalised
    output ``o``; visit key tiles one at a time and never build the whole (T, T) matrix. When a
    tile raises a row's maximum, everything accumulated so far was relative to the old one.
    """
    raise NotImplementedError


def flash_backward(q, k, v, out, lse, dout, scale: float):
    """The gradients ``(dq, dk, dv)``, each (T, hd), of causal attention of one head, from the
    forward's inputs, its output ``out`` (T, hd) and log-sum-exp ``lse`` (T,), and the incoming
    gradient ``dout`` (T, hd).

    Recompute the probabilities from ``lse`` rather than from a saved softmax: ``P = exp(scale *
    q k^T - lse)`` on the visible scores, 0 elsewhere. The softmax's backward needs one number per
    row; FlashAttention-2 computes it from ``dout`` and ``out`` alone.
    """
    raise NotImplementedError
