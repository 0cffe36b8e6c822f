"""Typical wrong answers to the model chapter's exercises."""

import math

import torch


def layer_norm(x, weight, bias, eps=1e-5):
    # torch's var() is the unbiased variance by default: it divides by d - 1, not d.
    mean = x.mean(dim=-1, keepdim=True)
    return weight * (x - mean) / torch.sqrt(x.var(dim=-1, keepdim=True) + eps) + bias


def gelu(x):
    # The exact GELU, x * Phi(x) with erf: not the tanh approximation GPT-2's weights expect.
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def embed(ids, tok_emb, pos_emb, start=0):
    # Ignores start: with a KV cache every new token is put at position 0 again.
    return tok_emb[ids] + pos_emb[: ids.shape[1]]
