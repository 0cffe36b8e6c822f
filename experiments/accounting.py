"""The accounting of ``src/flops.py`` checked, for the chapter: FLOPs, memory, and the MFU of a run.

    uv run python experiments/accounting.py                  # after `uv run python -m src.train`

- **FLOPs**: ``training_flops_per_token`` beside what PyTorch's ``FlopCounterMode`` counts in a real
  forward and backward pass of each preset (on the meta device: shapes, no arithmetic), and the
  rule of thumb 6N.
- **Memory**: ``training_memory`` beside the peak that ``PeakMemory`` measures in a real second
  training step (the first one creates AdamW's moments), for a few shapes up to GPT-2 small.
- **MFU**: the median model FLOPs utilisation of the default run (``runs/default``), and the peak
  matmul rate it is measured against.

Writes ``docs/assets/accounting/{flops,memory,mfu}.md``.
"""

import argparse
import statistics
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere
from src import train as trainer
from src.cli import read_jsonl
from src.flops import (
    PeakMemory,
    peak_matmul_flops,
    six_n_flops_per_token,
    training_flops_per_token,
    training_memory,
)
from src.model import PRESETS, GPTConfig, GPTModel
from src.training import adamw, cross_entropy

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "docs" / "assets" / "accounting"
MADE_BY = "\n*Made by `uv run python experiments/accounting.py`.*\n"


def counted(cfg: GPTConfig) -> float:
    """FLOPs per token that ``FlopCounterMode`` counts in one forward and backward pass."""
    with torch.device("meta"):
        model = GPTModel(cfg)
        idx = torch.zeros(1, cfg.context_length, dtype=torch.long)
    counter = FlopCounterMode(display=False)
    with counter:
        cross_entropy(model(idx), idx).backward()
    return counter.get_total_flops() / cfg.context_length


def flops_table() -> str:
    lines = ["| preset | context | ours (FLOPs per token) | FlopCounterMode | ours / counter | 6N "
             "| 6N / ours |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for name, cfg in PRESETS.items():
        ours, theirs, rule = training_flops_per_token(cfg), counted(cfg), six_n_flops_per_token(cfg)
        lines.append(f"| {name} | {cfg.context_length:,} | {ours:,} | {theirs:,.0f} | "
                     f"{ours / theirs:.4f} | {rule:,} | {rule / ours:.3f} |")  # fmt: skip
    return "\n".join(lines) + "\n" + MADE_BY


def measured_peak(cfg: GPTConfig, batch_size: int, checkpointing: bool) -> int:
    """The weights and AdamW's moments, plus the most a second training step allocates."""
    torch.manual_seed(0)
    model = GPTModel(cfg)
    if checkpointing:
        trainer.checkpoint_blocks(model)
    optimizer = adamw(model, 1e-3, 0.1)
    x, y = (torch.randint(0, cfg.vocab_size, (batch_size, cfg.context_length)) for _ in "xy")

    def step():
        cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    held = sum(p.nbytes for p in model.parameters())
    held += sum(v.nbytes for s in optimizer.state.values() for v in s.values())
    with PeakMemory() as memory:
        step()
    return held + memory.peak


MEMORY_CASES = [  # (what, config, batch size, activation checkpointing)
    ("cpu-small (the default run)", GPTConfig.from_preset("cpu-small"), 8, False),
    ("cpu-small, checkpointing", GPTConfig.from_preset("cpu-small"), 8, True),
    ("cpu-small, dropout 0.1", GPTConfig.from_preset("cpu-small", drop_rate=0.1), 8, False),
    ("gpt2-small, context 256", GPTConfig.from_preset("gpt2-small", context_length=256), 1, False),
]


def mib(n: int) -> str:
    return f"{n / 2**20:,.1f}"


def memory_table() -> str:
    lines = ["| model | batch | weights | gradients | AdamW | activations | logits' gradients | "
             "estimated peak | measured peak | estimate / measured |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for what, cfg, batch, checkpointing in MEMORY_CASES:
        e = training_memory(cfg, batch, checkpointing)
        measured = measured_peak(cfg, batch, checkpointing)
        lines.append(f"| {what} | {batch} | {mib(e.weights)} | {mib(e.gradients)} | "
                     f"{mib(e.optimizer)} | {mib(e.activations)} | {mib(e.logits_grads)} | "
                     f"{mib(e.peak)} | {mib(measured)} | {e.peak / measured:.3f} |")  # fmt: skip
    return "\n".join(lines) + "\n\nAll in MiB, float32, eager attention.\n" + MADE_BY


def mfu_table(run: Path) -> str:
    """The default run's speed and MFU, from its metrics (every step after the first)."""
    rows = [r for r in read_jsonl(run / "metrics.jsonl") if r["step"] > 1 and "mfu" in r]
    if not rows:
        sys.exit(
            f"error: {run} has no metrics with MFU; train it first: uv run python -m src.train"
        )
    peak = peak_matmul_flops(torch.device("cpu"), torch.float32)
    cfg = GPTConfig.from_preset("cpu-small")
    tokens = statistics.median(r["tokens_per_sec"] for r in rows)
    fpt = training_flops_per_token(cfg)
    default = run.name == "default"  # else a shorter run, with the default settings otherwise
    steps = rows[-1]["step"]
    trained = "" if default else f" --max-steps {steps} --out-dir runs/{run.name}"
    return (
        "| run folder | steps | FLOPs per token | tokens/s (median) | achieved "
        "| measured fp32 matmul peak | MFU (median) |\n"
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |\n"
        f"| `runs/{run.name}` | {steps} | {fpt / 1e6:.1f} M | {tokens:,.0f} | "
        f"{tokens * fpt / 1e9:.1f} GFLOP/s | {peak / 1e9:.1f} GFLOP/s | "
        f"{statistics.median(r['mfu'] for r in rows):.1%} |\n\n*Made by `uv run python "
        f"experiments/accounting.py{'' if default else ' mfu --run runs/' + run.name}` after "
        f"`uv run python -m src.train{trained}` ({torch.get_num_threads()} threads).*\n"
    )


TABLES = ("flops", "memory", "mfu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tables", nargs="*", metavar="TABLE",
                        help=f"tables to write (default: all): {', '.join(TABLES)}")  # fmt: skip
    parser.add_argument("--run", type=Path, default=REPO / "runs" / "default",
                        help="the run folder whose MFU to report")  # fmt: skip
    args = parser.parse_args()
    for name in args.tables:
        if name not in TABLES:
            parser.error(f"unknown table {name!r}; the tables: {', '.join(TABLES)}")
    OUT.mkdir(parents=True, exist_ok=True)
    makers = {"flops": flops_table, "memory": memory_table, "mfu": lambda: mfu_table(args.run)}
    for name in args.tables or TABLES:
        text = makers[name]()
        (OUT / f"{name}.md").write_text(text, encoding="utf-8")
        print(text)


if __name__ == "__main__":
    main()
