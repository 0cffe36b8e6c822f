"""The GPT model: the answers, and the cases each one is checked on.

References: PyTorch's own ``F.layer_norm``, ``F.gelu(approximate="tanh")`` and ``F.embedding``, in
float64.
"""

import math

import torch
import torch.nn.functional as F

from exercises.checker import Case, Exercise


# --8<-- [start:layer_norm]
def layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5
) -> torch.Tensor:
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)  # biased: divided by d, not d - 1
    return weight * (x - mean) / torch.sqrt(var + eps) + bias


# --8<-- [end:layer_norm]


# --8<-- [start:gelu]
def gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


# --8<-- [end:gelu]


# --8<-- [start:embed]
def embed(
    ids: torch.Tensor, tok_emb: torch.Tensor, pos_emb: torch.Tensor, start: int = 0
) -> torch.Tensor:
    T = ids.shape[1]
    return tok_emb[ids] + pos_emb[start : start + T]  # (B, T, d) + (T, d): one row per position


# --8<-- [end:embed]


def _layer_norm_float64(x, weight, bias, eps=1e-5):
    out = F.layer_norm(x.double(), x.shape[-1:], weight.double(), bias.double(), eps)
    return out.to(x.dtype)


def _gelu_float64(x):
    return F.gelu(x.double(), approximate="tanh").to(x.dtype)


def _embedding_float64(ids, tok_emb, pos_emb, start=0):
    positions = torch.arange(start, start + ids.shape[1])
    out = F.embedding(ids, tok_emb.double()) + F.embedding(positions, pos_emb.double())
    return out.to(tok_emb.dtype)


def _t(values):
    return torch.tensor(values, dtype=torch.float32)


def _layer_norm_cases(g):
    def randn(*shape):
        return torch.randn(*shape, generator=g)

    ones, zeros = torch.ones(4), torch.zeros(4)
    return [
        Case("four numbers: the biased variance divides by 4, the unbiased one by 3",
             (_t([[1.0, 2.0, 3.0, 6.0]]), ones, zeros)),
        Case("weight and bias: scale, then shift", (_t([[1.0, 2.0, 3.0, 6.0]]), _t([1.0, 2.0, -1.0, 0.5]),
             _t([0.0, 1.0, 0.0, -3.0]))),
        Case("a tiny spread (variance near eps): eps goes inside the square root",
             (randn(2, 4) * 3e-3, ones, zeros)),
        Case("a constant vector: variance 0, and eps keeps the division finite",
             (torch.full((1, 4), 5.0), ones, zeros + 0.25)),
        Case("eps given: use it", (_t([[0.0, 0.1, 0.0, 0.1]]), ones, zeros), {"eps": 1e-2}),
        Case("an offset of 10: E[x^2] - E[x]^2 loses the variance to rounding in float32; "
             "subtract the mean first", (randn(2, 5, 16) + 10, randn(16), randn(16))),
        Case("random, (B, T, d)", (randn(3, 7, 32), randn(32), randn(32))),
    ]  # fmt: skip


def _gelu_cases(g):
    return [
        Case("x = 1, 2, 3, -3: where the exact erf form differs from the tanh one by up to 4e-4",
             (_t([1.0, 2.0, 3.0, -3.0]),)),
        Case("zero and small values", (_t([0.0, 1e-3, -1e-3, 0.1]),)),
        Case("large values: GELU(x) -> x for x >> 0 and -> 0 for x << 0, with no NaN",
             (_t([-100.0, -12.0, 12.0, 100.0]),)),
        Case("random, (B, T, 4 d)", (torch.randn(2, 3, 32, generator=g) * 3,)),
    ]  # fmt: skip


def _embed_cases(g):
    tok, pos = torch.randn(10, 4, generator=g), torch.randn(8, 4, generator=g)
    return [
        Case("ids 5 5 5: the same token at three positions gets three different vectors",
             (torch.tensor([[5, 5, 5]]), tok, pos)),
        Case("a batch of two: every row starts at position 0", (torch.tensor([[1, 2], [3, 4]]), tok, pos)),
        Case("generating with a cache: two new tokens after three cached ones sit at positions 3 "
             "and 4",
             (torch.tensor([[5, 9]]), tok, pos), {"start": 3}),
        Case("random", (torch.randint(0, 50, (3, 8), generator=g), torch.randn(50, 16, generator=g),
             torch.randn(8, 16, generator=g))),
    ]  # fmt: skip


EXERCISES = [
    Exercise(
        "layer_norm", "LayerNorm over the last dimension, with the biased variance",
        reference=_layer_norm_float64, cases=_layer_norm_cases,
        hint="x.var() divides by d - 1 unless told unbiased=False; take the mean of (x - mean) ** 2 "
        "instead; the eps goes inside the square root: (x - mean) / sqrt(var + eps)",
    ),
    Exercise(
        "gelu", "GELU with GPT-2's tanh approximation",
        reference=_gelu_float64, cases=_gelu_cases, atol=1e-6,
        hint="0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x ** 3))): the cube of x, and "
        "tanh, not erf (F.gelu's default is the exact erf form)",
    ),
    Exercise(
        "embed", "token embeddings plus position embeddings, positions counted from start",
        reference=_embedding_float64, cases=_embed_cases,
        hint="the position embedding is indexed by position, pos_emb[start : start + T], not by "
        "token id; it broadcasts over the batch",
    ),
]  # fmt: skip
