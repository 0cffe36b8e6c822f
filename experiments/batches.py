"""Break it, chapter "Batches of tokens": targets that are not shifted; a validation split at random.

Both train the tiny model on the default corpus with the shared harness.
"""

import torch

from benchmarks.harness import markdown_table
from experiments.harness import (
    TINY,
    batches,
    corpus_windows,
    evaluate,
    fmt,
    next_token_loss,
    train,
    training,
)
from src.model import GPTModel
from src.training import cross_entropy


# --8<-- [start:unshifted-targets]
def copy_loss(model: GPTModel):
    """The broken loss: every position's target is its own input token, not the next one."""

    def loss_fn(batch) -> torch.Tensor:
        inputs, _ = batch  # the shifted targets are dropped
        return cross_entropy(model(inputs), inputs)

    return loss_fn


# --8<-- [end:unshifted-targets]


def unshifted_targets(steps: int = 300, lr: float = 3e-3) -> str:
    """Train with targets equal to the inputs instead of shifted by one."""
    train_set, val_set = corpus_windows()
    rows = []
    for label, shifted in (("targets shifted by one", True), ("targets = inputs", False)):
        torch.manual_seed(0)
        model = GPTModel(TINY)
        loss_fn = next_token_loss(model) if shifted else copy_loss(model)
        losses = train(model, loss_fn, batches(train_set), steps, lr)
        rows.append([label, fmt(sum(losses[-20:]) / 20), fmt(evaluate(model, val_set))])
    return markdown_table(["", "train loss (as trained)", "next-token validation loss"], rows)


def random_split(checkpoints: tuple[int, ...] = (300, 1000), lr: float = 3e-3) -> str:
    """What a validation set drawn at random from the training text reports, against a held-out
    one split by position, as one model trains longer."""
    train_set, val_set = corpus_windows()
    torch.manual_seed(0)
    model = GPTModel(TINY)
    rows = []
    run = training(model, next_token_loss(model), batches(train_set), max(checkpoints), lr)
    for step, _ in run:
        if step in checkpoints:
            # --8<-- [start:random-split]
            seen = evaluate(model, train_set)  # windows it trained on: what a random split shares
            held_out = evaluate(model, val_set)  # the last 10% of the corpus, never trained on
            # --8<-- [end:random-split]
            rows.append([str(step), fmt(seen), fmt(held_out), fmt(held_out - seen)])
    header = ["steps trained", "validation drawn from the training text", "held out by position",
              "how much the random split flatters"]  # fmt: skip
    return markdown_table(header, rows)


EXPERIMENTS = {"unshifted-targets": unshifted_targets, "random-split": random_split}
