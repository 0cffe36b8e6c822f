"""The book's training curves, drawn from runs' ``metrics.jsonl``, with published reference points.

    uv run python benchmarks/curves.py runs/verdict --reference verdict  # the chapter-5 experiment
    uv run python benchmarks/curves.py runs/default                       # the default run

Writes ``docs/assets/<run name>-curve.png`` and prints a Markdown table of the evaluations.
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
    print("| step | training loss | validation loss | validation perplexity |")
    print("| ---: | ---: | ---: | ---: |")
    for r in rows:
        ppl = r["val_perplexity"] if math.isfinite(r["val_perplexity"]) else float("inf")
        print(f"| {r['step']} | {r['eval_train_loss']:.2f} | {r['val_loss']:.2f} | {ppl:,.1f} |")
    best = min(rows, key=lambda r: r["val_loss"])
    print(f"\nbest validation loss {best['val_loss']:.2f} at step {best['step']}; wrote {out}")


if __name__ == "__main__":
    main()
