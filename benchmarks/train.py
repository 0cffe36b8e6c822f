"""Training throughput: tokens/s of a full step (forward, backward, AdamW) per attention path.

The model is the default ``cpu-small`` preset (4 layers, 4 heads, emb 256, vocab 8192), the size of
nanoGPT's small reference model, at three context lengths with the same number of tokens per step:
context 256 x batch 8 (the default run), 512 x 4 and 1024 x 2. For each shape the four attention
paths (``eager``, ``fused``, ``sdpa``, ``flash``) train copies of the same model on the same batch,
one step each in turn, repeated; the median step time is kept. Interleaving means a burst of load from another
process slows every path alike, so the ratios hold even on a busy machine.

It also times the attention core alone (``attend``: scores, causal softmax, weights @ values, with
its backward) at each shape, times the number of layers, to say what share of a step attention is.

Then the same step against nanoGPT's ``model.py`` (Karpathy), on its small reference configuration
(4 layers, 4 heads, emb 256, vocab 8192, context 256, batch 8, AdamW as its
``configure_optimizers`` builds it), in the same process and interleaved: our model as the book
writes it, then with each speed option (fused LayerNorm/GELU, tied weights, flash attention). nanoGPT
is not part of this repository: ``--nanogpt PATH`` (or ``$NANOGPT``) names a checkout, and without
one its row is left out.

    uv run python benchmarks/train.py                 # docs/assets/train-benchmark.json and .md
    uv run python benchmarks/train.py --nanogpt ~/src/nanoGPT   # and docs/assets/train-nanogpt.md
    uv run python benchmarks/train.py --repeats 3     # quicker, noisier
"""

import argparse
import contextlib
import importlib.util
import io
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from src import flash_attention
from src.model import GPTConfig, GPTModel
from src.training import adamw, cross_entropy

OUT = Path(__file__).resolve().parent.parent / "docs" / "assets" / "train-benchmark.json"
SHAPES = [(256, 8), (512, 4), (1024, 2)]  # (context length, batch): 2,048 tokens per step
IMPLS = ["eager", "fused", "sdpa", "flash"]
# Our model's variants against nanoGPT's: the book's layers, then each speed option, then all.
VARIANTS = {
    "ours, as written (sdpa)": {"attn_impl": "sdpa"},
    "ours + fused LayerNorm/GELU": {"attn_impl": "sdpa", "fused_layers": True},
    "ours + tied weights": {"attn_impl": "sdpa", "tie_weights": True},
    "ours + both": {"attn_impl": "sdpa", "fused_layers": True, "tie_weights": True},
    "ours + both + flash": {"attn_impl": "flash", "fused_layers": True, "tie_weights": True},
}


def make_trainer(impl: str, context_length: int, **options):
    torch.manual_seed(0)
    cfg = GPTConfig.from_preset(
        "cpu-small", context_length=context_length, attn_impl=impl, **options
    )
    model = GPTModel(cfg).train()
    return model, adamw(model, lr=1e-4, weight_decay=0.1)


def clock() -> tuple[float, float]:
    """Wall-clock seconds and CPU seconds of this process (all its threads)."""
    return time.perf_counter(), time.process_time()


def elapsed(start: tuple[float, float]) -> tuple[float, float]:
    now = clock()
    return now[0] - start[0], now[1] - start[1]


def train_step(model, optimizer, x, y) -> tuple[float, float]:
    """One step; its wall-clock and CPU time (the second holds up when other jobs take the cores)."""
    t0 = clock()
    loss = cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return elapsed(t0)


def nanogpt_trainer(path: Path):
    """nanoGPT's GPT and AdamW from the model.py of a checkout, on the reference configuration."""
    spec = importlib.util.spec_from_file_location("nanogpt_model", path / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    config = module.GPTConfig(block_size=256, vocab_size=8192, n_layer=4, n_head=4, n_embd=256,
                              dropout=0.0)  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):  # it prints its parameter counts
        model = module.GPT(config).train()
        optimizer = model.configure_optimizers(0.1, 1e-4, (0.9, 0.95), "cpu")

    def step(x, y) -> tuple[float, float]:
        t0 = clock()
        _, loss = model(x, y)  # nanoGPT's forward returns the loss with the logits
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return elapsed(t0)

    return step


def versus_nanogpt(path: Path | None, repeats: int) -> list[dict]:
    """Tokens/s of one training step, context 256 x batch 8: nanoGPT's model (if ``path``) and
    ours in each variant, interleaved step by step; the first two rounds warm up."""
    steps = {}
    if path is not None:
        steps["nanoGPT model.py (sdpa)"] = nanogpt_trainer(path)
    for name, options in VARIANTS.items():
        model, opt = make_trainer(options["attn_impl"], 256, **{k: v for k, v in options.items()
                                                                 if k != "attn_impl"})  # fmt: skip
        steps[name] = lambda x, y, model=model, opt=opt: train_step(model, opt, x, y)
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randint(0, 8192, (8, 256), generator=g) for _ in range(2))
    times = {name: [] for name in steps}
    for i in range(repeats + 2):
        for name, step in steps.items():
            elapsed = step(x, y)
            if i >= 2:
                times[name].append(elapsed)
    return [{"model": name, **rates(8 * 256, t)} for name, t in times.items()]


def rates(tokens: int, times: list[tuple[float, float]]) -> dict:
    """Tokens per second of wall-clock time and per second of CPU time, from the medians."""
    return {"tokens_per_sec": tokens / statistics.median(w for w, _ in times),
            "tokens_per_cpu_sec": tokens / statistics.median(c for _, c in times)}  # fmt: skip


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
        step = statistics.median(w for w, _ in steps[impl])
        result[impl] = {
            "step_ms": 1e3 * step,
            **rates(B * T, steps[impl]),
            "attention_share": n_layers * statistics.median(cores[impl]) / step,
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed steps per path and shape")
    parser.add_argument("--out", type=Path, default=OUT, help="where the JSON results go")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    parser.add_argument(
        "--nanogpt",
        type=Path,
        default=os.environ.get("NANOGPT"),
        help="a nanoGPT checkout (its model.py) to compare the step with (default: $NANOGPT)",
    )
    args = parser.parse_args()
    if args.nanogpt is not None and not (args.nanogpt / "model.py").is_file():
        parser.error(f"--nanogpt {args.nanogpt}: no model.py there")
    torch.set_num_threads(args.threads)
    flash_attention.ensure_available()  # the fused and flash paths must not fall back silently
    results = {
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "repeats": args.repeats,
        "shapes": [],
    }
    print(f"cpu-small, {results['threads']} threads, median of {args.repeats} steps")
    print(" | ".join(f"{c:>12}" for c in ["context x batch", *IMPLS])
          + " | flash/sdpa | attention share (eager, fused, sdpa, flash)")  # fmt: skip
    for T, B in SHAPES:
        r = bench_shape(T, B, args.repeats)
        results["shapes"].append(r)
        tps = {impl: r[impl]["tokens_per_sec"] for impl in IMPLS}
        shares = ", ".join(f"{100 * r[impl]['attention_share']:.0f}%" for impl in IMPLS)
        cpu = r["flash"]["tokens_per_cpu_sec"] / r["sdpa"]["tokens_per_cpu_sec"]
        print(f"{T:>8} x {B:<3} | " + " | ".join(f"{tps[i]:>8,.0f} t/s" for i in IMPLS)
              + f" | {tps['flash'] / tps['sdpa']:>9.2f}x (CPU time {cpu:.2f}x) | {shares}",
              flush=True)  # fmt: skip
    results["nanogpt"] = versus_nanogpt(args.nanogpt, args.repeats)
    for row in results["nanogpt"]:
        print(
            f"{row['model']:>32}: {row['tokens_per_sec']:8,.0f} tokens/s, "
            f"{row['tokens_per_cpu_sec']:8,.0f} per CPU second"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(to_markdown(results))
    versus = args.out.with_name(args.out.stem.replace("benchmark", "nanogpt") + ".md")
    versus.write_text(nanogpt_markdown(results))
    print(f"wrote {args.out}, {args.out.with_suffix('.md')} and {versus}")


def to_markdown(results: dict) -> str:
    """The table the Pretraining chapter includes: tokens/s per path and shape, and the ratios."""
    lines = [
        "| context x batch | eager (tokens/s) | fused | sdpa | flash | fused / eager | flash / sdpa "
        "| flash / sdpa, CPU time | attention share (eager, fused, sdpa, flash) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in results["shapes"]:
        tps = {impl: r[impl]["tokens_per_sec"] for impl in IMPLS}
        cpu = {impl: r[impl]["tokens_per_cpu_sec"] for impl in IMPLS}
        shares = ", ".join(f"{100 * r[impl]['attention_share']:.0f}%" for impl in IMPLS)
        lines.append(
            f"| {r['context_length']} x {r['batch_size']} | {tps['eager']:,.0f} "
            f"| {tps['fused']:,.0f} | {tps['sdpa']:,.0f} | {tps['flash']:,.0f} "
            f"| {tps['fused'] / tps['eager']:.2f}x | {tps['flash'] / tps['sdpa']:.2f}x "
            f"| {cpu['flash'] / cpu['sdpa']:.2f}x | {shares} |"
        )
    lines += [
        "",
        f"*Made by `uv run python benchmarks/train.py` ({results['threads']} threads, torch "
        f"{results['torch']}, {results['cpu_capability']}, median of {results['repeats']} steps; "
        "CPU time: the process's CPU seconds per step, which other jobs on the machine do not "
        "inflate).*",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()


def nanogpt_markdown(results: dict) -> str:
    """Our step against nanoGPT's on its reference configuration, one row per variant."""
    rows = results["nanogpt"]
    nano = next((r for r in rows if r["model"].startswith("nanoGPT")), None)
    written = next(r for r in rows if r["model"].startswith("ours, as written"))
    lines = ["| model (context 256 x batch 8) | tokens/s | vs nanoGPT | vs nanoGPT, CPU time "
             "| vs ours as written |", "| --- | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for r in rows:
        vs = [
            f"{r[k] / nano[k]:.2f}x" if nano else "-"
            for k in ("tokens_per_sec", "tokens_per_cpu_sec")
        ]
        lines.append(f"| {r['model']} | {r['tokens_per_sec']:,.0f} | {vs[0]} | {vs[1]} "
                     f"| {r['tokens_per_sec'] / written['tokens_per_sec']:.2f}x |")  # fmt: skip
    lines += [
        "",
        f"*Made by `uv run python benchmarks/train.py --nanogpt PATH` ({results['threads']} "
        f"threads, torch {results['torch']}, {results['cpu_capability']}, median of "
        f"{results['repeats']} steps, interleaved; "
        + ("nanoGPT's model.py from the checkout at PATH" if nano else "no nanoGPT checkout given")
        + "; CPU time: the process's CPU seconds per step).*",
    ]
    return "\n".join(lines) + "\n"
