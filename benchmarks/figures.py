"""Draw the book's diagrams as SVG files, so that pages need no diagram library at view time.

A diagram is a set of boxes placed on a grid (row, column) and arrows between them: the shape of a
tensor as it flows through a component, for example. The output is plain SVG that any browser shows
offline, written to ``docs/assets/diagrams/``.

    uv run python benchmarks/figures.py
"""

import argparse
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "docs" / "assets" / "diagrams"
BOX_W, BOX_H, ROW_STEP, COL_STEP = 2.6, 0.62, 1.1, 2.9
COLORS = {"data": "#e3f2fd", "op": "#fff3e0", "param": "#e8f5e9", "note": "#f3e5f5"}


@dataclass(frozen=True)
class Box:
    text: str  # a second line usually gives the tensor's shape
    kind: str  # a key of COLORS: data, op, param or note
    row: float
    col: float


def draw(boxes: dict[str, Box], edges: list[tuple[str, str]], path: Path) -> None:
    """Draw the boxes on their grid and an arrow from the bottom of ``a`` to the top of ``b`` for
    every edge ``(a, b)``."""
    n_rows = max(b.row for b in boxes.values()) + 1
    n_cols = max(b.col for b in boxes.values()) + 1
    fig_w, fig_h = n_cols * COL_STEP, n_rows * ROW_STEP
    fig, ax = plt.subplots(figsize=(fig_w, fig_h))
    ax.set_xlim(0, fig_w)
    ax.set_ylim(0, fig_h)
    ax.axis("off")

    def centre(box: Box) -> tuple[float, float]:
        return (box.col + 0.5) * COL_STEP, fig_h - (box.row + 0.5) * ROW_STEP

    for box in boxes.values():
        x, y = centre(box)
        ax.add_patch(
            FancyBboxPatch(
                (x - BOX_W / 2, y - BOX_H / 2),
                BOX_W,
                BOX_H,
                boxstyle="round,pad=0.02,rounding_size=0.08",
                facecolor=COLORS[box.kind],
                edgecolor="#455a64",
                linewidth=1.0,
            )
        )
        ax.text(x, y, box.text, ha="center", va="center", fontsize=9, family="monospace")
    for a, b in edges:
        (xa, ya), (xb, yb) = centre(boxes[a]), centre(boxes[b])
        ax.add_patch(
            FancyArrowPatch(
                (xa, ya - BOX_H / 2),
                (xb, yb + BOX_H / 2),
                arrowstyle="-|>",
                mutation_scale=10,
                color="#455a64",
                linewidth=1.0,
            )
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    # Fixed metadata and hash salt: regenerating an unchanged diagram gives the same bytes.
    plt.rcParams["svg.hashsalt"] = "gpt-from-scratch"
    fig.savefig(path, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)


def chain(*names: str) -> list[tuple[str, str]]:
    """Edges a -> b -> c -> ... along a straight path."""
    return list(zip(names, names[1:], strict=False))


DIAGRAMS: dict[str, tuple[dict[str, Box], list[tuple[str, str]]]] = {
    "attention": (
        {
            "x": Box("x\n(B, T, d_in)", "data", 0, 1),
            "Wq": Box("W_query", "param", 1, 0),
            "Wk": Box("W_key", "param", 1, 1),
            "Wv": Box("W_value", "param", 1, 2),
            "q": Box("q\n(B, H, T, hd)", "data", 2, 0),
            "k": Box("k\n(B, H, T, hd)", "data", 2, 1),
            "v": Box("v\n(B, H, T, hd)", "data", 2, 2),
            "scores": Box("scores = q @ k^T\n(B, H, T, T)", "op", 3, 0.5),
            "softmax": Box("scale, causal mask,\nsoftmax (B, H, T, T)", "op", 4, 0.5),
            "mix": Box("weights @ v\n(B, H, T, hd)", "op", 5, 1.25),
            "merge": Box("merge heads\n(B, T, d_out)", "data", 6, 1.25),
            "out": Box("out_proj\n(B, T, d_out)", "param", 7, 1.25),
        },
        [("x", "Wq"), ("x", "Wk"), ("x", "Wv"), ("Wq", "q"), ("Wk", "k"), ("Wv", "v")]
        + [("q", "scores"), ("k", "scores"), ("v", "mix")]
        + chain("scores", "softmax", "mix", "merge", "out"),
    ),
    "model": (
        {
            "ids": Box("token ids\n(B, T)", "data", 0, 0.5),
            "tok": Box("tok_emb\n(B, T, emb_dim)", "param", 1, 0),
            "pos": Box("pos_emb\n(T, emb_dim)", "param", 1, 1),
            "sum": Box("sum + dropout\n(B, T, emb_dim)", "op", 2, 0.5),
            "att": Box("x + attn(norm1(x))", "op", 3, 0.5),
            "ff": Box("x + ff(norm2(x))", "op", 4, 0.5),
            "more": Box("... n_layers blocks ...", "note", 5, 0.5),
            "norm": Box("final_norm", "op", 6, 0.5),
            "head": Box("out_head\n(B, T, vocab_size)", "param", 7, 0.5),
        },
        [("ids", "tok"), ("ids", "pos"), ("tok", "sum"), ("pos", "sum")]
        + chain("sum", "att", "ff", "more", "norm", "head"),
    ),
    "data-pipeline": (
        {
            "text": Box("corpus text", "data", 0, 0.5),
            "enc": Box("tokenizer.encode", "op", 1, 0.5),
            "file": Box("token file\n(uint16 memmap, cached)", "data", 2, 0.5),
            "train": Box("train tokens\n(first 90%)", "data", 3, 0),
            "val": Box("val tokens\n(last 10%)", "data", 3, 1),
            "tw": Box("windows of T + 1\n(stride apart)", "op", 4, 0),
            "vw": Box("windows of T + 1\n(stride apart)", "op", 4, 1),
            "tb": Box("x = w[:-1], y = w[1:]\n(B, T) each", "data", 5, 0),
            "vb": Box("x, y\n(B, T) each", "data", 5, 1),
        },
        chain("text", "enc", "file")
        + [("file", "train"), ("file", "val")]
        + chain("train", "tw", "tb")
        + chain("val", "vw", "vb"),
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help=f"output folder (default {OUT})")
    args = parser.parse_args()
    for name, (boxes, edges) in DIAGRAMS.items():
        path = args.out / f"{name}.svg"
        draw(boxes, edges, path)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
