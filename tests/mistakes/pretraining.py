"""Typical wrong answers to the pretraining chapter's exercises."""

import math

import torch


def cross_entropy(logits, targets):
    # The softmax straight from its definition: exp(1000) overflows to inf, and inf / inf is NaN.
    probs = logits.exp() / logits.exp().sum(dim=-1, keepdim=True)
    return -probs[torch.arange(len(targets)), targets].log().mean()


def lr_at(step, lr, min_lr, warmup_steps, max_steps):
    # Warmup from step / warmup_steps: step 0 gets a learning rate of 0, and warmup ends a step early.
    if step < warmup_steps:
        return lr * step / warmup_steps
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def clip_grad_norm(grads, max_norm):
    # Clips every gradient on its own: each is short enough, but together they are too long, and
    # the update points in another direction.
    return tuple(g * min(1.0, max_norm / (g.norm().item() + 1e-6)) for g in grads)
