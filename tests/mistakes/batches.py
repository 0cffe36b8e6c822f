"""Typical wrong answers to the batches chapter's exercises."""

import math

import torch


def windows(tokens, context_length, stride):
    # Off by one: the last start is n - T - 1, but range stops before it, so the window that ends
    # on the last token is lost (and a stream of exactly T + 1 tokens gives none).
    starts = range(0, len(tokens) - context_length - 1, stride)
    inputs = torch.stack([tokens[s : s + context_length] for s in starts])
    targets = torch.stack([tokens[s + 1 : s + context_length + 1] for s in starts])
    return inputs, targets


def batch_at(tokens, starts, context_length):
    # Targets made by rolling the inputs: the last target wraps around to the window's first token.
    inputs = tokens[starts[:, None] + torch.arange(context_length)]
    return inputs, inputs.roll(-1, dims=1)


def step_batch(step, n, batch_size, seed):
    # Rounds the steps per epoch up: the last, partial batch of an epoch is kept, and every later
    # step reads from the wrong place in the wrong epoch.
    steps_per_epoch = math.ceil(n / batch_size)
    epoch, k = divmod(step, steps_per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return order[k * batch_size : (k + 1) * batch_size]
