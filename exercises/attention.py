"""Your turn: attention. Check with ``uv run python -m exercises attention``."""

import torch


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal self-attention of queries, keys and values of shape (B, T, d); returns (B, T, d).

    Output row ``i`` is the average of the value rows ``0..i``, weighted by
    ``softmax(q k^T / sqrt(d))`` with the future positions (``j > i``) masked out.
    """
    raise NotImplementedError


def split_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(B, T, d) -> (B, n_heads, T, d / n_heads): head ``h`` holds the columns
    ``h * d / n_heads`` up to ``(h + 1) * d / n_heads`` of every position."""
    raise NotImplementedError


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, T, hd) -> (B, T, H * hd): the heads side by side again, the inverse of split_heads."""
    raise NotImplementedError
