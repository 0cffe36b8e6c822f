"""From GPT-2 to a modern LLM, one change at a time: what each switch buys on the built-in corpus.

The speedrun tables of modded-nanogpt and nanochat measure every architectural change the same way:
same data, same steps, same size, one change at a time. This script does that for the switches of
``GPTConfig``: it starts from ``cpu-small`` (GPT-2's block), switches on each change alone, then all
of them together (``cpu-llama``), and trains each configuration with several seeds exactly like the
default run (``python -m src.train``: 200 steps of 8 x 256 tokens, AdamW at 1e-3 with 50 warmup
steps and a cosine to 1e-4, the same batches for the same seed). It reports the validation loss
over the whole validation split, the parameter count, and the training speed, measured afterwards
in one process with the configurations interleaved, so that a busy machine slows them all alike.

    uv run python experiments/ablation.py                      # 16 runs, two at a time: 1-3 hours
    uv run python experiments/ablation.py --steps 20 --seeds 1 --out /tmp/ablation  # a quick look

It writes ``docs/assets/ablation.md`` (the table the chapter includes) and ``ablation.json``.
"""

import json
import multiprocessing
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from anywhere
from src.cli import Parser, positive_int, run_command  # noqa: E402
from src.data import (  # noqa: E402
    GPTDataset,
    load_corpus,
    split_tokens,
    step_batch,
    tokenize_cached,
    train_tokenizer_cached,
)
from src.files import cache_dir, write_atomically  # noqa: E402
from src.model import PRESETS, GPTConfig, GPTModel, count_parameters  # noqa: E402
from src.training import Schedule, adamw, cross_entropy, optimizer_step  # noqa: E402

OUT = REPO / "docs" / "assets"
BASE = PRESETS["cpu-small"]
# Each change alone, on top of GPT-2's block; then all of them, which is the cpu-llama preset.
CHANGES: dict[str, dict] = {
    "GPT-2 block (cpu-small)": {},
    "RMSNorm instead of LayerNorm": dict(norm="rmsnorm"),
    "RoPE instead of learned positions": dict(pos_emb="rope"),
    "SwiGLU instead of GELU (width 704)": dict(ff="swiglu"),
    "grouped-query attention (2 key/value heads)": dict(n_kv_heads=2),
    "QK-norm": dict(qk_norm=True),
    "no biases": dict(bias=False),
    "all of them (cpu-llama)": {
        k: v for k, v in PRESETS["cpu-llama"].to_dict().items() if BASE.to_dict()[k] != v
    },
}
BATCH, LR, MIN_LR, WARMUP = 8, 1e-3, 1e-4, 50  # the default run's settings


def corpus_splits(vocab_size: int) -> tuple[GPTDataset, GPTDataset, int]:
    """The default run's data: the built-in corpus, its cached BPE, 90% / 10% by position."""
    corpus = load_corpus()
    tokenizer = train_tokenizer_cached(corpus, vocab_size, cache_dir())
    train_tokens, val_tokens = split_tokens(tokenize_cached(corpus, tokenizer, cache_dir()))
    T = BASE.context_length
    return (
        GPTDataset(train_tokens, T, stride=T),
        GPTDataset(val_tokens, T, stride=T),
        tokenizer.n_vocab,
    )


def train_and_evaluate(cfg: GPTConfig, train_set, val_set, steps: int, seed: int) -> float:
    """Train a fresh model as the default run does; return its loss on the whole validation split."""
    torch.manual_seed(seed)
    model = GPTModel(cfg)
    optimizer = adamw(model, LR, weight_decay=0.1)
    schedule = Schedule(LR, MIN_LR, WARMUP, steps)
    model.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = schedule(step)
        batch = train_set.batch(step_batch(step, len(train_set), BATCH, seed))
        optimizer_step(model, optimizer, [batch], lambda xy: cross_entropy(model(xy[0]), xy[1]),
                       step + 1)  # fmt: skip
    model.eval()
    with torch.no_grad():
        x, y = val_set.batch(torch.arange(len(val_set)))
        losses = [cross_entropy(model(x[i : i + BATCH]), y[i : i + BATCH]).item() * len(x[i : i + BATCH])
                  for i in range(0, len(x), BATCH)]  # fmt: skip
    return sum(losses) / len(x)


_data: tuple | None = None  # a worker's training and validation sets, loaded once


def run(task: tuple[str, GPTConfig, int, int]) -> tuple[str, int, float]:
    """One training run, ``(name, config, seed, steps)`` -> ``(name, seed, validation loss)``, in a
    worker process of one thread: a run depends on its seed alone, not on which worker runs it."""
    global _data
    name, cfg, seed, steps = task
    torch.set_num_threads(1)
    if _data is None:
        _data = corpus_splits(BASE.vocab_size)[:2]
    return name, seed, train_and_evaluate(cfg, *_data, steps, seed)


def training_speed(configs: dict[str, GPTConfig], train_set, repeats: int) -> dict[str, float]:
    """Tokens per second of one optimizer step, per configuration: the configurations take turns,
    ``repeats`` rounds of 3 steps each, and each one's median round is reported."""
    models = {}
    for name, cfg in configs.items():
        torch.manual_seed(0)
        models[name] = GPTModel(cfg).train()
    optimizers = {name: adamw(m, LR, 0.1) for name, m in models.items()}
    batch = train_set.batch(step_batch(0, len(train_set), BATCH, 0))
    rounds: dict[str, list[float]] = {name: [] for name in configs}
    for r in range(repeats + 1):  # round 0 warms up (allocations, first calls)
        for name, model in models.items():
            start = time.perf_counter()
            for step in range(3):
                optimizer_step(model, optimizers[name], [batch],
                               lambda xy, m=model: cross_entropy(m(xy[0]), xy[1]), step + 1)  # fmt: skip
            if r:
                rounds[name].append(3 * batch[0].numel() / (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in rounds.items()}


def table(results: list[dict], seeds: list[int], base_tps: float) -> str:
    header = ["configuration", "parameters", *[f"seed {s}" for s in seeds], "mean", "spread",
              "vs GPT-2", "tokens/s", "speed vs GPT-2"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
    base = results[0]["mean"]
    for r in results:
        cells = [r["name"], f"{r['parameters'] / 1e6:.2f} M", *[f"{v:.3f}" for v in r["val_loss"]],
                 f"{r['mean']:.3f}", f"{r['spread']:.3f}",
                 "" if r is results[0] else f"{r['mean'] - base:+.3f}",
                 f"{r['tokens_per_sec']:,.0f}", f"{r['tokens_per_sec'] / base_tps:.2f}x"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parser() -> Parser:
    p = Parser(prog="experiments/ablation.py", description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=positive_int, default=200, help="optimizer steps per run")
    p.add_argument("--seeds", type=positive_int, default=2, help="seeds per configuration: 1 .. N")
    p.add_argument("--repeats", type=positive_int, default=7,
                   help="rounds of the speed measurement")  # fmt: skip
    p.add_argument("--out", type=Path, default=OUT, help="folder for ablation.md and .json")
    p.add_argument("--jobs", type=positive_int, default=2,
                   help="training runs at a time, one process and one thread each")  # fmt: skip
    p.add_argument("--threads", type=positive_int, default=1, help="CPU threads of the speed "
                   "measurement (one: on a shared machine more threads wait for each other)")  # fmt: skip
    return p


def main(args) -> None:
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    train_set, val_set, vocab_size = corpus_splits(BASE.vocab_size)
    configs = {name: replace(BASE, vocab_size=vocab_size, **change)
               for name, change in CHANGES.items()}  # fmt: skip
    seeds = list(range(1, args.seeds + 1))
    tasks = [(name, cfg, seed, args.steps) for name, cfg in configs.items() for seed in seeds]
    losses: dict[tuple[str, int], float] = {}
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        for name, seed, loss in pool.map(run, tasks):
            losses[name, seed] = loss
            print(f"{name}, seed {seed}: validation loss {loss:.3f}", flush=True)
    results = []
    for name, cfg in configs.items():
        with torch.device("meta"):
            n_params = count_parameters(GPTModel(cfg))
        values = [losses[name, seed] for seed in seeds]
        results.append({"name": name, "change": CHANGES[name], "parameters": n_params,
                        "val_loss": values, "mean": statistics.mean(values),
                        "spread": max(values) - min(values)})  # fmt: skip
    speeds = training_speed(configs, train_set, args.repeats)
    for r in results:
        r["tokens_per_sec"] = speeds[r["name"]]
    minutes = (time.perf_counter() - started) / 60
    setup = (f"{args.steps} steps of {BATCH} x {BASE.context_length} tokens, seeds {seeds[0]}-"
             f"{seeds[-1]}, one thread each; speed on {torch.get_num_threads()} thread(s); torch {torch.__version__}, "
             f"{torch.backends.cpu.get_cpu_capability()}; {minutes:.0f} min")  # fmt: skip
    text = (table(results, seeds, results[0]["tokens_per_sec"])
            + f"\n\nValidation loss over the whole validation split ({len(val_set)} windows); "
            "spread: the largest minus the smallest seed; tokens/s: one optimizer step, median of "
            f"{args.repeats} interleaved rounds.\n\n"
            f"*Made by `uv run python experiments/ablation.py` ({setup}).*\n")  # fmt: skip
    write_atomically(args.out / "ablation.md", text)
    write_atomically(args.out / "ablation.json", json.dumps(
        {"setup": setup, "steps": args.steps, "seeds": seeds, "results": results}, indent=2) + "\n")  # fmt: skip
    print(text)


if __name__ == "__main__":
    sys.exit(run_command(parser(), main, sys.argv[1:]))
