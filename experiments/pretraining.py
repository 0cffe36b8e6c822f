"""Break it, chapter "Pretraining": a learning rate that is too high; too little data.

The first trains a 4-layer model (``emb_dim`` 128) at several learning rates; the second trains the
tiny model over and over on a few thousand tokens and watches the validation loss.
"""

import torch

from benchmarks.harness import markdown_table
from experiments.harness import (
    TINY,
    batches,
    corpus_tokens,
    corpus_windows,
    evaluate,
    fmt,
    next_token_loss,
    pretrain,
    tiny,
    training,
    validation,
    windows,
)
from src.model import GPTModel

# --8<-- [start:learning-rate]
RATES = ((1e-3, 0), (3e-2, 0), (3e-2, 100), (3e-1, 100))  # (peak learning rate, warmup steps)
# --8<-- [end:learning-rate]


def learning_rate(rates: tuple[tuple[float, int], ...] = RATES, steps: int = 300) -> str:
    """The same model at three learning rates, with and without warmup."""
    train_set, val_set = corpus_windows()
    rows = []
    for lr, warmup in rates:
        torch.manual_seed(0)
        model = GPTModel(tiny(n_layers=4, emb_dim=128, n_heads=4))
        losses = pretrain(model, train_set, steps, lr, warmup)
        rows.append([f"{lr:g}", str(warmup), fmt(max(losses[:50])),
                     fmt(sum(losses[-20:]) / 20), validation(model, losses, val_set)])  # fmt: skip
    header = ["lr", "warmup steps", "worst loss, first 50 steps", "final train loss", "validation"]
    return markdown_table(header, rows)


# --8<-- [start:overfitting]
def too_little_data(train_tokens, n_tokens: int = 4096):
    """The first ``n_tokens`` targets of the training split and nothing else: 64 windows of 64."""
    return windows(train_tokens[: n_tokens + 1])  # + 1: the last window's last target


# --8<-- [end:overfitting]


def overfitting(steps: int = 400, lr: float = 3e-3) -> str:
    """Train the tiny model for 400 steps on a slice of 4,096 tokens; evaluate on held-out text."""
    train_tokens, val_tokens = corpus_tokens()
    few, val_set = too_little_data(train_tokens), windows(val_tokens)
    torch.manual_seed(0)
    model = GPTModel(TINY)
    evaluations = [(0, evaluate(model, few), evaluate(model, val_set))]
    for step, _ in training(model, next_token_loss(model), batches(few), steps, lr):
        if step % 10 == 0:
            evaluations.append((step, evaluate(model, few), evaluate(model, val_set)))
    best = min(evaluations, key=lambda e: e[2])[0]
    shown = [e for e in evaluations if e[0] in (0, 20, 100, steps // 2, steps) or e[0] == best]
    return markdown_table(
        ["step", f"train loss (on the {len(few) * TINY.context_length:,} tokens)",
         "validation loss", ""],
        [[str(s), fmt(t), fmt(v), "best validation" if s == best else ""] for s, t, v in shown],
    )  # fmt: skip


EXPERIMENTS = {"learning-rate": learning_rate, "overfitting": overfitting}
