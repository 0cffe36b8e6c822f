"""Attention: the answers, and the cases each one is checked on.

References: ``causal_attention`` against PyTorch's own ``scaled_dot_product_attention`` in float64;
the head reshapes against slicing and concatenating the heads one by one.
"""

import math

import torch
import torch.nn.functional as F

from exercises.checker import Case, Exercise


# --8<-- [start:causal_attention]
def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    T, d = q.shape[-2], q.shape[-1]
    scores = q @ k.transpose(-2, -1) / math.sqrt(d)  # (B, T, T): how well query i matches key j
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(diagonal=1)  # j > i
    weights = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)  # rows sum to 1
    return weights @ v  # (B, T, d): each position, an average of the values it may see


# --8<-- [end:causal_attention]


# --8<-- [start:split_heads]
def split_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    B, T, d = x.shape
    return x.view(B, T, n_heads, d // n_heads).transpose(1, 2)  # (B, H, T, d / H)


# --8<-- [end:split_heads]


# --8<-- [start:merge_heads]
def merge_heads(x: torch.Tensor) -> torch.Tensor:
    B, H, T, hd = x.shape
    return x.transpose(1, 2).reshape(B, T, H * hd)  # (B, T, H * hd): heads side by side again


# --8<-- [end:merge_heads]


def _sdpa_float64(q, k, v):
    out = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    return out.to(q.dtype)


def _heads_by_slicing(x, n_heads):
    hd = x.shape[-1] // n_heads
    return torch.stack([x[..., h * hd : (h + 1) * hd] for h in range(n_heads)], dim=1)


def _heads_by_concatenating(x):
    return torch.cat([x[:, h] for h in range(x.shape[1])], dim=-1)


def _qkv(g, B, T, d, scale=1.0):
    return tuple(torch.randn(B, T, d, generator=g) * scale for _ in range(3))


def _attention_cases(g):
    return [
        Case("one token: it sees only itself, so the output is its value", _qkv(g, 1, 1, 4)),
        Case("three tokens, tiny: row 0 sees one key, row 2 sees three", _qkv(g, 1, 3, 2)),
        Case("large dot products: without the 1/sqrt(d) scale the softmax saturates", _qkv(g, 1, 5, 16, scale=3.0)),
        Case("a batch of two, a width that is no power of two", _qkv(g, 2, 7, 6)),
        Case("random, longer", _qkv(g, 3, 32, 8)),
    ]  # fmt: skip


EXERCISES = [
    Exercise(
        "causal_attention", "softmax(q k^T / sqrt(d), future masked) v for (B, T, d) inputs",
        reference=_sdpa_float64, cases=_attention_cases, atol=1e-5, rtol=1e-4,
        hint="scale by 1/sqrt(d) with d = q.shape[-1]; hide j > i (triu with diagonal=1: a query "
        "sees itself) with -inf BEFORE the softmax, over the last dimension",
    ),
    Exercise(
        "split_heads", "(B, T, d) -> (B, H, T, d / H): head h holds columns h*d/H .. (h+1)*d/H",
        reference=_heads_by_slicing,
        cases=lambda g: [
            Case("two heads of two: easy to read", (torch.arange(8.0).view(1, 2, 4), 2)),
            Case("three heads", (torch.randn(2, 5, 12, generator=g), 3)),
            Case("one head", (torch.randn(2, 3, 4, generator=g), 1)),
        ],
        hint="view as (B, T, H, d / H), then swap the T and H dimensions; a plain view to "
        "(B, H, T, d / H) mixes positions into heads",
    ),
    Exercise(
        "merge_heads", "(B, H, T, hd) -> (B, T, H * hd): the inverse of split_heads",
        reference=_heads_by_concatenating,
        cases=lambda g: [
            Case("two heads of two: easy to read", (torch.arange(8.0).view(1, 2, 2, 2),)),
            Case("three heads", (torch.randn(2, 3, 5, 4, generator=g),)),
            Case("a non-contiguous input (as attention produces)",
                 (torch.randn(2, 5, 3, 4, generator=g).transpose(1, 2),)),
        ],  # fmt: skip
        hint="swap H and T back first, then reshape (not view: after a transpose the memory "
        "is not contiguous)",
    ),
]  # fmt: skip
