"""Your turn: the GPT model. Check with ``uv run python -m exercises model``."""

import torch


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5
) -> torch.Tensor:
    """LayerNorm over the last dimension: x (..., d), weight and bias (d,); returns (..., d).

    Each vector is shifted to mean 0 and divided by ``sqrt(var + eps)``, where ``var`` is the
    *biased* variance, the mean of the squared deviations (divide by d, as GPT-2 and
    ``nn.LayerNorm`` do); then it is scaled by ``weight`` and shifted by ``bias``.
    """
    raise NotImplementedError


def gelu(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation GPT-2 was trained with, elementwise, any shape:
    ``0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))``. Its weights expect exactly this form."""
    raise NotImplementedError


def embed(
    ids: torch.Tensor, tok_emb: torch.Tensor, pos_emb: torch.Tensor, start: int = 0
) -> torch.Tensor:
    """The model's input: token embeddings plus position embeddings, (B, T, d).

    ``ids`` (B, T) int64; ``tok_emb`` (vocab_size, d), one row per token id; ``pos_emb``
    (context_length, d), one row per position. The tokens of ``ids`` sit at the positions
    ``start .. start + T - 1``: ``start`` is 0 for a whole sequence, and the number of tokens
    already cached when generation feeds new tokens one at a time.
    """
    raise NotImplementedError
