"""The book's training curves, drawn from runs' ``metrics.jsonl``, with published reference points.

    uv run python book/curves.py runs/verdict --reference verdict  # the chapter-5 experiment
    uv run python book/curves.py runs/default                       # the default run

Writes ``docs/assets/<run name>-curve.png`` and ``docs/assets/<run name>-curve.md``, a Markdown table
of the evaluations (with the published points beside ours when there are some), which the chapter
includes.
"""

import io
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.harness import markdown_table
from src.cli import Parser, read_jsonl, run_command
from src.errors import UserError
from src.files import write_atomically

ASSETS = Path(__file__).resolve().parent.parent / "docs" / "assets"

# The book's chapter-5 run on "The Verdict" (its companion code's saved output): the loss of the
# untrained model, the last evaluation (step 85 of 90) and the best validation loss.
REFERENCES = {
    "verdict": {"start": 10.98, "end_train": 0.57, "end_val": 6.37, "end_step": 85, "best_val": 6.1}
}


def parser() -> Parser:
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="a run folder holding metrics.jsonl")
    p.add_argument("--reference", choices=list(REFERENCES), help="published points to add")
    return p


def run(args) -> None:
    rows = [r for r in read_jsonl(args.run / "metrics.jsonl") if "val_loss" in r]
    if not rows:  # checked before anything is drawn: a failed call leaves no figure behind
        found = (
            "has no evaluations"
            if (args.run / "metrics.jsonl").is_file()
            else "holds no metrics.jsonl"
        )
        raise UserError(f"{args.run} {found}; train a run there first (uv run python -m src.train)")
    ref = REFERENCES.get(args.reference)
    command = f"uv run python book/curves.py runs/{args.run.name}" + (
        f" --reference {args.reference}" if args.reference else ""
    )
    markdown = evaluations_table(rows, command)
    if ref:
        markdown = reference_table(rows, ref) + "\n" + markdown
    out = ASSETS / f"{args.run.name}-curve.png"
    write_atomically(out, plot(rows, ref))
    write_atomically(out.with_suffix(".md"), markdown)
    print(markdown)
    print(f"wrote {out} and {out.with_suffix('.md')}")


def plot(rows: list[dict], ref: dict | None) -> bytes:
    """The run's evaluations, and the published points when there are some, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    ax.plot(steps, [r["eval_train_loss"] for r in rows], "o-", ms=3, label="ours: training")
    ax.plot(steps, [r["val_loss"] for r in rows], "s-", ms=3, label="ours: validation")
    if ref:
        ax.plot([0], [ref["start"]], "k^", label="published: start")
        ax.plot([ref["end_step"]], [ref["end_train"]], "kv", label="published: end, training")
        ax.plot([ref["end_step"]], [ref["end_val"]], "kD", label="published: end, validation")
        ax.axhline(ref["best_val"], color="k", ls=":", lw=1, label="published: best validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def evaluations_table(rows: list[dict], command: str) -> str:
    """Every evaluation of the run: step, losses on fixed batches, and validation perplexity."""
    cells = [
        [r["step"], f"{r['eval_train_loss']:.2f}", f"{r['val_loss']:.2f}",
         f"{r['val_perplexity']:,.0f}" if math.isfinite(r["val_perplexity"]) else "inf"]
        for r in rows
    ]  # fmt: skip
    header = ["step", "training loss (fixed batches)", "validation loss", "validation perplexity"]
    best = min(rows, key=lambda r: r["val_loss"])
    return (
        markdown_table(header, cells, align="rrrr")
        + f"\n\nBest validation loss {best['val_loss']:.2f} at step {best['step']}.\n\n"
        + f"*Made by `{command}`.*\n"
    )


def reference_table(rows: list[dict], ref: dict) -> str:
    """Our run beside the published points: the start, the end and the best validation loss."""
    by_step = {r["step"]: r for r in rows}
    first, last, at_ref = rows[0], rows[-1], by_step.get(ref["end_step"])
    best = min(rows, key=lambda r: r["val_loss"])

    def at_end(key: str) -> str:
        ours = f"{last[key]:.2f}"
        return ours if at_ref is None else f"{at_ref[key]:.2f} / {ours}"

    end = f"step {ref['end_step']}" + ("" if at_ref is None else f" / {last['step']}")
    cells = [
        ["loss of the untrained model", f"{ref['start']:.2f}",
         f"{first['eval_train_loss']:.2f} training / {first['val_loss']:.2f} validation"],
        [f"validation loss at the end ({end})", f"{ref['end_val']:.2f}", at_end("val_loss")],
        ["best validation loss", f"~{ref['best_val']:.1f}", f"{best['val_loss']:.2f} (step {best['step']})"],
        [f"training loss at the end ({end})", f"{ref['end_train']:.2f}", at_end("eval_train_loss")],
    ]  # fmt: skip
    return markdown_table(["", "published (book)", "ours"], cells, align="lrr") + "\n"


if __name__ == "__main__":
    sys.exit(run_command(parser(), run, sys.argv[1:]))
