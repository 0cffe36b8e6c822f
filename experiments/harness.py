"""What every "Break it" experiment shares: the tiny model, the corpus, and one way to train and test.

An experiment trains or probes a small model twice, once as built and once with one piece broken,
and compares the two. For the comparison to mean anything, everything but the broken piece must be
the same: the model's size, the data, the order of the batches, the optimizer step. So they all
come from here:

- **The model**: the ``cpu-tiny`` preset (2 layers, ``emb_dim`` 64, 2 heads, ``context_length`` 64),
  small enough that an experiment trains in seconds on one CPU thread.
- **The data**: the default corpus with a 1,024-token BPE trained on it, split by position, cut into
  windows of ``context_length`` tokens that tile it (stride = context length).
- **Training**: the project's one batching rule, ``step_batch``, and its one optimizer step,
  ``optimizer_step`` (AdamW, gradient clipping at 1.0), exactly as the trainer takes them. A loss that
  becomes infinite or NaN stops the run, as it stops the trainer.
- **Testing**: the mean loss over every window of a split, in order.
"""

import functools
import math
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import nn

from src.data import (
    GPTDataset,
    load_corpus,
    split_tokens,
    step_batch,
    tokenize_cached,
    train_tokenizer_cached,
)
from src.errors import NonFiniteLossError
from src.files import cache_dir
from src.model import GPTConfig, GPTModel
from src.training import Schedule, adamw, cross_entropy, optimizer_step

TINY = GPTConfig.from_preset("cpu-tiny")
BATCH_SIZE = 16


def tiny(**changes) -> GPTConfig:
    """The tiny preset with some fields changed: ``tiny(n_layers=8, emb_dim=128, n_heads=4)``."""
    return GPTConfig.from_preset("cpu-tiny", **changes)


@functools.cache
def corpus_tokens(vocab_size: int = TINY.vocab_size) -> tuple[np.ndarray, np.ndarray]:
    """Training and validation token ids of the default corpus, with a BPE trained on it (cached)."""
    corpus = load_corpus()
    tokenizer = train_tokenizer_cached(corpus, vocab_size, cache_dir())
    return split_tokens(tokenize_cached(corpus, tokenizer, cache_dir()))


def windows(tokens: np.ndarray, context_length: int = TINY.context_length) -> GPTDataset:
    """The windows that tile ``tokens``: every token is a target once per epoch."""
    return GPTDataset(tokens, context_length, stride=context_length)


def corpus_windows() -> tuple[GPTDataset, GPTDataset]:
    """The training and validation windows of the default corpus, for the tiny model."""
    train_tokens, val_tokens = corpus_tokens()
    return windows(train_tokens), windows(val_tokens)


def batches(data, batch_size: int = BATCH_SIZE, first_step: int = 0) -> Callable:
    """The batch of every step: ``step_batch`` over ``data``, from step ``first_step`` on.

    ``data`` is a ``GPTDataset`` (a batch is inputs and targets, (B, T) each) or a list of examples
    (a batch is the list of the examples picked)."""

    def batch_of(step: int):
        which = step_batch(first_step + step, len(data), batch_size, seed=0)
        if isinstance(data, GPTDataset):
            return data.batch(which)
        return [data[i] for i in which.tolist()]

    return batch_of


def training(
    model: nn.Module,
    loss_fn: Callable[[object], torch.Tensor],
    batch_of: Callable[[int], object],
    steps: int,
    lr: float,
    warmup: int = 0,
) -> Iterator[tuple[int, float]]:
    """Train ``model`` for ``steps`` optimizer steps; yield (steps done, loss) after each.

    ``batch_of(step)`` is the batch of a step, ``loss_fn(batch)`` its mean loss. The learning rate
    rises linearly over ``warmup`` steps, then stays at ``lr``. A non-finite loss is yielded as NaN and
    ends the run, the weights left as they were before it.
    """
    optimizer = adamw(model, lr, weight_decay=0.1)
    schedule = Schedule(lr, min_lr=lr, warmup_steps=warmup, max_steps=steps)
    model.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = schedule(step)
        try:
            loss, _ = optimizer_step(model, optimizer, [batch_of(step)], loss_fn, step + 1)
        except NonFiniteLossError:
            yield step + 1, math.nan
            return
        yield step + 1, loss


def train(model, loss_fn, batch_of, steps: int, lr: float, warmup: int = 0) -> list[float]:
    """The loss of every step of ``training``; NaN for a step where it diverged and those after."""
    losses = [loss for _, loss in training(model, loss_fn, batch_of, steps, lr, warmup)]
    return losses + [math.nan] * (steps - len(losses))


def next_token_loss(model: nn.Module) -> Callable:
    """The language-modelling loss of a batch of windows: each position predicts the next token."""

    def loss_fn(batch) -> torch.Tensor:
        inputs, targets = batch
        return cross_entropy(model(inputs), targets)

    return loss_fn


def pretrain(model: GPTModel, data: GPTDataset, steps: int, lr: float, warmup: int = 0,
             first_step: int = 0) -> list[float]:  # fmt: skip
    """Train ``model`` on the windows ``data`` for ``steps`` steps; the loss of every step."""
    return train(
        model, next_token_loss(model), batches(data, first_step=first_step), steps, lr, warmup
    )


@functools.cache
def _pretrained_state(steps: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = GPTModel(TINY)
    pretrain(model, corpus_windows()[0], steps, lr=3e-3)
    return {k: v.clone() for k, v in model.state_dict().items()}


def pretrained_tiny(steps: int) -> GPTModel:
    """The tiny model trained for ``steps`` steps at lr 3e-3 on the corpus, in eval mode: the base
    of the experiments that need a model that already knows something. Trained once per process."""
    model = GPTModel(TINY)
    model.load_state_dict(_pretrained_state(steps))
    return model.eval()


@torch.no_grad()
def evaluate(model: nn.Module, data: GPTDataset, batch_size: int = 64) -> float:
    """The mean next-token loss over every window of ``data``, in order, in eval mode (the model's
    mode is restored after, so a run can be evaluated as it trains)."""
    was_training = model.training
    model.eval()
    total = 0.0
    for start in range(0, len(data), batch_size):
        inputs, targets = data.batch(torch.arange(start, min(start + batch_size, len(data))))
        total += cross_entropy(model(inputs), targets).item() * len(inputs)
    model.train(was_training)
    return total / len(data)


def validation(model: nn.Module, losses: list[float], val_set: GPTDataset) -> str:
    """The validation loss after a run, or, where the run's loss diverged and the optimizer step
    stopped it, the step it stopped at (its weights are the last ones before it diverged)."""
    if math.isnan(losses[-1]):
        return f"stopped at step {next(i for i, x in enumerate(losses) if math.isnan(x)) + 1}"
    return fmt(evaluate(model, val_set))


def mean_loss(losses: list[float], first: int, last: int) -> str:
    """The mean loss of steps ``first`` to ``last`` (counted from 1), as the tables print it."""
    return fmt(sum(losses[first - 1 : last]) / (last - first + 1))


def fmt(loss: float) -> str:
    """A loss as the tables print it."""
    return "diverged (NaN)" if math.isnan(loss) else f"{loss:.2f}"
