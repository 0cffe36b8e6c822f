"""Typical wrong answers to the flash-attention chapter's exercises."""

import math

import torch


def visited_tiles(T, tile):
    # Skips the diagonal tile: only the key tiles strictly before the query tile's own.
    n = math.ceil(T / tile)
    return [(i, j) for i in range(n) for j in range(i)]


def flash_forward(q, k, v, scale, tile):
    # Rescales the running sum but not the running output when the maximum rises.
    T = q.shape[0]
    rows = torch.arange(T)
    m = torch.full((T,), -math.inf, dtype=q.dtype)
    total = torch.zeros(T, dtype=q.dtype)
    o = torch.zeros_like(q)
    for k0 in range(0, T, tile):
        cols = torch.arange(k0, min(k0 + tile, T))
        s = (scale * q @ k[cols].T).masked_fill(cols[None, :] > rows[:, None], -math.inf)
        m_new = torch.maximum(m, s.amax(dim=1))
        p = torch.exp(s - m_new[:, None])
        total = total * torch.exp(m - m_new) + p.sum(dim=1)
        o = o + p @ v[cols]
        m = m_new
    return o / total[:, None], m + torch.log(total)


def flash_backward(q, k, v, out, lse, dout, scale):
    # dS = P o dP: forgets to subtract D = rowsum(dout o out), the softmax's coupling of a row.
    T = q.shape[0]
    mask = torch.ones(T, T, dtype=torch.bool).triu(1)
    p = torch.exp(scale * q @ k.T - lse[:, None]).masked_fill(mask, 0.0)
    ds = p * (dout @ v.T)
    return scale * ds @ k, scale * ds.T @ q, p.T @ dout
