"""From GPT-2 to a modern LLM: the answers, and the cases each one is checked on.

References: PyTorch's own ``F.rms_norm`` in float64; for the rotary embedding, each pair read as a
complex number and multiplied by ``exp(i m theta_i)`` (``torch.polar``), in float64, a computation
that shares nothing with a rotation written with sines and cosines; for grouped attention,
PyTorch's ``scaled_dot_product_attention`` with ``enable_gqa=True``, in float64.
"""

import math

import torch
import torch.nn.functional as F

from exercises.checker import Case, Exercise


# --8<-- [start:rms_norm]
def rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    rms = torch.sqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)  # (..., 1): the mean over d
    return scale * x / rms


# --8<-- [end:rms_norm]


# --8<-- [start:apply_rope]
def apply_rope(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    hd = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)  # (hd/2,): theta_i
    angles = positions.double()[:, None] * inv_freq  # (T, hd/2): m * theta_i
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    a, b = x[..., : hd // 2], x[..., hd // 2 :]  # pair i is (a_i, b_i) = (x_i, x_{i + hd/2})
    return torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)


# --8<-- [end:apply_rope]


# --8<-- [start:grouped_attention]
def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    G, T = q.shape[1] // k.shape[1], q.shape[-2]
    k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)  # heads 0, 0, 1, 1, ...
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, T, T)
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(diagonal=1)
    return torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1) @ v  # (B, H, T, hd)


# --8<-- [end:grouped_attention]


def _rms_norm_float64(x, scale, eps=1e-6):
    return F.rms_norm(x.double(), x.shape[-1:], scale.double(), eps).to(x.dtype)


def _rope_as_complex_numbers(x, positions, theta=10000.0):
    hd = x.shape[-1]
    z = torch.complex(x[..., : hd // 2].double(), x[..., hd // 2 :].double())  # pair i: a + ib
    freqs = 1.0 / theta ** (torch.arange(hd // 2, dtype=torch.float64) * 2 / hd)
    turn = torch.polar(torch.ones(len(positions), hd // 2, dtype=torch.float64),
                       positions.double()[:, None] * freqs)  # (T, hd/2): e^{i m theta_i}  # fmt: skip
    z = z * turn
    return torch.cat((z.real, z.imag), dim=-1).to(x.dtype)


def _sdpa_gqa_float64(q, k, v):
    out = F.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), is_causal=True, enable_gqa=True
    )
    return out.to(q.dtype)


def _t(values):
    return torch.tensor(values, dtype=torch.float32)


def _rms_norm_cases(g):
    return [
        Case("(3, 4): the root mean square is sqrt((9 + 16) / 2), not the length 5",
             (_t([[3.0, 4.0]]), torch.ones(2))),
        Case("a scale per dimension", (_t([[1.0, -2.0, 3.0, 0.5]]), _t([2.0, 0.5, -1.0, 1.0]))),
        Case("no mean is subtracted: a constant vector becomes all ones",
             (torch.full((1, 4), 5.0), torch.ones(4))),
        Case("a zero vector: eps keeps the division finite", (torch.zeros(1, 4), torch.ones(4))),
        Case("tiny values (mean square near eps): eps goes inside the root",
             (_t([[1e-3, -2e-3, 1e-3, 0.0]]), torch.ones(4)), {"eps": 1e-6}),
        Case("random, (B, T, d)",
             (torch.randn(3, 5, 32, generator=g) * 4, torch.randn(32, generator=g))),
    ]  # fmt: skip


def _rope_cases(g):
    return [
        Case("one pair (hd = 2) at positions 0, 1, 2: turned by 0, 1 and 2 radians",
             (_t([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]), torch.arange(3))),
        Case("hd = 4: pairs are (x_0, x_2) and (x_1, x_3), not neighbours; the second turns by "
             "10000^(-1/2) = 0.01 radians a position",
             (_t([[1.0, 2.0, 3.0, 4.0]] * 2), torch.tensor([1, 100]))),
        Case("positions that do not start at 0, as in generation with a KV cache",
             (torch.randn(1, 2, 3, 8, generator=g), torch.tensor([7, 8, 9]))),
        Case("theta given (Qwen's 1,000,000): the slow pairs turn slower",
             (torch.randn(2, 4, 16, generator=g), torch.arange(4) * 50), {"theta": 1e6}),
        Case("random, (B, heads, T, hd)",
             (torch.randn(2, 3, 6, 32, generator=g), torch.arange(6))),
    ]  # fmt: skip


def _grouped_cases(g):
    def randn(*shape):
        return torch.randn(*shape, generator=g)

    heads = torch.arange(2.0).view(1, 2, 1, 1).expand(1, 2, 3, 1)  # key/value head j: values all j
    return [
        Case("4 query heads, 2 key/value heads, v of head j all j: each output says which head it "
             "read", (randn(1, 4, 3, 1), randn(1, 2, 3, 1), heads.clone())),
        Case("6 query heads in 3 groups of 2", (randn(1, 6, 4, 8), randn(1, 3, 4, 8), randn(1, 3, 4, 8))),
        Case("one key/value head for all (multi-query)",
             (randn(2, 4, 5, 8), randn(2, 1, 5, 8), randn(2, 1, 5, 8))),
        Case("as many key/value heads as query heads: GPT-2's attention",
             (randn(1, 2, 5, 4), randn(1, 2, 5, 4), randn(1, 2, 5, 4))),
        Case("random, (B, H, T, hd)", (randn(2, 8, 7, 16), randn(2, 2, 7, 16), randn(2, 2, 7, 16))),
    ]  # fmt: skip


EXERCISES = [
    Exercise(
        "rms_norm", "RMSNorm over the last dimension: x / sqrt(mean(x^2) + eps) * scale",
        reference=_rms_norm_float64, cases=_rms_norm_cases,
        hint="the MEAN of the squares over the last dimension (x.pow(2).mean(-1, keepdim=True)), "
        "not their sum or the vector's norm; eps inside the square root; no mean subtracted",
    ),
    Exercise(
        "apply_rope", "rotary embedding, half-split pairs (x_i, x_{i+hd/2}) turned by m theta^(-2i/hd)",
        reference=_rope_as_complex_numbers, cases=_rope_cases, atol=1e-5, rtol=1e-4,
        hint="pair dimension i with i + hd/2 (the two halves), not with its neighbour i + 1 (that is "
        "the paper's interleaved convention); the angle of pair i at position m is "
        "m * theta ** (-2 * i / hd), i counting the pairs 0 .. hd/2 - 1",
    ),
    Exercise(
        "grouped_attention", "causal attention where query head h reads key/value head h // (H / KV)",
        reference=_sdpa_gqa_float64, cases=_grouped_cases, atol=1e-5, rtol=1e-4,
        hint="query head h belongs to group h // G, G = H / KV: repeat each key/value head G times "
        "in place (repeat_interleave, giving 0, 0, 1, 1), not the whole stack (repeat gives 0, 1, "
        "0, 1); or reshape q to (B, KV, G, T, hd)",
    ),
]  # fmt: skip
