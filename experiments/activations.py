"""GELU against ReLU in the feed-forward network: the numbers of the model chapter's GELU section.

Two tables, written to ``docs/assets/gelu-vs-relu.md``, which the chapter includes:

- both functions and their slopes at a few inputs, computed by autograd;
- the tiny model (``cpu-tiny``: 2 layers, 64 wide) with GELU, as built, and with ReLU in every
  feed-forward network, untrained and after 500 steps of the book's minimal loop on the default
  corpus, for two seeds each: the losses, and what the hidden units of the feed-forward networks do
  on 1,024 held-out tokens (how many inputs fall below zero, how many pass no gradient back, how
  many units pass none for any token). Same learning rate for both, tuned for neither.

    uv run python experiments/activations.py      # a few minutes on a laptop CPU
"""

import argparse
import contextlib
import io
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere
from benchmarks.harness import markdown_table
from src.data import GPTDataset, load_corpus, split_tokens, tokenize_cached, train_tokenizer_cached
from src.files import cache_dir
from src.model import GELU, PRESETS, GPTModel
from src.train import train_minimal
from src.training import cross_entropy

OUT = Path(__file__).resolve().parent.parent / "docs" / "assets" / "gelu-vs-relu.md"
TINY = PRESETS["cpu-tiny"]  # 2 layers, 64 wide, 1,024 tokens of vocabulary, 64 of context
STEPS, BATCH, LR = 500, 16, 3e-3


def datasets() -> tuple[GPTDataset, GPTDataset]:
    """Training and validation windows of the default corpus, with a BPE of TINY's vocabulary."""
    corpus = load_corpus()
    tokenizer = train_tokenizer_cached(corpus, TINY.vocab_size, cache_dir())
    train, val = split_tokens(tokenize_cached(corpus, tokenizer, cache_dir()))
    T = TINY.context_length
    return GPTDataset(train, T, stride=T), GPTDataset(val, T, stride=T)


def held_out(val: GPTDataset) -> tuple[torch.Tensor, torch.Tensor]:
    """16 validation windows spread over the split: 1,024 tokens."""
    return val.batch(torch.linspace(0, len(val) - 1, 16).long())


def slopes() -> str:
    """GELU and ReLU, and their derivatives, at a few inputs."""
    x = torch.tensor([-3.0, -1.0, -0.5, 0.5, 1.0, 3.0], dtype=torch.float64, requires_grad=True)
    rows = {}
    for name, f in (("GELU", GELU()), ("ReLU", nn.ReLU())):
        y = f(x)
        (slope,) = torch.autograd.grad(y.sum(), x)
        rows[name] = (y.detach(), slope)
    return markdown_table(
        ["x", "GELU(x)", "slope of GELU", "ReLU(x)", "slope of ReLU"],
        [
            [f"{x[i]:g}"] + [f"{v[i]:.3f}" for name in rows for v in rows[name]]
            for i in range(len(x))
        ],
    )


def use_relu(model: GPTModel) -> None:
    """Swap every GELU of the model for a ReLU, wherever it sits."""
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, GELU):
                setattr(module, name, nn.ReLU())


@torch.no_grad()
def hidden_inputs(model: GPTModel, x: torch.Tensor) -> torch.Tensor:
    """The inputs of every feed-forward activation for the batch ``x``: (layers, tokens, units)."""
    seen = []
    hooks = [
        module.register_forward_pre_hook(lambda _, args: seen.append(args[0].flatten(0, -2)))
        for module in model.modules()
        if isinstance(module, (GELU, nn.ReLU))
    ]
    model(x)
    for hook in hooks:
        hook.remove()
    return torch.stack(seen)


def units(activation: nn.Module, h: torch.Tensor) -> list[str]:
    """Below zero, gradient exactly zero (per input), and units passing no gradient on any token."""
    h = h.clone().requires_grad_()
    (grad,) = torch.autograd.grad(activation(h).sum(), h)
    no_grad = grad == 0  # (layers, tokens, units)
    return [
        f"{(h < 0).float().mean():.1%}",
        f"{no_grad.float().mean():.1%}",
        f"{no_grad.all(dim=1).sum().item()} of {h.shape[0] * h.shape[2]}",
    ]


def row(name: str, activation: nn.Module, model: GPTModel, steps: int, seed: int, losses: list[float],
        x: torch.Tensor, y: torch.Tensor) -> list[str]:  # fmt: skip
    model.eval()
    with torch.no_grad():
        val_loss = cross_entropy(model(x), y).item()
    train_loss = f"{np.mean(losses[-20:]):.3f}" if losses else "(untrained)"
    return [name, str(seed), str(steps), train_loss, f"{val_loss:.3f}"] + units(
        activation, hidden_inputs(model, x)
    )


def training() -> str:
    """The tiny model with each activation, untrained and trained, two seeds each."""
    train_set, val_set = datasets()
    x, y = held_out(val_set)
    rows = []
    for name, activation in (("GELU (as built)", GELU()), ("ReLU", nn.ReLU())):
        for seed in (0, 1):
            torch.manual_seed(seed)
            model = GPTModel(TINY)
            if isinstance(activation, nn.ReLU):
                use_relu(model)
            if seed == 0:
                rows.append(row(name, activation, model, 0, seed, [], x, y))
            with contextlib.redirect_stdout(io.StringIO()):  # its progress lines
                losses = train_minimal(model, train_set, val_set, STEPS, BATCH, LR, seed=seed)
            rows.append(row(name, activation, model, STEPS, seed, losses, x, y))
    return markdown_table(
        [
            "activation",
            "seed",
            "steps",
            "train loss, last 20 steps",
            "validation loss",
            "hidden inputs below zero",
            "hidden inputs passing no gradient",
            "units passing no gradient on any of 1,024 tokens",
        ],
        rows,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help=f"output file (default {OUT})")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    result = f"{slopes()}\n\n{training()}"
    note = "\n\n*Made by `uv run python experiments/activations.py`.*\n"
    args.out.write_text(result + note, encoding="utf-8")
    print(f"{result}\n({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
