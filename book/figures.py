"""Draw the book's diagrams as SVG files, so that pages need no diagram library at view time.

A diagram is a set of boxes placed on a grid (row, column) and arrows between them: the shape of a
tensor as it flows through a component, for example. The output is plain SVG that any browser shows
offline, written to ``docs/assets/diagrams/``.

    uv run python book/figures.py
"""

import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Polygon, Rectangle  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from src.cli import Parser  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "docs" / "assets" / "diagrams"
BOX_W, BOX_H, ROW_STEP, COL_STEP = 2.6, 0.62, 1.1, 2.9
# Trained parameters are green; "frozen" is for parameters that exist but do not train.
COLORS = {
    "data": "#e3f2fd",
    "op": "#fff3e0",
    "param": "#e8f5e9",
    "frozen": "#eceff1",
    "note": "#f3e5f5",
    "changed": "#fce4ec",  # what a later design does differently (the modern block)
}


@dataclass(frozen=True)
class Box:
    text: str  # a second line usually gives the tensor's shape
    kind: str  # a key of COLORS: data, op, param, frozen or note
    row: float
    col: float
    width: float = BOX_W  # wider for a long line


# An arrow from box a to box b, optionally with a label beside its middle: (a, b) or (a, b, label).
Edge = tuple[str, str] | tuple[str, str, str]


def draw(boxes: dict[str, Box], edges: list[Edge], path: Path) -> None:
    """Draw the boxes on their grid and an arrow from the bottom of ``a`` to the top of ``b`` for
    every edge ``(a, b)``; an edge ``(a, b, label)`` also writes ``label`` to the right of the
    arrow's middle."""
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
                (x - box.width / 2, y - BOX_H / 2),
                box.width,
                BOX_H,
                boxstyle="round,pad=0.02,rounding_size=0.08",
                facecolor=COLORS[box.kind],
                edgecolor="#455a64",
                linewidth=1.0,
            )
        )
        ax.text(x, y, box.text, ha="center", va="center", fontsize=9, family="monospace")
    for a, b, *label in edges:
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
        if label:
            x, y = (xa + xb) / 2 + 0.1, (ya + yb) / 2
            ax.text(x, y, label[0], ha="left", va="center", fontsize=8, family="monospace")
    path.parent.mkdir(parents=True, exist_ok=True)
    # Fixed metadata and hash salt: regenerating an unchanged diagram gives the same bytes.
    plt.rcParams["svg.hashsalt"] = "gpt-from-scratch"
    fig.savefig(path, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)


def chain(*names: str) -> list[Edge]:
    """Edges a -> b -> c -> ... along a straight path."""
    return list(zip(names, names[1:], strict=False))


# instruct.collate on one example in a batch whose longest example has 8 ids (T = 7): prompt
# p0 p1 p2 (prompt_length = 3), response r0 r1, one end-of-text. Each token is a narrow cell; column
# j is position j. Green targets count in the loss, grey ones are -100 (IGNORE_INDEX).
def _instruct_cells() -> tuple[dict[str, Box], list[Edge]]:
    rows = {
        "ids": ("ids = encode_example(...)", "p0 p1 p2 r0 r1 eot"),
        "inputs": ("inputs = ids[:-1]", "p0 p1 p2 r0 r1 pad pad"),
        "targets": ("targets = ids[1:]", "p1 p2 r0 r1 eot -100 -100"),
        "masked": ("targets, --mask-prompt", "-100 -100 r0 r1 eot -100 -100"),
    }
    boxes = {}
    for row, (name, (label, cells)) in enumerate(rows.items()):
        boxes[name] = Box(label, "note", row, 0)
        for j, cell in enumerate(cells.split()):
            kind = "data" if row < 2 else "frozen" if cell == "-100" else "param"
            boxes[f"{name}{j}"] = Box(cell, kind, row, 0.62 + 0.35 * j, 0.85)
    boxes["legend"] = Box(
        "p: prompt (prompt_length = 3), r: response, eot: <|endoftext|>, pad: pad_id (eot too)\n"
        "green targets count in the loss; -100 (IGNORE_INDEX, grey) is skipped by cross_entropy",
        "note",
        4,
        1.21,
        9.6,
    )
    # The model at position j is trained to predict targets[j], the token after inputs[j].
    return boxes, [(f"inputs{j}", f"targets{j}") for j in range(7)]


# One round of speculative decoding with k = 4 draft tokens, in which the third is rejected
# (src/generate.py: speculative_rounds, accept_or_resample). Green: kept; grey: thrown away.
def _speculative_round() -> tuple[dict[str, Box], list[Edge]]:
    boxes = {
        "text": Box("the text so far: ... x_n\n(both caches hold it)", "data", 0, 1.5, 4.0),
        "draft": Box("draft: 4 cheap steps, one token each\nd1 d2 d3 d4, drawn from q (4, V)",
                     "op", 1, 1.5, 5.6),
        "target": Box("target: ONE pass over x_n d1 d2 d3 d4\np at the 5 positions (5, V)",
                      "op", 2, 1.5, 5.6),
        "d1": Box("d1 kept\nu1 < p1(d1) / q1(d1)", "param", 3, 0),
        "d2": Box("d2 kept\nu2 < p2(d2) / q2(d2)", "param", 3, 1),
        "d3": Box("d3 rejected\nu3 >= p3(d3) / q3(d3)", "frozen", 3, 2),
        "d4": Box("d4 dropped\n(after a rejection)", "frozen", 3, 3),
        "r3": Box("r3 drawn from\nmax(0, p3 - q3) / sum", "op", 4, 2),
        "new": Box("new tokens: d1 d2 r3\n3 for 1 target pass", "note", 5, 1),
        "rewind": Box("both caches rewind:\nd3, d4 forgotten", "note", 5, 3),
        "greedy": Box("greedy: d_i kept while it equals argmax p_i;\n"
                      "all 4 kept: a 5th token from p5, free", "note", 6, 1.5, 5.6),
    }  # fmt: skip
    edges = chain("text", "draft", "target") + [("target", d) for d in ("d1", "d2", "d3", "d4")]
    return boxes, edges + [("d3", "r3"), ("d1", "new"), ("d2", "new"), ("r3", "new"),
                           ("d4", "rewind")]  # fmt: skip


# model.py's TransformerBlock with GPT-2's switches (cpu-small) and with every modern switch on
# (cpu-llama), row beside row; pink boxes are what the modern block does differently.
def _modern_block() -> tuple[dict[str, Box], list[Edge]]:
    rows = [
        ("GPT-2 block (cpu-small)", "note", "Llama-style (cpu-llama)", "note"),
        ("tok_emb + pos_emb\nlearned, one per position", "op",
         "tok_emb\nno position table", "changed"),
        ("norm1: LayerNorm\n(x - mean) / std + shift", "op",
         "norm1: RMSNorm\nx / root mean square", "changed"),
        ("q, k, v: 4 heads each\n(GPT-2's have biases)", "op",
         "q: 4 heads; k, v: 2 heads\ngrouped-query attention", "changed"),
        ("", "", "QK-norm: RMSNorm per head\nRoPE: rotate q and k", "changed"),
        ("softmax(q k^T/sqrt(hd)) v\ncausal, (B, 4, T, hd)", "op",
         "softmax(q k^T/sqrt(hd)) v\n2 q heads per k, v head", "op"),
        ("x + out_proj(context)\nwith a bias", "op", "x + out_proj(context)\nno bias", "changed"),
        ("norm2: LayerNorm", "op", "norm2: RMSNorm", "changed"),
        ("x + proj(GELU(fc(x)))\nwidth 4 x 256 = 1024", "op",
         "x + proj(SiLU(g) * fc(x))\ng = gate(x); width 704", "changed"),
    ]  # fmt: skip
    boxes = {}
    for row, (left, left_kind, right, right_kind) in enumerate(rows):
        if left:
            boxes[f"l{row}"] = Box(left, left_kind, row, 0)
        boxes[f"r{row}"] = Box(right, right_kind, row, 1)
    left_rows = [f"l{r}" for r in range(1, len(rows)) if f"l{r}" in boxes]
    return boxes, chain(*left_rows) + chain(*[f"r{r}" for r in range(1, len(rows))])


DIAGRAMS: dict[str, tuple[dict[str, Box], list[Edge]]] = {
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
    # One generation step of one attention layer; start = kv_cache.length, the tokens cached so far.
    "kv-cache": (
        {
            "with": Box("with the cache", "note", 0, 0.5),
            "without": Box("without the cache", "note", 0, 2),
            "x": Box("x, newest token only\n(B, 1, d_in)", "data", 1, 1),
            "cache": Box("kv_cache.k, kv_cache.v\n(B, H, start, hd)", "data", 2, 0, 2.8),
            "qkv": Box("q, k, v of the new token\n(B, H, 1, hd)", "data", 2, 1),
            "append": Box("kv_cache.append(k, v)\n(B, H, start+1, hd)", "op", 3, 0.5),
            "attend": Box("attend_cached: weights\n(B, H, 1, start+1)", "op", 4, 1),
            "context": Box("context\n(B, H, 1, hd)", "data", 5, 1),
            "full_x": Box("x, every token\n(B, start+1, d_in)", "data", 1, 2),
            "full_qkv": Box("q, k, v of every token\n(B, H, start+1, hd)", "data", 2, 2),
            "full_attend": Box("attend: weights\n(B, H, start+1, start+1)", "op", 4, 2),
            "full_context": Box("context\n(B, H, start+1, hd)", "data", 5, 2),
            "kept": Box("kv_cache now holds\nstart+1 positions", "note", 6, 1),
            "redone": Box("rows 0..start-1 redo\nthe previous step", "note", 6, 2),
        },
        [("cache", "append"), ("qkv", "append"), ("qkv", "attend", "q")]
        + [("x", "qkv"), ("append", "attend")]
        + chain("attend", "context")
        + chain("full_x", "full_qkv", "full_attend", "full_context"),
    ),
    # Scores each operation reads from and writes to memory, in N = B·H·T² scores. out-of-place
    # masked_fill is a clone and then an in-place masked_fill_ (the profiler lists both); softmax
    # visits a row several times, but the row stays in cache, so it reads N once and writes N once.
    # Plain: 3 N read + 3 N + B·H·T(T-1)/2 written, about 6.5 N. Fused: about N/2 + N = 1.5 N.
    "softmax-traffic": (
        {
            "plain": Box("plain path: causal_softmax", "note", 0, 0, 2.8),
            "fused": Box("fused path: one kernel", "note", 0, 1, 2.8),
            "scores": Box("scores\n(B, H, T, T)", "data", 1, 0),
            "mul": Box("scores * scale\nread N, write N", "op", 2, 0),
            "clone": Box("masked_fill: clone\nread N, write N", "op", 3, 0),
            "fill": Box("masked_fill_: -inf\nwrite B·H·T(T-1)/2", "op", 4, 0),
            "softmax": Box("torch.softmax\nread N, write N", "op", 5, 0),
            "weights": Box("weights\n(B, H, T, T)", "data", 6, 0),
            "total": Box("about 6.5 N in all:\n26 bytes a score", "note", 7, 0),
            "f_scores": Box("scores\n(B, H, T, T)", "data", 1, 1),
            "kernel": Box("fused_causal_softmax\nread B·H·T(T+1)/2, write N", "op", 3.5, 1, 2.8),
            "f_weights": Box("weights\n(B, H, T, T)", "data", 6, 1),
            "f_total": Box("about 1.5 N in all:\n6 bytes a score", "note", 7, 1),
            "N": Box("N = B·H·T² scores of 4 bytes (float32)", "note", 8, 0.5, 5.6),
        },
        chain("scores", "mul", "clone", "fill", "softmax", "weights")
        + [("f_scores", "kernel", "row i: read columns 0..i")]
        + [("kernel", "f_weights", "write every score once")],
    ),
    # LoRALinear.forward; the code scales the rank-wide product, before lora_B, as drawn here.
    "lora": (
        {
            "x": Box("x\n(..., in)", "data", 0, 0.5),
            "base": Box("base.weight (out, in)\nfrozen", "frozen", 1, 0),
            "A": Box("lora_A (rank, in)\ntrained, random start", "param", 1, 1),
            "scale": Box("* scaling\nscaling = alpha / rank", "op", 2, 1),
            "B": Box("lora_B (out, rank)\ntrained, starts at zero", "param", 3, 1),
            "sum": Box("base(x) + update\n(..., out)", "op", 4, 0.5),
        },
        [("x", "base"), ("x", "A"), ("A", "scale", "(..., rank)"), ("scale", "B", "(..., rank)")]
        + [("base", "sum", "base(x)\n(..., out)"), ("B", "sum")],
    ),
    # BPETokenizer.encode("The newest") with the 8,192-token tokenizer of the default corpus (Python
    # 3.11's documentation), as `uv run python book/run_it.py tokens` trains it. The pieces
    # after each merge are tok._bpe(b" newest", max_rank=r) for r = 256, 279, 302, 511, 729, 975;
    # the ids are tok.encode("The newest").
    "tokens": (
        {
            "text": Box("text\n'The newest'", "data", 0, 0.5),
            "the": Box("pre-token 'The'", "data", 1, 0),
            "newest": Box("pre-token ' newest'", "data", 1, 1),
            "bytes": Box("7 UTF-8 bytes\n' ' 'n' 'e' 'w' 'e' 's' 't'", "data", 2, 1, 2.8),
            "m1": Box("' ' 'n' 'e' 'w' 'e' 'st'", "data", 3, 1, 2.8),
            "m2": Box("' n' 'e' 'w' 'e' 'st'", "data", 4, 1, 2.8),
            "m3": Box("' ne' 'w' 'e' 'st'", "data", 5, 1, 2.8),
            "m4": Box("' new' 'e' 'st'", "data", 6, 1, 2.8),
            "m5": Box("' new' 'est'", "data", 7, 1, 2.8),
            "whole": Box("id 340", "data", 8, 0),
            "pieces": Box("ids 728, 974", "data", 8, 1),
            "ids": Box("token ids [340, 728, 974]\n'The' ' new' 'est'", "data", 9, 0.5, 2.8),
        },
        [("text", "the"), ("text", "newest", "split by GPT2_PATTERN")]
        + [("the", "whole", "a whole token\nof mergeable_ranks:\nlooked up,\nno merges")]
        + [("newest", "bytes", "not a whole token")]
        + [("bytes", "m1", "merge 's'+'t' (rank 278, the lowest)")]
        + [("m1", "m2", "merge ' '+'n' (rank 301, the lowest)")]
        + [("m2", "m3", "merge ' n'+'e' (rank 510, the lowest)")]
        + [("m3", "m4", "merge ' ne'+'w' (rank 728, the lowest)")]
        + [("m4", "m5", "merge 'e'+'st' (rank 974, the lowest)")]
        + [("m5", "pieces", "' new'+'est' is no token: stop")]
        + [("whole", "ids"), ("pieces", "ids")],
    ),
    # classify.py: make_classifier swaps out_head, the model runs as usual, and last_token_logits
    # picks each row's logits at its last real token (the default --trainable last-block shown).
    "classification": (
        {
            "ids": Box("token ids, right-padded\n(B, T)", "data", 0, 0),
            "pad": Box("collate pads each text\nwith pad_id to length T", "note", 0, 1),
            "lower": Box("tok_emb, pos_emb,\nlower blocks (frozen)", "frozen", 1, 0),
            "trainable": Box("--trainable last-block,\nthe default", "note", 1.5, 1),
            "top": Box("last block, final_norm\n(trained)", "param", 2, 0),
            "hidden": Box("hidden states\n(B, T, emb_dim)", "data", 3, 0),
            "causal": Box("causal: the last real\ntoken never sees padding", "note", 3, 1),
            "head": Box("out_head, new: nn.Linear\n(emb_dim, num_classes)", "param", 4, 0, 2.8),
            "swap": Box("make_classifier: replaces\nthe vocab_size head", "note", 4, 1),
            "logits": Box("logits\n(B, T, num_classes)", "data", 5, 0),
            "lengths": Box("lengths, from collate\n(B,)", "data", 5, 1),
            "pick": Box("last_token_logits: each row\nat position lengths - 1", "op", 6, 0.5, 2.8),
            "out": Box("logits\n(B, num_classes)", "data", 7, 0.5),
            "loss": Box(
                "cross_entropy with labels (B,),\nor argmax: the predicted class", "op", 8, 0.5, 3.2
            ),
        },
        chain("ids", "lower", "top", "hidden", "head", "logits", "pick", "out", "loss")
        + [("lengths", "pick")],
    ),
    "instructions": _instruct_cells(),
    "speculative": _speculative_round(),
    # src/flops.py, training_flops_per_token: the matrix multiplies one token goes through, with
    # their forward FLOPs (2 per multiply-add; d = emb_dim, T = context_length, V = vocab_size).
    "flops": (
        {
            "x": Box("one token's vector\n(1, d)", "data", 0, 1),
            "q": Box("W_query: 2 d²", "param", 1, 0),
            "k": Box("W_key: 2 d²", "param", 1, 1),
            "v": Box("W_value: 2 d²", "param", 1, 2),
            "scores": Box("q k^T over T keys\n2 T d", "op", 2, 0.5),
            "mix": Box("weights @ v over T\n2 T d", "op", 3, 1.25),
            "out": Box("out_proj: 2 d²", "param", 4, 1.25),
            "fc": Box("ff.fc (d, 4d): 8 d²", "param", 5, 1.25),
            "proj": Box("ff.proj (4d, d): 8 d²", "param", 6, 1.25),
            "block": Box("a block: 24 d² + 4 T d", "note", 6, 0),
            "layers": Box("x n_layers blocks", "note", 7, 1.25),
            "head": Box("out_head (d, V): 2 d V", "param", 8, 1.25),
            "forward": Box("forward F = n_layers (24 d² + 4 T d) + 2 d V", "note", 9, 1.0, 5.0),
            "train": Box(
                "training = F + backward 2F = 3F\n(dL/dx and dL/dW: two multiplies each)",
                "note",
                10,
                1.0,
                5.0,
            ),
        },
        [("x", "q"), ("x", "k"), ("x", "v"), ("q", "scores"), ("k", "scores"), ("v", "mix")]
        + chain("scores", "mix", "out", "fc", "proj", "layers", "head", "forward", "train"),
    ),
    "modern-block": _modern_block(),
    # train.py, one optimizer step on W = 2 processes: every rank computes the same global batch
    # (step_batch) and keeps its slice, B / W windows; DDP averages the gradients.
    "scaling-out": (
        {
            "batch": Box(
                "step_batch(step, ...): batch_size = B\nwindows, the same on every rank",
                "data",
                0,
                0.5,
                4.0,
            ),
            "s0": Box("rank 0: batch[0 : B/W]\n(B/W, T)", "data", 1, 0),
            "s1": Box("rank 1: batch[B/W : 2B/W]\n(B/W, T)", "data", 1, 1),
            "f0": Box("forward, backward\non rank 0's model copy", "op", 2, 0),
            "f1": Box("forward, backward\non rank 1's model copy", "op", 2, 1),
            "g0": Box("gradients of rank 0", "data", 3, 0),
            "g1": Box("gradients of rank 1", "data", 3, 1),
            "avg": Box("all-reduce: the average\n(DDP, in the last backward)", "op", 4, 0.5, 3.0),
            "u0": Box("clip, AdamW step", "op", 5, 0),
            "u1": Box("clip, AdamW step", "op", 5, 1),
            "w0": Box("weights of rank 0", "param", 6, 0),
            "w1": Box("weights of rank 1", "param", 6, 1),
            "same": Box("identical on every rank", "note", 7, 0.5),
        },
        [("batch", "s0"), ("batch", "s1"), ("g0", "avg"), ("g1", "avg")]
        + [("avg", "u0"), ("avg", "u1"), ("w0", "same"), ("w1", "same")]
        + chain("s0", "f0", "g0")
        + chain("s1", "f1", "g1")
        + chain("u0", "w0")
        + chain("u1", "w1"),
    ),
}


# One visit of flash_attention.cpp's forward_tile: a query tile meets a key tile. Tile sizes are
# the kernel's BQ = 64 and BK = 128; D is the head dim (padded to whole vectors when packed).
DIAGRAMS["flash-visit"] = (
    {
        "q": Box("query tile Q\n(64, D), packed once", "data", 0, 0),
        "k": Box("key tile K^T\n(D, 128), packed", "data", 0, 1),
        "v": Box("value tile V\n(128, D), packed", "data", 2.3, 2.3),
        "s": Box("S = Q K^T: (64, 128)\nin cache, never in memory", "op", 1, 0.5, 3.2),
        "mask": Box("diagonal tile only:\nskip c > r + (q0 - k0)", "note", 1, 1.62, 2.6),
        "soft": Box(
            "online softmax, per row: m' = max(m, scale max S),\n"
            "P = exp(scale S - m'), l' = l e^(m - m') + sum P",
            "op",
            2.3,
            0.75,
            5.2,
        ),
        "o": Box("O = O e^(m - m') + P V\n(64, D), in cache", "op", 3.4, 1, 3.2),
        "out": Box(
            "after the last key tile: out = O / l,\nlse = m + log l (saved for the backward)",
            "data",
            4.6,
            1,
            4.6,
        ),
    },
    [("q", "s"), ("k", "s"), ("s", "soft"), ("soft", "o", "P (64, 128)"), ("v", "o")]
    + [("o", "out", "next key tile: back to S")],
)

TILES = 6  # query tiles and key tiles of the drawing (the kernel's are 64 queries and 128 keys)


def draw_flash_tiles(path: Path) -> None:
    """The (T, T) scores cut into tiles: which ones flash attention computes, which it skips."""
    fig, ax = plt.subplots(figsize=(7.2, 5.6))
    ax.set_xlim(-0.2, TILES + 3.4)
    ax.set_ylim(TILES + 1.4, -0.9)
    ax.set_aspect("equal")
    ax.axis("off")
    for qi in range(TILES):
        for kj in range(TILES):
            face = COLORS["param"] if kj < qi else "white"
            ax.add_patch(Rectangle((kj, qi), 1, 1, facecolor=face, edgecolor="#455a64", lw=1.0))
            if kj == qi:  # the diagonal tile: keys up to each query's own
                ax.add_patch(Polygon([(kj, qi), (kj, qi + 1), (kj + 1, qi + 1)], closed=True,
                                     facecolor=COLORS["op"], edgecolor="none"))  # fmt: skip
                ax.add_patch(Rectangle((kj, qi), 1, 1, fill=False, edgecolor="#455a64", lw=1.0))
            if kj > qi:
                ax.text(kj + 0.5, qi + 0.5, "skipped", ha="center", va="center", fontsize=7,
                        color="#90a4ae", family="monospace")  # fmt: skip
    row = 3  # one query tile's visits, in order
    for kj in range(row + 1):
        ax.text(kj + 0.5, row + 0.5, f"visit {kj + 1}", ha="center", va="center", fontsize=7.5,
                family="monospace", weight="bold")  # fmt: skip
    ax.add_patch(FancyArrowPatch((0.1, TILES + 0.3), (row + 0.9, TILES + 0.3), arrowstyle="-|>",
                                 mutation_scale=10, color="#455a64"))  # fmt: skip
    ax.text(0.1, TILES + 0.55, "query tile 4 visits key tiles 1..4 in order, keeping a running\n"
            "maximum m and sum l per row", fontsize=7.5, family="monospace", va="top")  # fmt: skip
    ax.text(TILES / 2, -0.45, "key tiles (columns of the scores) ->", ha="center", fontsize=8,
            family="monospace")  # fmt: skip
    ax.text(-0.1, TILES / 2, "query tiles", rotation=90, ha="right", va="center", fontsize=8,
            family="monospace")  # fmt: skip
    legend = [(COLORS["param"], "computed in full: S, P and P V"),
              (COLORS["op"], "diagonal tile: visible part only"),
              ("white", "after the diagonal: never visited")]  # fmt: skip
    for n, (face, text) in enumerate(legend):
        ax.add_patch(Rectangle((TILES + 0.3, 0.2 + 0.8 * n), 0.5, 0.5, facecolor=face,
                               edgecolor="#455a64", lw=1.0))  # fmt: skip
        ax.text(TILES + 0.95, 0.45 + 0.8 * n, text, va="center", fontsize=7.5, family="monospace",
                wrap=True)  # fmt: skip
    ax.text(TILES + 0.3, 3.0, "no (T, T) tensor: each tile\nexists in cache for one visit",
            fontsize=7.5, family="monospace", va="top")  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    plt.rcParams["svg.hashsalt"] = "gpt-from-scratch"
    fig.savefig(path, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)


def main() -> None:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help="output folder")
    args = parser.parse_args()
    for name, (boxes, edges) in DIAGRAMS.items():
        path = args.out / f"{name}.svg"
        draw(boxes, edges, path)
        print(f"wrote {path}")
    draw_flash_tiles(args.out / "flash-tiles.svg")
    print(f"wrote {args.out / 'flash-tiles.svg'}")


if __name__ == "__main__":
    main()
