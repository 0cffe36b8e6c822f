"""Break it, chapter "Scaling out": skip the gradient averaging; let every replica read the same data.

Data-parallel replicas are simulated in one process. Each step draws the global batch of 16 windows
(``step_batch``, as every rank of the trainer does) and gives each replica its shard. DDP's all-reduce
gives every replica the mean of the replicas' gradients; while their weights are equal, that is the
gradient of the mean loss over all shards, which ``optimizer_step`` computes when it gets the shards
as micro-batches. So a replica that averages steps on every shard; one that does not, on its own.
"""

import torch

from benchmarks.harness import markdown_table
from experiments.harness import TINY, batches, corpus_windows, evaluate, fmt, next_token_loss
from src.model import GPTModel
from src.training import adamw, optimizer_step

GLOBAL_BATCH, SHARDS = 16, 2  # each step: 16 windows, in two shards of 8


def replicas(n: int) -> list[GPTModel]:
    """``n`` copies of the tiny model with the same initial weights, as DDP broadcasts them."""
    torch.manual_seed(0)
    models = [GPTModel(TINY) for _ in range(n)]
    for model in models[1:]:
        model.load_state_dict(models[0].state_dict())
    return models


def train_replicas(models: list, micro_batches, steps: int, lr: float = 3e-3) -> None:
    """``steps`` steps of every replica. ``micro_batches(rank, shards)`` are what replica ``rank``
    steps on, out of the two shards of the step's global batch."""
    batch_of = batches(corpus_windows()[0], GLOBAL_BATCH)
    optimizers = [adamw(model, lr, weight_decay=0.1) for model in models]
    for model in models:
        model.train()
    for step in range(steps):
        inputs, targets = batch_of(step)  # the global batch, the same on every rank
        shards = list(zip(inputs.chunk(SHARDS), targets.chunk(SHARDS), strict=True))
        for rank, (model, optimizer) in enumerate(zip(models, optimizers, strict=True)):
            optimizer_step(model, optimizer, micro_batches(rank, shards), next_token_loss(model),
                           step + 1)  # fmt: skip


def largest_difference(a: GPTModel, b: GPTModel) -> float:
    """The largest difference between any two corresponding weights of two models."""
    return max(
        (p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters(), strict=True)
    )


# --8<-- [start:unsynchronised-replicas]
def averaged(rank: int, shards: list) -> list:
    """With the all-reduce: every replica's gradient is the mean over all shards."""
    return shards


def not_averaged(rank: int, shards: list) -> list:
    """Without it: each replica steps on the gradient of its own shard alone."""
    return [shards[rank]]


# --8<-- [end:unsynchronised-replicas]


def unsynchronised_replicas(steps: int = 200) -> str:
    """Two data-parallel replicas, simulated in one process, with and without gradient averaging."""
    val_set = corpus_windows()[1]
    rows = []
    for label, micro_batches in (
        ("gradients averaged (DDP)", averaged),
        ("no averaging", not_averaged),
    ):
        models = replicas(SHARDS)
        train_replicas(models, micro_batches, steps)
        rows.append([label, f"{largest_difference(*models):.2e}",
                     *(fmt(evaluate(model, val_set)) for model in models)])  # fmt: skip
    header = [
        "",
        "largest weight difference between replicas",
        "val loss, rank 0",
        "val loss, rank 1",
    ]
    return markdown_table(header, rows)


# --8<-- [start:duplicated-data]
def same_shard(rank: int, shards: list) -> list:
    """Every rank reads the first shard (its data drawn with the same seed and no offset by rank):
    the all-reduce averages copies of one gradient."""
    return [shards[0]] * len(shards)


# --8<-- [end:duplicated-data]


def first_shard(rank: int, shards: list) -> list:
    """A replica alone, on the first shard of every global batch."""
    return [shards[0]]


def duplicated_data(steps: int = 200) -> str:
    """Two data-parallel replicas that read the same shard, against distinct shards and one alone."""
    val_set = corpus_windows()[1]
    runs = [  # label, workers, what rank 0 steps on, distinct windows per step
        ("one replica", 1, first_shard, 8),
        ("two replicas, same shard (no rank offset)", 2, same_shard, 8),
        ("two replicas, distinct shards (as in DDP)", 2, averaged, 16),
    ]
    rows = []
    for label, workers, micro_batches, distinct in runs:
        models = replicas(workers)
        train_replicas(models, micro_batches, steps)
        if workers == 1:
            single = models[0]
        gap = "(the reference)" if workers == 1 else f"{largest_difference(single, models[0]):.2e}"
        rows.append([label, str(workers), str(distinct), gap, fmt(evaluate(models[0], val_set))])
    header = ["", "workers", "distinct sequences per step",
              "largest weight difference from one replica", "validation loss"]  # fmt: skip
    return markdown_table(header, rows)


EXPERIMENTS = {
    "unsynchronised-replicas": unsynchronised_replicas,
    "duplicated-data": duplicated_data,
}
