"""Typical wrong answers to the modern chapter's exercises."""

import math

import torch


def rms_norm(x, scale, eps=1e-6):
    # The length of the vector, not its root mean square: forgets to divide by d inside the root.
    return scale * x / torch.sqrt(x.pow(2).sum(dim=-1, keepdim=True) + eps)


def apply_rope(x, positions, theta=10000.0):
    # The paper's interleaved pairs (x_0, x_1), (x_2, x_3), ...: not the half-split ones that
    # Hugging Face's checkpoints were converted for.
    hd = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)  # (hd/2,)
    angles = (positions.double()[:, None] * inv_freq).repeat_interleave(2, dim=-1)  # (T, hd)
    turned = torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)
    return (x * angles.cos() + turned * angles.sin()).to(x.dtype)


def grouped_attention(q, k, v):
    # repeat tiles the key/value heads (0, 1, 0, 1): query head h reads h % KV, not h // G.
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat(1, G, 1, 1), v.repeat(1, G, 1, 1)
    T = q.shape[-2]
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    future = torch.ones(T, T, dtype=torch.bool).triu(diagonal=1)
    return torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1) @ v
