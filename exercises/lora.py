"""Your turn: LoRA. Check with ``uv run python -m exercises lora``."""

import torch


def lora_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    alpha: float,
) -> torch.Tensor:
    """A frozen linear layer plus its low-rank update, as ``LoRALinear`` computes it.

    ``x`` (..., in); ``weight`` (out, in) and ``bias`` (out,), the frozen layer; ``A`` (rank, in)
    and ``B`` (out, rank), the trained matrices. Returns (..., out):
    ``x W^T + b + (alpha / rank) (x A^T) B^T``, without ever forming the (out, in) product B A.
    """
    raise NotImplementedError


def merge_lora_weight(
    weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, alpha: float
) -> torch.Tensor:
    """The weight (out, in) of a plain linear layer that computes what the LoRA layer computes:
    the frozen ``weight`` (out, in) with the update ``(alpha / rank) B A`` folded in. ``A`` is
    (rank, in), ``B`` (out, rank). After merging, inference costs what the base model costs."""
    raise NotImplementedError


def lora_parameter_count(emb_dim: int, n_layers: int, rank: int, targets: tuple[str, ...]) -> int:
    """The numbers an adapter trains when every block of a GPT (width ``emb_dim``, ``n_layers``
    blocks) has the Linear layers named in ``targets`` wrapped at ``rank``.

    The names are those of a block's six Linear layers: ``W_query``, ``W_key``, ``W_value`` and
    ``out_proj`` (emb_dim -> emb_dim), ``fc`` (emb_dim -> 4 emb_dim) and ``proj``
    (4 emb_dim -> emb_dim). A wrapped layer trains A (rank, in) and B (out, rank).
    """
    raise NotImplementedError
