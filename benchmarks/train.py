"""Training throughput: tokens/s of a full optimizer step per attention path.

The model is the default ``cpu-small`` preset (4 layers, 4 heads, emb 256, vocab 8192), the size of
nanoGPT's small reference model, at three context lengths with the same number of tokens per step:
context 256 x batch 8 (the default run), 512 x 4 and 1024 x 2. For each shape the three attention
paths (``eager``, ``fused``, ``sdpa``) train copies of the same model on the same batch, one step each
in turn, repeated; the median step time is kept (``benchmarks.harness.median_times``). The step is the
trainer's own, ``src.training.optimizer_step``: forward, backward, gradient clipping, AdamW.

It also times the attention core alone (``attend``: scores, causal softmax, weights @ values, with
its backward) at each shape, times the number of layers, to say what share of a step attention is.

    uv run python benchmarks/train.py                 # docs/assets/train-benchmark.json and .md
    uv run python benchmarks/train.py --repeats 3     # quicker, noisier
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.harness import markdown_table, median_times
from src import fused_softmax
from src.cli import Parser, positive_int, run_command
from src.errors import UserError
from src.files import write_atomically
from src.model import GPTConfig, GPTModel
from src.training import adamw, cross_entropy, optimizer_step

OUT = Path(__file__).resolve().parent.parent / "docs" / "assets" / "train-benchmark.json"
SHAPES = [(256, 8), (512, 4), (1024, 2)]  # (context length, batch): 2,048 tokens per step
IMPLS = ["eager", "fused", "sdpa"]


def training_step(impl: str, x: torch.Tensor, y: torch.Tensor):
    """A call that takes one optimizer step of a fresh ``cpu-small`` model, the trainer's own step
    (``optimizer_step``: forward, backward, clip, AdamW), on the batch ``x``, ``y``."""
    torch.manual_seed(0)
    cfg = GPTConfig.from_preset("cpu-small", context_length=x.shape[1], attn_impl=impl)
    model = GPTModel(cfg).train()
    optimizer = adamw(model, lr=1e-4, weight_decay=0.1)

    def loss_fn(batch):
        inputs, targets = batch
        return cross_entropy(model(inputs), targets)

    return model, lambda: optimizer_step(model, optimizer, [(x, y)], loss_fn, step=0)


def attention_core(model: GPTModel, B: int, T: int):
    """A call that runs one layer's attention core, forward + backward, on random q, k, v."""
    att = model.trf_blocks[0].att

    q, k, v = (torch.randn(B, att.n_heads, T, att.head_dim, requires_grad=True) for _ in range(3))

    def call():
        att.attend(q, k, v).sum().backward()
        q.grad = k.grad = v.grad = None

    return call


def bench_shape(T: int, B: int, repeats: int) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 8192, (B, T), generator=g)
    y = torch.randint(0, 8192, (B, T), generator=g)
    candidates = {}
    for impl in IMPLS:
        model, step = training_step(impl, x, y)
        candidates[f"{impl} step"] = step
        candidates[f"{impl} attention"] = attention_core(model, B, T)
    times = median_times(candidates, repeats)
    n_layers = model.cfg.n_layers
    result = {"context_length": T, "batch_size": B}
    for impl in IMPLS:
        step = times[f"{impl} step"]
        result[impl] = {
            "step_ms": 1e3 * step,
            "tokens_per_sec": B * T / step,
            "attention_share": n_layers * times[f"{impl} attention"] / step,
        }
    return result


def parser() -> Parser:
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=positive_int, default=7, help="timed steps per path and shape")
    p.add_argument("--out", type=Path, default=OUT, help="where the JSON results go")
    return p


def run(args) -> None:
    try:  # a benchmark of the fused path must not fall back silently
        fused_softmax.ensure_available()
    except RuntimeError as err:
        raise UserError(str(err)) from None
    results = {
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "repeats": args.repeats,
        "shapes": [],
    }
    print(f"cpu-small, {results['threads']} threads, median of {args.repeats} steps")
    for T, B in SHAPES:
        r = bench_shape(T, B, args.repeats)
        results["shapes"].append(r)
        print(f"{T:>5} x {B}: " + ", ".join(f"{impl} {r[impl]['tokens_per_sec']:,.0f} tokens/s"
                                            for impl in IMPLS), flush=True)  # fmt: skip
    write_atomically(args.out, json.dumps(results, indent=2) + "\n")
    write_atomically(args.out.with_suffix(".md"), to_markdown(results))
    print(f"\n{to_markdown(results)}\nwrote {args.out} and {args.out.with_suffix('.md')}")


def to_markdown(results: dict) -> str:
    """The table the Pretraining chapter includes: tokens/s per path and shape, and the ratios."""
    rows = []
    for r in results["shapes"]:
        tps = {impl: r[impl]["tokens_per_sec"] for impl in IMPLS}
        shares = ", ".join(f"{100 * r[impl]['attention_share']:.0f}%" for impl in IMPLS)
        rows.append([f"{r['context_length']} x {r['batch_size']}",
                     *(f"{tps[impl]:,.0f}" for impl in IMPLS),
                     f"{tps['fused'] / tps['eager']:.2f}x", f"{tps['fused'] / tps['sdpa']:.2f}x",
                     shares])  # fmt: skip
    header = ["context x batch", "eager (tokens/s)", "fused", "sdpa", "fused / eager",
              "fused / sdpa", "attention share (eager, fused, sdpa)"]  # fmt: skip
    made_by = (
        f"*Made by `uv run python benchmarks/train.py` ({results['threads']} threads, torch "
        f"{results['torch']}, {results['cpu_capability']}, median of {results['repeats']} steps).*"
    )
    return f"{markdown_table(header, rows, align='lrrrrrl')}\n\n{made_by}\n"


if __name__ == "__main__":
    sys.exit(run_command(parser(), run, sys.argv[1:]))
