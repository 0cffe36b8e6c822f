"""Training throughput: tokens/s of a full step (forward, backward, AdamW) per attention path.

The model is the default ``cpu-small`` preset (4 layers, 4 heads, emb 256, vocab 8192), the size of
nanoGPT's small reference model, at three context lengths with the same number of tokens per step:
context 256 x batch 8 (the default run), 512 x 4 and 1024 x 2. For each shape the four attention
paths (``eager``, ``fused``, ``sdpa``, ``flash``) train copies of the same model on the same batch,
one step each in turn, repeated; the median step time is kept (``benchmarks.harness.median_times``).
The step is the trainer's own, ``src.training.optimizer_step``: forward, backward, gradient clipping,
AdamW.

It also times the attention core alone (``attend``: scores, causal softmax, weights @ values, with
its backward) at each shape, times the number of layers, to say what share of a step attention is.

Then the same step against nanoGPT's ``model.py`` (Karpathy), on its small reference configuration
(4 layers, 4 heads, emb 256, vocab 8192, context 256, batch 8, AdamW as its
``configure_optimizers`` builds it, gradients clipped at 1 as its ``train.py`` does), in the same
process and interleaved: our model as the book writes it, then with each speed option (fused
LayerNorm/GELU, tied weights, flash attention). nanoGPT is not part of this repository:
``--nanogpt PATH`` (or ``$NANOGPT``) names its ``model.py``, and without one its row is left out.

    uv run python benchmarks/train.py                 # docs/assets/train-benchmark.json and .md
    uv run python benchmarks/train.py --nanogpt ~/src/nanoGPT/model.py   # and train-nanogpt.md
    uv run python benchmarks/train.py --repeats 3     # quicker, noisier
"""

import contextlib
import importlib.util
import io
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.harness import markdown_table, median_times
from src import flash_attention
from src.cli import Parser, positive_int, run_command
from src.errors import UserError
from src.files import write_atomically
from src.model import GPTConfig, GPTModel
from src.training import adamw, cross_entropy, optimizer_step

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


def training_step(impl: str, x: torch.Tensor, y: torch.Tensor, **options):
    """A call that takes one optimizer step of a fresh ``cpu-small`` model, the trainer's own step
    (``optimizer_step``: forward, backward, clip, AdamW), on the batch ``x``, ``y``."""
    torch.manual_seed(0)
    cfg = GPTConfig.from_preset("cpu-small", context_length=x.shape[1], attn_impl=impl, **options)
    model = GPTModel(cfg).train()
    optimizer = adamw(model, lr=1e-4, weight_decay=0.1)

    def loss_fn(batch):
        inputs, targets = batch
        return cross_entropy(model(inputs), targets)

    return model, lambda: optimizer_step(model, optimizer, [(x, y)], loss_fn, step=0)


def nanogpt_step(path: Path, x: torch.Tensor, y: torch.Tensor):
    """A call that takes one step of nanoGPT's GPT, with the AdamW of its ``configure_optimizers``
    and the gradient clipping of its ``train.py``, on the reference configuration."""
    spec = importlib.util.spec_from_file_location("nanogpt_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    config = module.GPTConfig(block_size=256, vocab_size=8192, n_layer=4, n_head=4, n_embd=256,
                              dropout=0.0)  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):  # it prints its parameter counts
        model = module.GPT(config).train()
        optimizer = model.configure_optimizers(0.1, 1e-4, (0.9, 0.95), "cpu")

    def step():
        _, loss = model(x, y)  # nanoGPT's forward returns the loss with the logits
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def versus_nanogpt(path: Path | None, repeats: int) -> list[dict]:
    """Tokens/s of one training step, context 256 x batch 8: nanoGPT's model (if ``path``) and
    ours in each variant, interleaved step by step."""
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randint(0, 8192, (8, 256), generator=g) for _ in range(2))
    candidates = {}
    if path is not None:
        candidates["nanoGPT model.py (sdpa)"] = nanogpt_step(path, x, y)
    for name, options in VARIANTS.items():
        candidates[name] = training_step(x=x, y=y, impl=options["attn_impl"],
                                         **{k: v for k, v in options.items() if k != "attn_impl"})[1]  # fmt: skip
    times = median_times(candidates, repeats)
    return [{"model": name, "tokens_per_sec": 8 * 256 / t} for name, t in times.items()]


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
    p.add_argument("--threads", type=positive_int, default=2, help="CPU threads (default 2)")
    p.add_argument("--out", type=Path, default=OUT, help="where the JSON results go")
    p.add_argument(
        "--nanogpt",
        type=Path,
        default=os.environ.get("NANOGPT"),
        metavar="MODEL_PY",
        help="nanoGPT's model.py, to compare the step with (default: $NANOGPT; none: no such row)",
    )
    p.add_argument("--only-nanogpt", action="store_true", help="skip the attention paths' table")
    return p


def run(args) -> None:
    if args.nanogpt is not None and not args.nanogpt.is_file():
        raise UserError(f"--nanogpt {args.nanogpt}: no such file (give the path of its model.py)")
    try:  # a benchmark of the fused and flash paths must not fall back silently
        flash_attention.ensure_available()
    except RuntimeError as err:
        raise UserError(str(err)) from None
    torch.set_num_threads(args.threads)
    results = {
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "repeats": args.repeats,
        "shapes": [],
    }
    print(f"cpu-small, {results['threads']} threads, median of {args.repeats} steps")
    for T, B in [] if args.only_nanogpt else SHAPES:
        r = bench_shape(T, B, args.repeats)
        results["shapes"].append(r)
        print(f"{T:>5} x {B}: " + ", ".join(f"{impl} {r[impl]['tokens_per_sec']:,.0f} tokens/s"
                                            for impl in IMPLS), flush=True)  # fmt: skip
    results["nanogpt"] = versus_nanogpt(args.nanogpt, args.repeats)
    versus = args.out.with_name(args.out.stem.replace("benchmark", "nanogpt") + ".md")
    write_atomically(versus, nanogpt_markdown(results))
    print(f"\n{nanogpt_markdown(results)}")
    if not args.only_nanogpt:
        write_atomically(args.out, json.dumps(results, indent=2) + "\n")
        write_atomically(args.out.with_suffix(".md"), to_markdown(results))
        print(f"{to_markdown(results)}\nwrote {args.out} and {args.out.with_suffix('.md')}")


def made_by(results: dict, flags: str = "") -> str:
    return (
        f"*Made by `uv run python benchmarks/train.py{flags}` ({results['threads']} threads, torch "
        f"{results['torch']}, {results['cpu_capability']}, median of {results['repeats']} steps, "
        "interleaved).*"
    )


def to_markdown(results: dict) -> str:
    """The table the Pretraining chapter includes: tokens/s per path and shape, and the ratios."""
    rows = []
    for r in results["shapes"]:
        tps = {impl: r[impl]["tokens_per_sec"] for impl in IMPLS}
        shares = ", ".join(f"{100 * r[impl]['attention_share']:.0f}%" for impl in IMPLS)
        rows.append([f"{r['context_length']} x {r['batch_size']}",
                     *(f"{tps[impl]:,.0f}" for impl in IMPLS),
                     f"{tps['fused'] / tps['eager']:.2f}x", f"{tps['flash'] / tps['sdpa']:.2f}x",
                     shares])  # fmt: skip
    header = ["context x batch", "eager (tokens/s)", "fused", "sdpa", "flash", "fused / eager",
              "flash / sdpa", "attention share (eager, fused, sdpa, flash)"]  # fmt: skip
    return f"{markdown_table(header, rows, align='lrrrrrrl')}\n\n{made_by(results)}\n"


def nanogpt_markdown(results: dict) -> str:
    """Our step against nanoGPT's on its reference configuration, one row per variant."""
    rows = results["nanogpt"]
    nano = next((r["tokens_per_sec"] for r in rows if r["model"].startswith("nanoGPT")), None)
    written = next(r["tokens_per_sec"] for r in rows if r["model"].startswith("ours, as written"))
    table = [[r["model"], f"{r['tokens_per_sec']:,.0f}",
              f"{r['tokens_per_sec'] / nano:.2f}x" if nano else "-",
              f"{r['tokens_per_sec'] / written:.2f}x"] for r in rows]  # fmt: skip
    header = ["model (context 256 x batch 8)", "tokens/s", "vs nanoGPT", "vs ours as written"]
    source = "" if nano else " (no nanoGPT model.py given: its row is left out)"
    return (
        f"{markdown_table(header, table, align='lrrr')}\n\n"
        f"{made_by(results, ' --nanogpt MODEL_PY')}{source}\n"
    )


if __name__ == "__main__":
    sys.exit(run_command(parser(), run, sys.argv[1:]))
