"""Typical wrong answers to the scaling-out chapter's exercises."""

import torch.nn.functional as F


def shard(batch, rank, world_size):
    # Every rank takes the first share: W processes train on the same examples, the rest are unused.
    return batch[: len(batch) // world_size]


def average_gradients(per_replica):
    # Sums instead of averaging, as an all-reduce with SUM leaves it: W times the gradient.
    return tuple(sum(grads) for grads in zip(*per_replica, strict=True))


def accumulated_gradient(weight, x, y, n_micro):
    # Forgets to divide each micro-batch's loss by n_micro: the gradient is n_micro times too large.
    weight = weight.detach().requires_grad_()
    for x_micro, y_micro in zip(x.chunk(n_micro), y.chunk(n_micro), strict=True):
        F.cross_entropy(x_micro @ weight, y_micro).backward()
    return weight.grad
