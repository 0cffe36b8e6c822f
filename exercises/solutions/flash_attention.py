"""Fusing the whole attention: the answers, and the cases each one is checked on.

References: ``visited_tiles`` against a brute force over every (query, key) position;
``flash_forward`` against the eager path of ``src/attention.py`` (scale, mask, softmax, then
``@ v``) and ``torch.logsumexp`` of the masked scores, in float64; ``flash_backward`` against
autograd through that eager path, in float64.
"""

import math

import torch

from exercises.checker import Case, Exercise
from src.attention import causal_mask, causal_softmax


# --8<-- [start:visited_tiles]
def visited_tiles(T: int, tile: int) -> list[tuple[int, int]]:
    n = math.ceil(T / tile)  # the last tile may be shorter
    # Key tile j holds a visible score for query tile i when its first key, j * tile, is at or
    # before the tile's last query: j <= i, the diagonal tile included.
    return [(i, j) for i in range(n) for j in range(i + 1)]


# --8<-- [end:visited_tiles]


# --8<-- [start:flash_forward]
def flash_forward(q, k, v, scale: float, tile: int):
    T = q.shape[0]
    rows = torch.arange(T)
    m = torch.full((T,), -math.inf, dtype=q.dtype)  # running maximum per row
    total = torch.zeros(T, dtype=q.dtype)  # l, the running sum of exp(s - m)
    o = torch.zeros_like(q)  # (T, hd), unnormalised output
    for k0 in range(0, T, tile):
        cols = torch.arange(k0, min(k0 + tile, T))
        s = scale * q @ k[cols].T  # (T, tile): every query against this key tile
        s = s.masked_fill(cols[None, :] > rows[:, None], -math.inf)
        m_new = torch.maximum(m, s.amax(dim=1))
        alpha = torch.exp(m - m_new)  # brings what was accumulated to the new maximum
        p = torch.exp(s - m_new[:, None])  # (T, tile)
        total = total * alpha + p.sum(dim=1)
        o = o * alpha[:, None] + p @ v[cols]
        m = m_new
    return o / total[:, None], m + torch.log(total)


# --8<-- [end:flash_forward]


# --8<-- [start:flash_backward]
def flash_backward(q, k, v, out, lse, dout, scale: float):
    T = q.shape[0]
    s = scale * q @ k.T  # (T, T) here for brevity; the kernel recomputes it tile by tile
    p = torch.exp(s - lse[:, None]).masked_fill(causal_mask(T), 0.0)
    dv = p.T @ dout
    dp = dout @ v.T
    D = (dout * out).sum(dim=1, keepdim=True)  # (T, 1): rowsum(dO o O) = rowsum(P o dP)
    ds = p * (dp - D)
    return scale * ds @ k, scale * ds.T @ q, dv


# --8<-- [end:flash_backward]


def _eager(q, k, v, scale):
    """The eager path in float64: softmax(mask(scale q k^T)) v, and the rows' log-sum-exp."""
    q, k, v = (t.double() for t in (q, k, v))
    scores = q @ k.T  # (T, T)
    mask = causal_mask(q.shape[0])
    lse = torch.logsumexp((scale * scores).masked_fill(mask, -math.inf), dim=1)
    return causal_softmax(scores, scale, mask) @ v, lse


def _tiles_by_brute_force(T, tile):
    return sorted({(i // tile, j // tile) for i in range(T) for j in range(i + 1)})


def _forward_reference(q, k, v, scale, tile):
    out, lse = _eager(q, k, v, scale)
    return out.to(q.dtype), lse.to(q.dtype)


def _backward_reference(q, k, v, out, lse, dout, scale):
    q, k, v = (t.double().requires_grad_() for t in (q, k, v))
    _eager(q, k, v, scale)[0].backward(dout.double())
    return tuple(t.grad.to(dout.dtype) for t in (q, k, v))


def _qkv(g, T, hd, spread=1.0):
    return tuple(torch.randn(T, hd, generator=g) * spread for _ in range(3))


def _tile_cases(g):
    return [
        Case("one tile: the diagonal tile is the only one, and it must be visited", (5, 8)),
        Case("two tiles exactly: (1, 0) and both diagonals, never (0, 1)", (8, 4)),
        Case("a short last tile: T = 10 in tiles of 4 is three tiles, not two", (10, 4)),
        Case("tiles of one position: every pair j <= i", (4, 1)),
        Case("T = 200 in tiles of 64, the kernel's query tile", (200, 64)),
    ]  # fmt: skip


def _forward_cases(g):
    rising = _qkv(g, 8, 4)
    rising[1][4:] *= 8  # the later key tile scores much higher: every row's maximum rises
    return [
        Case("one tile holds everything: a plain causal softmax", (*_qkv(g, 6, 4), 0.5, 8)),
        Case("the second key tile raises the maximum: what was summed before must be rescaled",
             (rising[0].abs(), rising[1].abs(), rising[2], 1.0, 4)),
        Case("scores of several hundred: exp overflows without the running maximum",
             (*_qkv(g, 9, 4, spread=12.0), 1.0, 3)),
        Case("T = 1", (*_qkv(g, 1, 8), 0.35, 4)),
        Case("T not a multiple of the tile, the last tile one key long", (*_qkv(g, 17, 8), 0.35, 4)),
        Case("random, T = 70, head dim 16, tiles of 16", (*_qkv(g, 70, 16), 0.25, 16)),
    ]  # fmt: skip


def _backward_case(g, label, T, hd, scale):
    q, k, v = _qkv(g, T, hd)
    out, lse = _forward_reference(q, k, v, scale, T)
    return Case(label, (q, k, v, out, lse, torch.randn(T, hd, generator=g), scale))


def _backward_cases(g):
    return [
        _backward_case(g, "T = 1: the only probability is 1, so dq and dk are 0", 1, 4, 0.5),
        _backward_case(g, "a small head: dS = P o (dP - D), with D one number per row", 4, 2, 1.0),
        _backward_case(g, "random, T = 33, head dim 8", 33, 8, 8**-0.5),
    ]


EXERCISES = [
    Exercise(
        "visited_tiles", "the (query tile, key tile) pairs a causal flash forward computes",
        reference=_tiles_by_brute_force, cases=_tile_cases,
        hint="the diagonal tile (i, i) is only partly masked, so it is visited; count the tiles "
        "with a ceiling division, so that a short last tile is not lost",
    ),
    Exercise(
        "flash_forward", "causal attention by key tiles with an online softmax: (out, lse)",
        reference=_forward_reference, cases=_forward_cases, atol=1e-5, rtol=1e-4,
        hint="when the maximum rises from m to m', multiply both the sum l AND the output o "
        "accumulated so far by exp(m - m'); divide o by l once, at the end; lse = m + log(l)",
    ),
    Exercise(
        "flash_backward", "dq, dk, dv of causal attention from out, lse and dout",
        reference=_backward_reference, cases=_backward_cases, atol=1e-5, rtol=1e-4,
        hint="P = exp(scale * q k^T - lse) with the future set to 0; dS = P * (dP - D) where "
        "D = rowsum(dout * out); dq = scale * dS k, dk = scale * dS^T q, dv = P^T dout",
    ),
]  # fmt: skip
