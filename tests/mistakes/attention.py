"""Typical wrong answers to the attention chapter's exercises."""

import math

import torch


def causal_attention(q, k, v):
    # The mask hides the diagonal too (triu from 0): a query cannot see itself, row 0 sees nothing.
    T = q.shape[-2]
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    mask = torch.ones(T, T, dtype=torch.bool).triu(diagonal=0)
    return torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1) @ v


def split_heads(x, n_heads):
    # A plain view: positions and heads are mixed up.
    B, T, d = x.shape
    return x.reshape(B, n_heads, T, d // n_heads)


def merge_heads(x):
    # Reshape without putting T back before H.
    B, H, T, hd = x.shape
    return x.reshape(B, T, H * hd)
