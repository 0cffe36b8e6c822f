"""LoRA: the answers, and the cases each one is checked on.

References: the project's ``src.lora.LoRALinear`` (its forward, and its ``merge``) in float64, and
``src.lora.lora_parameter_count`` on a GPT built on the meta device and wrapped by ``apply_lora``.
"""

import torch
from torch import nn

from exercises.checker import Case, Exercise
from src import lora
from src.model import GPTConfig, GPTModel


# --8<-- [start:lora_forward]
def lora_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    alpha: float,
) -> torch.Tensor:
    rank = A.shape[0]
    frozen = x @ weight.T + bias  # (..., out)
    update = (x @ A.T) @ B.T  # (..., rank), then (..., out): two thin products
    return frozen + (alpha / rank) * update


# --8<-- [end:lora_forward]


# --8<-- [start:merge_lora_weight]
def merge_lora_weight(
    weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, alpha: float
) -> torch.Tensor:
    rank = A.shape[0]
    return weight + (alpha / rank) * (B @ A)  # (out, rank) @ (rank, in) = (out, in), like weight


# --8<-- [end:merge_lora_weight]


# --8<-- [start:lora_parameter_count]
# (in, out) of each Linear layer of a block, in units of emb_dim
LAYERS = {
    "W_query": (1, 1),
    "W_key": (1, 1),
    "W_value": (1, 1),
    "out_proj": (1, 1),
    "fc": (1, 4),
    "proj": (4, 1),
}


def lora_parameter_count(emb_dim: int, n_layers: int, rank: int, targets: tuple[str, ...]) -> int:
    per_block = 0
    for name in targets:
        d_in, d_out = (emb_dim * n for n in LAYERS[name])
        per_block += rank * d_in + d_out * rank  # A (rank, in) and B (out, rank)
    return n_layers * per_block


# --8<-- [end:lora_parameter_count]


def _lora_layer(weight, bias, A, B, alpha):
    base = nn.Linear(weight.shape[1], weight.shape[0], dtype=torch.float64)
    layer = lora.LoRALinear(base, A.shape[0], alpha)
    with torch.no_grad():
        for param, value in (
            (base.weight, weight),
            (base.bias, bias),
            (layer.lora_A, A),
            (layer.lora_B, B),
        ):
            param.data = value.double()  # fmt: skip
    return layer


@torch.no_grad()
def _forward_by_src(x, weight, bias, A, B, alpha):
    return _lora_layer(weight, bias, A, B, alpha)(x.double()).to(x.dtype)


def _merge_by_src(weight, A, B, alpha):
    layer = _lora_layer(weight, torch.zeros(weight.shape[0]), A, B, alpha)
    layer.merge()
    return layer.base.weight.detach().to(weight.dtype)


def _count_by_src(emb_dim, n_layers, rank, targets):
    cfg = GPTConfig(vocab_size=1, context_length=1, emb_dim=emb_dim, n_heads=1, n_layers=n_layers)
    with torch.device("meta"):  # shapes only
        model = GPTModel(cfg)
        lora.apply_lora(model, rank, alpha=16, targets=targets)
    return lora.lora_parameter_count(model)


def _layer(g, d_in, d_out, rank, x_shape):
    def randn(*shape):
        return torch.randn(*shape, generator=g)

    return (
        randn(*x_shape, d_in),
        randn(d_out, d_in),
        randn(d_out),
        randn(rank, d_in),
        randn(d_out, rank),
    )


def _forward_cases(g):
    x, w, b, A, _ = _layer(g, 4, 4, 2, (1,))
    return [
        Case("B = 0, as at the start of training: exactly the frozen layer", (x, w, b, A, torch.zeros(4, 2), 16.0)),
        Case("rank 2, alpha 16: the update is scaled by alpha / rank = 8, not by alpha",
             (*_layer(g, 4, 4, 2, (1,)), 16.0)),
        Case("in 3, out 5: A is (rank, in), B is (out, rank)", (*_layer(g, 3, 5, 2, (2,)), 4.0)),
        Case("rank 1, alpha 1: the scale is 1", (*_layer(g, 6, 6, 1, (3,)), 1.0)),
        Case("a batch of sequences, (B, T, in)", (*_layer(g, 8, 12, 4, (2, 5)), 8.0)),
    ]  # fmt: skip


def _merge_cases(g):
    def parts(d_in, d_out, rank):
        _, w, _, A, B = _layer(g, d_in, d_out, rank, (1,))
        return w, A, B

    return [
        Case("in 3, out 5: B A is (out, in), the weight's shape; A^T B^T is its transpose",
             (*parts(3, 5, 2), 16.0)),
        Case("square, rank 2, alpha 16: scaled by alpha / rank = 8", (*parts(4, 4, 2), 16.0)),
        Case("rank 4, alpha 4", (*parts(8, 6, 4), 4.0)),
    ]  # fmt: skip


def _count_cases(g):
    attention = ("W_query", "W_key", "W_value", "out_proj")
    return [
        Case("one block, the query projection alone, rank 8: 8 x (768 + 768) = 12,288",
             (768, 1, 8, ("W_query",))),
        Case("the four attention projections: all square", (768, 12, 16, attention)),
        Case("the feed-forward's fc (E -> 4E) and proj (4E -> E): rank x (in + out) = 5 E rank "
             "each, not 2 E rank", (768, 1, 4, ("fc", "proj"))),
        Case("all six, GPT-2 small at rank 16: 2,654,208 (the chapter's count)",
             (768, 12, 16, (*attention, "fc", "proj"))),
        Case("a small model", (64, 2, 2, ("W_value", "fc"))),
    ]  # fmt: skip


EXERCISES = [
    Exercise(
        "lora_forward", "a frozen linear layer plus (alpha / rank) x A^T B^T",
        reference=_forward_by_src, cases=_forward_cases, atol=1e-4, rtol=1e-5,
        hint="the scale is alpha / rank, with rank = A.shape[0]; the update is (x @ A.T) @ B.T: "
        "narrow to rank numbers, then widen to out",
    ),
    Exercise(
        "merge_lora_weight", "fold the update into the frozen weight: W + (alpha / rank) B A",
        reference=_merge_by_src, cases=_merge_cases,
        hint="add (alpha / rank) * (B @ A), rank = A.shape[0]; B @ A is (out, rank) @ (rank, in) = "
        "(out, in), the weight's own layout; A.T @ B.T is its transpose, which a square layer "
        "accepts without complaint",
    ),
    Exercise(
        "lora_parameter_count", "the numbers an adapter trains: rank x (in + out) per wrapped layer",
        reference=_count_by_src, cases=_count_cases,
        hint="every wrapped layer trains rank * (in + out) numbers; fc is E -> 4E and proj 4E -> E, "
        "so each of them has in + out = 5E; multiply by the number of blocks",
    ),
]  # fmt: skip
