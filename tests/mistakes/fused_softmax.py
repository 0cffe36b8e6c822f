"""Typical wrong answers to the fused-softmax chapter's exercises."""

import math

import torch


def online_softmax(x):
    # Forgets to rescale: the terms added before the maximum rose stay relative to an old maximum.
    m, s = -math.inf, 0.0
    for value in x.tolist():
        m = max(m, value)
        s += math.exp(value - m)
    return torch.exp(x - m) / s


def softmax_backward(y, dy):
    # The sum runs over the whole tensor instead of along each row: right for one row only.
    return y * (dy - (dy * y).sum())


def causal_softmax(scores, scale):
    # tril() writes 0, not -inf, above the diagonal: exp(0) = 1 gives the future positions weight.
    return torch.softmax(scale * scores.tril(), dim=-1)
