"""Fusing the softmax: the answers, and the cases each one is checked on.

References: ``online_softmax`` against ``torch.softmax`` in float64; ``softmax_backward`` against
autograd through ``torch.softmax`` in float64; ``causal_softmax`` against the plain path of
``src/attention.py`` (scale, mask with -inf, softmax), in float64.
"""

import math

import torch

from exercises.checker import Case, Exercise
from src.attention import causal_mask
from src.attention import causal_softmax as plain_causal_softmax


# --8<-- [start:online_softmax]
def online_softmax(x: torch.Tensor) -> torch.Tensor:
    m, s = -math.inf, 0.0  # the maximum so far, and the sum of exp(x_j - m) so far
    for value in x.tolist():  # the one pass
        new_m = max(m, value)
        s = s * math.exp(m - new_m) + math.exp(value - new_m)  # old sum rescaled to the new max
        m = new_m
    return torch.exp(x - m) / s  # writing the output is the only other visit


# --8<-- [end:online_softmax]


# --8<-- [start:softmax_backward]
def softmax_backward(y: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    # dx_j = y_j (dy_j - sum_k dy_k y_k): the sum is one number per row
    return y * (dy - (dy * y).sum(dim=-1, keepdim=True))


# --8<-- [end:softmax_backward]


# --8<-- [start:causal_softmax]
def causal_softmax(scores: torch.Tensor, scale: float) -> torch.Tensor:
    out = torch.zeros_like(scores)  # the future columns stay exactly 0
    for i in range(scores.shape[-1]):
        visible = scores[..., i, : i + 1] * scale  # row i sees columns 0..i
        out[..., i, : i + 1] = torch.softmax(visible, dim=-1)
    return out


# --8<-- [end:causal_softmax]


def _softmax_float64(x):
    return torch.softmax(x.double(), dim=-1).to(x.dtype)


def _backward_by_autograd(y, dy):
    # softmax(log y) = y for rows that sum to one, so autograd can start from x = log y.
    x = y.double().log().requires_grad_()
    torch.softmax(x, dim=-1).backward(dy.double())
    return x.grad.to(y.dtype)


def _plain_float64(scores, scale):
    mask = causal_mask(scores.shape[-1])
    return plain_causal_softmax(scores.double(), scale, mask).to(scores.dtype)


def _t(values):
    return torch.tensor(values, dtype=torch.float32)


def _online_cases(g):
    return [
        Case("decreasing values: the first is the maximum throughout", (_t([3.0, 1.0, 0.5, -2.0]),)),
        Case("increasing values: the maximum rises at every step, so the running sum must be "
             "rescaled every time", (_t([1.0, 2.0, 3.0, 4.0]),)),
        Case("values of 1000 and more: exp overflows unless each term is taken relative to the "
             "running maximum", (_t([1000.0, 1002.0, 999.0, 1001.5]),)),
        Case("one value: its softmax is 1", (_t([-7.5]),)),
        Case("equal values: uniform", (_t([2.0, 2.0, 2.0]),)),
        Case("random scores", (torch.randn(200, generator=g) * 5,)),
    ]  # fmt: skip


def _probabilities(g, *shape, causal=False):
    x = torch.randn(*shape, generator=g) * 2
    if causal:
        x = x.masked_fill(causal_mask(shape[-1]), -math.inf)
    return torch.softmax(x, dim=-1)


def _backward_cases(g):
    y1 = _probabilities(g, 1, 5)
    y2 = _probabilities(g, 2, 4)
    return [
        Case("dy the same in every column: a softmax ignores a constant added to its row, so "
             "dx is 0", (y1, torch.full((1, 5), 0.7))),
        Case("two rows with different dy: the sum runs along each row, not over everything",
             (y2, _t([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, -2.0]]))),
        Case("a causal matrix: dx is 0 wherever y is 0", (_probabilities(g, 4, 4, causal=True),
             torch.randn(4, 4, generator=g))),
        Case("random, (B, H, T, T)", (_probabilities(g, 2, 3, 6, 6, causal=True),
             torch.randn(2, 3, 6, 6, generator=g))),
    ]  # fmt: skip


def _causal_cases(g):
    return [
        Case("three rows of zeros: row 0 is [1, 0, 0]; a 0 written above the diagonal would get "
             "the weight exp(0) = 1",
             (torch.zeros(3, 3), 1.0)),
        Case("the scale goes inside the softmax: softmax(0.125 * scores)",
             (_t([[4.0, 0.0], [8.0, 0.0]]), 0.125)),
        Case("large scores above the diagonal must not leak into any row",
             (torch.randn(4, 4, generator=g) + 50 * torch.ones(4, 4).triu(1), 1.0)),
        Case("random, (B, H, T, T)", (torch.randn(2, 3, 7, 7, generator=g), 1 / math.sqrt(8))),
    ]  # fmt: skip


EXERCISES = [
    Exercise(
        "online_softmax", "softmax of a 1-D tensor in one pass: running maximum and running sum",
        reference=_softmax_float64, cases=_online_cases,
        hint="when the maximum rises from m to m', multiply the sum so far by exp(m - m') before "
        "adding exp(x - m'); start from m = -inf and s = 0",
    ),
    Exercise(
        "softmax_backward", "the backward pass of a softmax: dx from the output y and the gradient dy",
        reference=_backward_by_autograd, cases=_backward_cases,
        hint="sum dy * y along the last dimension only, one number per row, with keepdim=True so "
        "that it broadcasts against the row; y * dy alone forgets that every y depends on every x",
    ),
    Exercise(
        "causal_softmax", "softmax(scale * scores) over each row's prefix 0..i, exact zeros after",
        reference=_plain_float64, cases=_causal_cases,
        hint="hide j > i with -inf (or skip those columns): exp(-inf) = 0. tril() writes 0, and "
        "exp(0) = 1 gives the future a weight; multiply by the scale before the softmax",
    ),
]  # fmt: skip
