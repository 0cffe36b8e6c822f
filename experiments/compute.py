"""Break it, chapter "Compute and scaling laws": a model far too big for its data; Muon on the
embeddings and the head too.

The first trains the quick lab's smallest budget again (the same models, steps and schedules) on
8,192 distinct training tokens, read over and over, beside the lab's runs, which never read a token
twice; the lab's runs come from its cache (``runs/scaling-quick``) when it has been run. The second
trains the tiny model with Muon as ``src.training.muon`` applies it (the blocks' matrices; AdamW for
the embeddings, the head and the vectors) and with Muon on every matrix, at two learning rates.
"""

import math
from pathlib import Path

import torch

from benchmarks.harness import markdown_table
from experiments import scaling
from experiments.harness import (
    TINY,
    batches,
    corpus_windows,
    evaluate,
    fmt,
    next_token_loss,
    training,
)
from src.model import GPTModel
from src.training import Muon, muon

RUNS = Path(__file__).resolve().parent.parent / "runs" / "scaling-quick"


# --8<-- [start:too-big-for-its-data]
DISTINCT_TOKENS = 8_192  # of the corpus's 12.8 million training tokens


def too_big_for_its_data() -> str:
    """The quick lab's smallest budget, each model trained on 8,192 tokens seen again and again."""
    return scaling.too_little_data(scaling.QUICK, RUNS, jobs=1, distinct=DISTINCT_TOKENS)


# --8<-- [end:too-big-for-its-data]


# --8<-- [start:muon-everywhere]
def muon_everywhere(model: torch.nn.Module, lr: float, weight_decay: float) -> Muon:
    """Muon on every matrix of the model: the token and position embeddings and the head too."""
    matrices = [p for p in model.parameters() if p.dim() == 2]  # tok_emb, pos_emb, out_head too
    vectors = [p for p in model.parameters() if p.dim() < 2]
    return Muon([{"params": matrices, "weight_decay": weight_decay, "muon": True},
                 {"params": vectors, "weight_decay": 0.0}], lr=lr)  # fmt: skip


# --8<-- [end:muon-everywhere]

RATES = (3e-3, 1e-2)  # around the rate at which Muon trains the tiny model best
SHOWN = (0, 25, 50, 100, 200, 300)  # the steps at which the table shows the validation loss


def curve(make_optimizer, lr: float, steps: int = SHOWN[-1]) -> dict[int, float]:
    """The tiny model's validation loss at the steps ``SHOWN``, trained with ``make_optimizer``."""
    train_set, val_set = corpus_windows()
    torch.manual_seed(0)
    model = GPTModel(TINY)
    losses = {0: evaluate(model, val_set)}
    run = training(model, next_token_loss(model), batches(train_set), steps, lr, warmup=10,
                   make_optimizer=make_optimizer)  # fmt: skip
    for step, loss in run:
        if step in SHOWN:
            losses[step] = loss if math.isnan(loss) else evaluate(model, val_set)  # NaN: diverged
    return losses


def muon_everywhere_experiment() -> str:
    """Muon on the blocks' matrices against Muon on every matrix, at two learning rates."""
    columns = {(name, lr): curve(make, lr) for lr in RATES
               for name, make in (("blocks", muon), ("everywhere", muon_everywhere))}  # fmt: skip
    header = ["step"] + [f"lr {lr:g}, Muon on {'the blocks' if name == 'blocks' else 'every matrix'}"
                         for name, lr in columns]  # fmt: skip
    rows = [
        [str(step)] + [fmt(c.get(step, float("nan"))) for c in columns.values()] for step in SHOWN
    ]
    return markdown_table(header, rows)


EXPERIMENTS = {"too-big-for-its-data": too_big_for_its_data,
               "muon-everywhere": muon_everywhere_experiment}  # fmt: skip
