"""Run the "Break it" experiments and write their tables where the chapters include them.

    uv run python -m experiments                 # all of them, tens of minutes on 2 cores
    uv run python -m experiments no-scale        # one, by name
    uv run python -m experiments --list          # the names, by chapter

Models are tiny and runs short: the point is the contrast between the rows, not the loss. One thread
by default: tiny models gain little from more, and one thread gives the same numbers on every run.
"""

import importlib
import sys
import time
from pathlib import Path

import torch

from src.cli import Parser, positive_int, run_command
from src.errors import UserError
from src.files import write_atomically

OUT = Path(__file__).resolve().parent.parent / "docs" / "assets" / "break-it"
# The chapters in the book's order: docs/<chapter>.md, experiments/<chapter with _>.py.
CHAPTERS = ["tokens", "batches", "attention", "fused-softmax", "flash-attention", "model",
            "pretraining", "compute", "generating", "gpt2-weights", "modern", "classification",
            "instructions", "lora", "scaling-out", "small-and-fast"]  # fmt: skip


def all_experiments() -> dict[str, tuple[str, object]]:
    """Every experiment by name: its chapter and the function that runs it."""
    found = {}
    for chapter in CHAPTERS:
        module = importlib.import_module(f"experiments.{chapter.replace('-', '_')}")
        found.update({name: (chapter, run) for name, run in module.EXPERIMENTS.items()})
    return found


def parser() -> Parser:
    p = Parser(prog="python -m experiments", description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", metavar="NAME", help="experiments to run (default: all)")
    p.add_argument("--list", action="store_true", help="list the experiments by chapter and exit")
    p.add_argument("--threads", type=positive_int, default=1, help="CPU threads")
    p.add_argument("--out", type=Path, default=OUT, help="output folder")
    return p


def run(args) -> None:
    known = all_experiments()
    if args.list:
        for name, (chapter, experiment) in known.items():
            summary = " ".join(experiment.__doc__.split("\n\n")[0].split())
            print(f"{name:24} {chapter:15} {summary}")
        return
    unknown = [name for name in args.names if name not in known]
    if unknown:
        raise UserError(f"unknown experiment {unknown[0]!r}; see python -m experiments --list")
    torch.set_num_threads(args.threads)
    for name in args.names or known:
        start = time.perf_counter()
        table = known[name][1]()
        made_by = f"*Made by `uv run python -m experiments {name}`.*"
        write_atomically(args.out / f"{name}.md", f"{table}\n\n{made_by}\n")
        print(f"{name} ({time.perf_counter() - start:.0f} s)\n{table}\n", flush=True)


if __name__ == "__main__":
    sys.exit(run_command(parser(), run, sys.argv[1:]))
