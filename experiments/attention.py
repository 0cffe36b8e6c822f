"""Break it, chapter "Attention": remove the causal mask; remove the 1/sqrt(d) scale.

The first trains the tiny model without its mask; the second needs no training, only random queries
and keys as at initialisation.
"""

import contextlib
import math
from unittest.mock import patch

import torch

from benchmarks.harness import markdown_table
from experiments.harness import TINY, corpus_windows, evaluate, fmt, pretrain
from src.model import GPTModel


# --8<-- [start:no-causal-mask]
def hide_nothing(T: int, device=None, start: int = 0) -> torch.Tensor:
    """A causal mask that hides nothing: every position sees every other, the future too."""
    return torch.zeros(T, start + T, dtype=torch.bool, device=device)


def no_causal_mask(steps: int = 300, lr: float = 3e-3) -> str:
    """Train without the causal mask: each position sees the token it must predict."""
    train_set, val_set = corpus_windows()
    rows = []
    for label, causal in (("with the mask", True), ("mask removed", False)):
        torch.manual_seed(0)
        model = GPTModel(TINY)
        # Every layer builds its mask by calling causal_mask: replace it while the model trains.
        with contextlib.nullcontext() if causal else patch("src.attention.causal_mask", hide_nothing):
            losses = pretrain(model, train_set, steps, lr)
        # Evaluated with the mask: generation only ever has the past.
        rows.append([label, fmt(sum(losses[-20:]) / 20), fmt(evaluate(model, val_set))])
    header = ["", "train loss (as trained)", "validation loss (causal, as in generation)"]
    return markdown_table(header, rows)


# --8<-- [end:no-causal-mask]


# --8<-- [start:no-scale]
def attention_scores(q: torch.Tensor, k: torch.Tensor, scaled: bool) -> torch.Tensor:
    """q k^T / sqrt(d), or without the division: scores whose spread grows like sqrt(d)."""
    scale = 1 / math.sqrt(q.shape[-1]) if scaled else 1.0
    return q @ k.transpose(-2, -1) * scale  # (N, T, T), no mask


# --8<-- [end:no-scale]


def no_scale(T: int = 64, head_dims: tuple[int, ...] = (16, 64, 256)) -> str:
    """Attention weights at initialisation with and without the 1/sqrt(d) scale."""
    torch.manual_seed(0)
    rows = []
    for d in head_dims:
        q, k = torch.randn(256, T, d), torch.randn(256, T, d)  # unit variance, as at initialisation
        for label, scaled in (("1/sqrt(d)", True), ("none", False)):
            scores = attention_scores(q, k, scaled).requires_grad_()
            weights = torch.softmax(scores, dim=-1)
            entropy = -(weights * weights.clamp_min(1e-30).log()).sum(-1).mean()
            (weights * torch.randn_like(weights)).sum().backward()  # a random upstream gradient
            rows.append([
                str(d),
                label,
                f"{weights.max(-1).values.mean():.2f}",
                f"{entropy:.2f} of {math.log(T):.2f}",
                f"{scores.grad.norm(dim=-1).mean():.4f}",
            ])  # fmt: skip
    header = ["head_dim", "scale", "mean largest weight", "entropy (nats)", "gradient norm per row"]
    return markdown_table(header, rows)


EXPERIMENTS = {"no-causal-mask": no_causal_mask, "no-scale": no_scale}
