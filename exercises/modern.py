"""Your turn: from GPT-2 to a modern LLM. Check with ``uv run python -m exercises modern``."""

import torch


def rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dimension: x (..., d), scale (d,); returns (..., d).

    Each vector is divided by its root mean square, ``sqrt(mean(x ** 2) + eps)`` (the mean over
    the d numbers, eps inside the root), then multiplied by ``scale``. No mean is subtracted and
    nothing is added.
    """
    raise NotImplementedError


def apply_rope(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding, half-split, as Hugging Face's Llama and Qwen apply it.

    ``x`` (..., T, hd) holds one query or key per position; ``positions`` (T,) int64 their
    positions. Dimension ``i`` and dimension ``i + hd/2`` form pair ``i`` (i = 0 .. hd/2 - 1), and
    at position ``m`` the pair turns by the angle ``m * theta ** (-2 i / hd)``:
    ``(a, b) -> (a cos - b sin, a sin + b cos)``. Returns the rotated x, same shape.
    """
    raise NotImplementedError


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal grouped-query attention: q (B, H, T, hd); k and v (B, KV, T, hd), H a multiple of KV.

    Query heads come in KV groups of G = H / KV consecutive heads, and query head ``h`` attends
    with key/value head ``h // G``. Otherwise it is causal attention as in the attention chapter:
    ``softmax(q k^T / sqrt(hd))`` with the future masked, times v. Returns (B, H, T, hd).
    """
    raise NotImplementedError
