"""The book's training curves, drawn from runs' ``metrics.jsonl``, with published reference points.

    uv run python benchmarks/curves.py runs/verdict --reference verdict  # the chapter-5 experiment
    uv run python benchmarks/curves.py runs/default                       # the default run

Writes ``docs/assets/<run name>-curve.png`` and ``docs/assets/<run name>-curve.md``, a Markdown table
of the evaluations (with the published points beside ours when there are some), which the chapter
includes.
"""

import argparse
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from src.training import read_jsonl

ASSETS = Path(__file__).resolve().parent.parent / "docs" / "assets"

# The book's chapter-5 run on "The Verdict" (its companion code's saved output): the loss of the
# untrained model, the last evaluation (step 85 of 90) and the best validation loss.
REFERENCES = {
    "verdict": {"start": 10.98, "end_train": 0.57, "end_val": 6.37, "end_step": 85, "best_val": 6.1}
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a run folder holding metrics.jsonl")
    parser.add_argument("--reference", choices=list(REFERENCES), help="published points to add")
    args = parser.parse_args()
    rows = [r for r in read_jsonl(args.run / "metrics.jsonl") if "val_loss" in r]
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    ax.plot(steps, [r["eval_train_loss"] for r in rows], "o-", ms=3, label="ours: training")
    ax.plot(steps, [r["val_loss"] for r in rows], "s-", ms=3, label="ours: validation")
    if args.reference:
        ref = REFERENCES[args.reference]
        ax.plot([0], [ref["start"]], "k^", label="published: start")
        ax.plot([ref["end_step"]], [ref["end_train"]], "kv", label="published: end, training")
        ax.plot([ref["end_step"]], [ref["end_val"]], "kD", label="published: end, validation")
        ax.axhline(ref["best_val"], color="k", ls=":", lw=1, label="published: best validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    ASSETS.mkdir(parents=True, exist_ok=True)
    out = ASSETS / f"{args.run.name}-curve.png"
    fig.savefig(out, dpi=110)
    command = f"uv run python benchmarks/curves.py runs/{args.run.name}" + (
        f" --reference {args.reference}" if args.reference else ""
    )
    markdown = evaluations_table(rows, command)
    if args.reference:
        markdown = reference_table(rows, REFERENCES[args.reference]) + "\n" + markdown
    table_path = out.with_suffix(".md")
    table_path.write_text(markdown)
    print(markdown)
    print(f"wrote {out} and {table_path}")


def evaluations_table(rows: list[dict], command: str) -> str:
    """Every evaluation of the run: step, losses on fixed batches, and validation perplexity."""
    lines = [
        "| step | training loss (fixed batches) | validation loss | validation perplexity |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        ppl = f"{r['val_perplexity']:,.0f}" if math.isfinite(r["val_perplexity"]) else "inf"
        lines.append(f"| {r['step']} | {r['eval_train_loss']:.2f} | {r['val_loss']:.2f} | {ppl} |")
    best = min(rows, key=lambda r: r["val_loss"])
    lines.append("")
    lines.append(f"Best validation loss {best['val_loss']:.2f} at step {best['step']}.")
    lines.append("")
    lines.append(f"*Made by `{command}`.*")
    return "\n".join(lines) + "\n"


def reference_table(rows: list[dict], ref: dict) -> str:
    """Our run beside the published points: the start, the end and the best validation loss."""
    by_step = {r["step"]: r for r in rows}
    first, last, at_ref = rows[0], rows[-1], by_step.get(ref["end_step"])
    best = min(rows, key=lambda r: r["val_loss"])

    def at_end(key: str) -> str:
        ours = f"{last[key]:.2f}"
        return ours if at_ref is None else f"{at_ref[key]:.2f} / {ours}"

    end = f"step {ref['end_step']}" + ("" if at_ref is None else f" / {last['step']}")
    return "\n".join([
        "| | published (book) | ours |",
        "| --- | ---: | ---: |",
        f"| loss of the untrained model | {ref['start']:.2f} | "
        f"{first['eval_train_loss']:.2f} training / {first['val_loss']:.2f} validation |",
        f"| validation loss at the end ({end}) | {ref['end_val']:.2f} | {at_end('val_loss')} |",
        f"| best validation loss | ~{ref['best_val']:.1f} | {best['val_loss']:.2f} (step {best['step']}) |",
        f"| training loss at the end ({end}) | {ref['end_train']:.2f} | {at_end('eval_train_loss')} |",
    ]) + "\n"  # fmt: skip


if __name__ == "__main__":
    main()
