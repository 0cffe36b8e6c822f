"""Scaling out: the answers, and the cases each one is checked on.

References: ``shard`` against ``torch.chunk``; ``average_gradients`` against stacking the replicas'
gradients and taking the mean in float64; ``accumulated_gradient`` against autograd on the whole
batch at once, in float64.
"""

import torch
import torch.nn.functional as F

from exercises.checker import Case, Exercise


# --8<-- [start:shard]
def shard(batch: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    share = len(batch) // world_size
    return batch[rank * share : (rank + 1) * share]  # consecutive blocks: rank 0 first


# --8<-- [end:shard]


# --8<-- [start:average_gradients]
def average_gradients(
    per_replica: tuple[tuple[torch.Tensor, ...], ...],
) -> tuple[torch.Tensor, ...]:
    world_size = len(per_replica)
    # zip(*...) turns replicas x parameters into parameters x replicas
    return tuple(sum(grads) / world_size for grads in zip(*per_replica, strict=True))


# --8<-- [end:average_gradients]


# --8<-- [start:accumulated_gradient]
def accumulated_gradient(
    weight: torch.Tensor, x: torch.Tensor, y: torch.Tensor, n_micro: int
) -> torch.Tensor:
    weight = weight.detach().requires_grad_()
    for x_micro, y_micro in zip(x.chunk(n_micro), y.chunk(n_micro), strict=True):
        loss = F.cross_entropy(x_micro @ weight, y_micro)  # the mean over this micro-batch
        (loss / n_micro).backward()  # the mean of the means is the mean of the whole batch
    return weight.grad


# --8<-- [end:accumulated_gradient]


def _chunk(batch, rank, world_size):
    return batch.chunk(world_size)[rank]


def _mean_float64(per_replica):
    by_parameter = zip(*per_replica, strict=True)
    return tuple(
        torch.stack(grads).double().mean(dim=0).to(grads[0].dtype) for grads in by_parameter
    )


def _whole_batch_gradient(weight, x, y, n_micro):
    weight = weight.double().requires_grad_()
    F.cross_entropy(x.double() @ weight, y).backward()
    return weight.grad.to(x.dtype)


def _replicas(g, world_size, *shapes):
    return tuple(tuple(torch.randn(*s, generator=g) for s in shapes) for _ in range(world_size))


def _t(values):
    return torch.tensor(values, dtype=torch.float32)


def _classifier(g, N, d=5, C=3):
    return (
        torch.randn(d, C, generator=g),
        torch.randn(N, d, generator=g),
        torch.randint(0, C, (N,), generator=g),
    )


EXERCISES = [
    Exercise(
        "shard", "this rank's consecutive block of the global batch",
        reference=_chunk,
        cases=lambda g: [
            Case("rank 0 of 2: the first half", (torch.arange(8), 0, 2)),
            Case("rank 1 of 2: the second half, not the first again (every rank would train on "
                 "the same data)", (torch.arange(8), 1, 2)),
            Case("rank 2 of 4, a batch of (B, T) windows", (torch.arange(24).view(8, 3), 2, 4)),
            Case("one process: the whole batch", (torch.arange(6), 0, 1)),
        ],  # fmt: skip
        hint="share = len(batch) // world_size, and rank r takes batch[r * share : (r + 1) * share]; "
        "batch[:share] on every rank trains W copies on the same examples",
    ),
    Exercise(
        "average_gradients", "the mean over replicas of each parameter's gradient (the all-reduce)",
        reference=_mean_float64,
        cases=lambda g: [
            Case("two replicas, one parameter, gradients 1 and 3: the average is 2, not the sum 4",
                 (((_t([1.0, 1.0]),), (_t([3.0, 3.0]),)),)),
            Case("two replicas, two parameters of different shapes", (_replicas(g, 2, (3,), (2, 2)),)),
            Case("four replicas, three parameters", (_replicas(g, 4, (2,), (3,), (1,)),)),
            Case("one replica: its own gradients", (_replicas(g, 1, (4,), (2,)),)),
        ],  # fmt: skip
        hint="group the gradients by parameter (zip(*per_replica)), then sum and divide by the "
        "number of replicas; an all-reduce with SUM (gloo has no average) still needs the division",
    ),
    Exercise(
        "accumulated_gradient", "micro-batch gradients that add up to the whole batch's gradient",
        reference=_whole_batch_gradient,
        cases=lambda g: [
            Case("one micro-batch: the plain gradient", (*_classifier(g, 4), 1)),
            Case("four micro-batches of two: each micro-batch's mean loss counts a quarter",
                 (*_classifier(g, 8), 4)),
            Case("micro-batches of one example", (*_classifier(g, 6), 6)),
            Case("a larger batch", (*_classifier(g, 32, d=16, C=10), 8)),
        ],  # fmt: skip
        hint="backward() adds into weight.grad; the loss of each micro-batch is a mean over it, so "
        "divide it by n_micro before backward, or the sum of the micro-batches' gradients is "
        "n_micro times too large",
    ),
]  # fmt: skip
