"""Training throughput: tokens/s of a full step (forward, backward, AdamW) per attention path.

The model is the default ``cpu-small`` preset (4 layers, 4 heads, emb 256, vocab 8192), the size of
nanoGPT's small reference model, at three context lengths with the same number of tokens per step:
context 256 x batch 8 (the default run), 512 x 4 and 1024 x 2. For each shape the three attention
paths (``eager``, ``fused``, ``sdpa``) train copies of the same model on the same batch, one step each
in turn, repeated; the median step time is kept. Interleaving means a burst of load from another
process slows every path alike, so the ratios hold even on a busy machine.

It also times the attention core alone (``attend``: scores, causal softmax, weights @ values, with
its backward) at each shape, times the number of layers, to say what share of a step attention is.

    uv run python benchmarks/train.py                 # docs/assets/train-benchmark.json and .md
    uv run python benchmarks/train.py --repeats 3     # quicker, noisier
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from src import fused_softmax
from src.model import GPTConfig, GPTModel
from src.training import adamw, cross_entropy

OUT = Path(__file__).resolve().parent.parent / "docs" / "assets" / "train-benchmark.json"
SHAPES = [(256, 8), (512, 4), (1024, 2)]  # (context length, batch): 2,048 tokens per step
IMPLS = ["eager", "fused", "sdpa"]


def make_trainer(impl: str, context_length: int):
    torch.manual_seed(0)
    cfg = GPTConfig.from_preset("cpu-small", context_length=context_length, attn_impl=impl)
    model = GPTModel(cfg).train()
    return model, adamw(model, lr=1e-4, weight_decay=0.1)


def train_step(model, optimizer, x, y) -> float:
    t0 = time.perf_counter()
    loss = cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def attention_core_time(model, B: int, T: int) -> float:
    """One layer's attention core, forward + backward, on random q, k, v of the model's shape."""
    att = model.trf_blocks[0].att
    q, k, v = (torch.randn(B, att.n_heads, T, att.head_dim, requires_grad=True) for _ in range(3))
    t0 = time.perf_counter()
    att.attend(q, k, v).sum().backward()
    return time.perf_counter() - t0


def bench_shape(T: int, B: int, repeats: int) -> dict:
    trainers = {impl: make_trainer(impl, T) for impl in IMPLS}
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 8192, (B, T), generator=g)
    y = torch.randint(0, 8192, (B, T), generator=g)
    steps = {impl: [] for impl in IMPLS}
    cores = {impl: [] for impl in IMPLS}
    for i in range(repeats + 2):  # the first two rounds warm up caches and the allocator
        for impl, (model, opt) in trainers.items():
            step, core = train_step(model, opt, x, y), attention_core_time(model, B, T)
            if i >= 2:
                steps[impl].append(step)
                cores[impl].append(core)
    n_layers = trainers["eager"][0].cfg.n_layers
    result = {"context_length": T, "batch_size": B}
    for impl in IMPLS:
        step = statistics.median(steps[impl])
        result[impl] = {
            "step_ms": 1e3 * step,
            "tokens_per_sec": B * T / step,
            "attention_share": n_layers * statistics.median(cores[impl]) / step,
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed steps per path and shape")
    parser.add_argument("--out", type=Path, default=OUT, help="where the JSON results go")
    args = parser.parse_args()
    fused_softmax.ensure_available()  # a benchmark of the fused path must not fall back silently
    results = {
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "repeats": args.repeats,
        "shapes": [],
    }
    print(f"cpu-small, {results['threads']} threads, median of {args.repeats} steps")
    print(f"{'context x batch':>16} | {'eager':>12} | {'fused':>12} | {'sdpa':>12} | "
          f"fused/eager | fused/sdpa | attention share (eager, fused, sdpa)")  # fmt: skip
    for T, B in SHAPES:
        r = bench_shape(T, B, args.repeats)
        results["shapes"].append(r)
        tps = {impl: r[impl]["tokens_per_sec"] for impl in IMPLS}
        shares = ", ".join(f"{100 * r[impl]['attention_share']:.0f}%" for impl in IMPLS)
        print(f"{T:>10} x {B:<3} | " + " | ".join(f"{tps[i]:>8,.0f} t/s" for i in IMPLS)
              + f" | {tps['fused'] / tps['eager']:>10.2f}x | {tps['fused'] / tps['sdpa']:>9.2f}x"
              + f" | {shares}", flush=True)  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(to_markdown(results))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")


def to_markdown(results: dict) -> str:
    """The table the Pretraining chapter includes: tokens/s per path and shape, and the ratios."""
    lines = [
        "| context x batch | eager (tokens/s) | fused | sdpa | fused / eager | fused / sdpa "
        "| attention share (eager, fused, sdpa) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in results["shapes"]:
        tps = {impl: r[impl]["tokens_per_sec"] for impl in IMPLS}
        shares = ", ".join(f"{100 * r[impl]['attention_share']:.0f}%" for impl in IMPLS)
        lines.append(
            f"| {r['context_length']} x {r['batch_size']} | {tps['eager']:,.0f} "
            f"| {tps['fused']:,.0f} | {tps['sdpa']:,.0f} | {tps['fused'] / tps['eager']:.2f}x "
            f"| {tps['fused'] / tps['sdpa']:.2f}x | {shares} |"
        )
    lines += [
        "",
        f"*Made by `uv run python benchmarks/train.py` ({results['threads']} threads, torch "
        f"{results['torch']}, {results['cpu_capability']}, median of {results['repeats']} steps).*",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
