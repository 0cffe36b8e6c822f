"""Making it small and fast: the answers, and the cases each one is checked on.

``quantize_absmax`` and ``pack_int4`` are the project's own ``src.quantize.quantize`` and
``src.quantize.pack_int4`` (tests/test_quantize.py holds the first equal to
``torch.ao.quantization``'s integers and scales, the second to a round trip). The reference for
``residual_distribution`` is a brute force in float64, one token at a time.
"""

import torch

from exercises.checker import Case, Exercise
from src.quantize import pack_int4, quantize


# --8<-- [start:quantize_absmax]
def quantize_absmax(
    weight: torch.Tensor, bits: int, group_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize(weight, bits, group_size)


# --8<-- [end:quantize_absmax]


# --8<-- [start:residual_distribution]
def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    residual = (p - q).clamp(min=0)  # max(0, p - q): where the draft proposes too little
    return residual / residual.sum(dim=-1, keepdim=True)  # each row sums to 1


# --8<-- [end:residual_distribution]


def _residual_by_hand(p, q):
    rows_p, rows_q = p.double().reshape(-1, p.shape[-1]), q.double().reshape(-1, q.shape[-1])
    out = torch.zeros_like(rows_p)
    for r in range(len(rows_p)):
        gaps = [
            max(0.0, a - b) for a, b in zip(rows_p[r].tolist(), rows_q[r].tolist(), strict=True)
        ]
        out[r] = torch.tensor(gaps, dtype=torch.float64) / sum(gaps)
    return out.reshape(p.shape).to(p.dtype)


def _quantize_cases(g):
    outlier = torch.randn(4, 64, generator=g) * 0.02
    outlier[1, 5] = 1.0  # one large weight: it sets the scale of its group only
    return [
        Case("int8, one scale per row", (torch.tensor([[0.5, -1.0, 0.25], [2.0, 1.0, -0.5]]), 8)),
        Case("int4: q_max is 7, not 15", (torch.tensor([[1.0, -1.0, 0.3, 0.05]]), 4)),
        Case("int4, groups of 4 in a row of 8: two scales a row", (torch.arange(-8.0, 8.0).view(2, 8), 4, 4)),
        Case("a row of zeros: a positive scale, integers 0", (torch.zeros(2, 4), 8)),
        Case("an outlier in row 1: groups of 16 keep it in its group", (outlier, 4, 16)),
        Case("random, int8, (16, 48)", (torch.randn(16, 48, generator=g), 8)),
    ]  # fmt: skip


def _pack_cases(g):
    return [
        Case("two values: 1 in the low four bits, -2 in the high four", (torch.tensor([1, -2], dtype=torch.int8),)),
        Case("the extremes -8 and 7", (torch.tensor([[-8, 7], [7, -8]], dtype=torch.int8),)),
        Case("random, (5, 12)", (torch.randint(-8, 8, (5, 12), generator=g).to(torch.int8),)),
    ]  # fmt: skip


def _residual_cases(g):
    p, q = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.3, 0.5])
    return [
        Case("the draft too sure of token 2: all the residual on token 0", (p, q)),
        Case("two tokens short: the residual split in proportion", (torch.tensor([0.4, 0.4, 0.2]), torch.tensor([0.2, 0.3, 0.5]))),
        Case("a batch of two rows: each row normalised on its own", (torch.stack([p, q]), torch.stack([q, p]))),
        Case("random, (4, 50)", (torch.softmax(torch.randn(4, 50, generator=g), -1), torch.softmax(torch.randn(4, 50, generator=g), -1))),
    ]  # fmt: skip


EXERCISES = [
    Exercise(
        "quantize_absmax", "integers and one absmax scale per group of a row",
        reference=quantize, cases=_quantize_cases,
        hint="q_max = 2**(bits - 1) - 1 (7 for int4, not 15: one bit is the sign); reshape to "
        "(rows, cols // group, group), take abs().amax(dim=-1), clamp the scale away from 0, "
        "round(w / s) and clamp to [-q_max, q_max]",
    ),
    Exercise(
        "pack_int4", "two 4-bit integers per byte, the even column low",
        reference=pack_int4, cases=_pack_cases,
        hint="u = (q + 8).to(torch.uint8); the even columns u[..., 0::2] go low, the odd ones "
        "u[..., 1::2] are shifted up by 4; combine them with |",
    ),
    Exercise(
        "residual_distribution", "max(0, p - q), normalised: what a rejection resamples from",
        reference=_residual_by_hand, cases=_residual_cases,
        hint="clamp(min=0), not abs(): a token the draft proposes too often gets nothing; divide "
        "by the sum over the last dimension, keepdim=True, so that each row sums to 1",
    ),
]  # fmt: skip
