"""Training efficiency, measured: what each technique buys on the default run, and what it costs.

    uv run python experiments/efficiency.py                    # every experiment, then the table
    uv run python experiments/efficiency.py muon accumulation  # some of them, then the table

- ``muon``: Muon against AdamW, each with its learning rate tuned on the same grid, two seeds each:
  steps and seconds to reach the validation loss that every tuned AdamW run reaches.
- ``bf16``: autocast to bfloat16 on the CPU against float32: the final loss, and tokens/s.
- ``compile``: ``torch.compile`` against eager: the time the first step spends compiling, tokens/s.
- ``checkpointing``: activation checkpointing: peak memory against time per step.
- ``accumulation``: four micro-batches of 2 against one batch of 8: the same losses, at what cost.

The speeds are measured in this process, the variants taking turns step by step (medians of 5), so
that a shared machine slows them alike; the losses come from whole trainer runs.

Every training run is the real trainer (``src.train``) on the default settings, written to
``runs/efficiency/<name>`` and reused when it is complete (resumed when it is not). Each experiment
writes ``docs/assets/efficiency/<name>.json``; the table the chapter shows,
``docs/assets/efficiency/table.md``, is assembled from them.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere
from src import train as trainer
from src.checkpoints import find_checkpoint
from src.cli import read_jsonl
from src.flops import PeakMemory, training_memory
from src.model import PRESETS, GPTConfig, GPTModel
from src.training import adamw, autocast, cross_entropy, optimizer_step

REPO = Path(__file__).resolve().parent.parent
RUNS = REPO / "runs" / "efficiency"
OUT = REPO / "docs" / "assets" / "efficiency"
STEPS, BATCH = trainer.DEFAULT_MAX_STEPS, 8  # the default run: 200 steps of 8 sequences
PRESET = "cpu-small"  # the default run's model; --preset changes it for the trainer runs
DEFAULT_TOKENS = BATCH * 256  # a step of the default run, in tokens
LEARNING_RATES = (1e-3, 2e-3, 4e-3)  # the grid each optimizer is tuned on, widened at an edge


def run(name: str, flags: list[str], steps: int = STEPS) -> list[dict]:
    """The metrics rows of the trainer run ``name``: the default run with ``flags``."""
    out = RUNS / PRESET / name
    rows = read_jsonl(out / "metrics.jsonl")
    if rows and rows[-1]["step"] == steps and "val_loss" in rows[-1]:
        return rows  # done before
    again = ["--resume"] if find_checkpoint(out) else ["--overwrite"] if out.exists() else []
    print(f"== {name}: python -m src.train {' '.join(flags)}", file=sys.stderr, flush=True)
    code = trainer.main(["--preset", PRESET, *flags, "--max-steps", str(steps), "--out-dir", str(out),
                         *again])  # fmt: skip
    if code != 0:
        sys.exit(f"error: the run {name} failed (exit code {code})")
    return read_jsonl(out / "metrics.jsonl")


def final_loss(rows: list[dict]) -> float:
    return rows[-1]["val_loss"]


def step_seconds(row: dict) -> float:
    return tokens_per_step() / row["tokens_per_sec"]


def tokens_per_step() -> int:
    return BATCH * PRESETS[PRESET].context_length


def to_target(rows: list[dict], target: float) -> tuple[float | None, float | None]:
    """The step at which the validation loss first reaches ``target`` (interpolated between two
    evaluations), and the training seconds up to it; None if it never does."""
    evals = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    for (s0, l0), (s1, l1) in zip(evals, evals[1:], strict=False):
        if l1 <= target:
            step = s1 - (s1 - s0) * (target - l1) / (l0 - l1) if l0 > l1 else s1
            seconds = sum(step_seconds(r) for r in rows if 0 < r["step"] <= round(step))
            return step, seconds
    return None, None


# --8<-- [start:muon]
def tuned(optimizer: str) -> tuple[float, dict[float, float]]:
    """The learning rate with the lowest final validation loss on the default run (seed 123), from
    ``LEARNING_RATES``, widened by a factor of 2 while the best is at an edge: one rule for both."""
    rates = list(LEARNING_RATES)
    finals = {}
    while True:
        for lr in rates:
            if lr not in finals:
                finals[lr] = final_loss(
                    run(f"{optimizer}-lr{lr:g}-seed123", tuning_flags(optimizer, lr))
                )
        best = min(finals, key=finals.get)
        if best == max(rates) and len(rates) < 6:
            rates.append(best * 2)
        elif best == min(rates) and len(rates) < 6:
            rates.insert(0, best / 2)
        else:
            return best, finals


def tuning_flags(optimizer: str, lr: float, seed: int = 123) -> list[str]:
    # Evaluated every 10 steps (the default: 50), to see when a target is reached; evaluation
    # reads fixed windows and draws no random numbers, so training is the default run's.
    return ["--optimizer", optimizer, "--lr", str(lr), "--seed", str(seed), "--eval-interval", "10"]


def muon() -> dict:
    """Muon against AdamW, both tuned, two seeds each: steps and seconds to reach the loss that
    every tuned AdamW run reaches (the highest of their final losses)."""
    tuning = {optimizer: tuned(optimizer) for optimizer in ("adamw", "muon")}
    runs = {(optimizer, seed): run(f"{optimizer}-lr{lr:g}-seed{seed}", tuning_flags(optimizer, lr, seed))
            for optimizer, (lr, _) in tuning.items() for seed in (123, 7)}  # fmt: skip
    target = max(final_loss(rows) for (optimizer, _), rows in runs.items() if optimizer == "adamw")
    result = {"target": target}
    for optimizer, (lr, sweep) in tuning.items():
        mine = {seed: rows for (o, seed), rows in runs.items() if o == optimizer}
        result[optimizer] = {
            "lr": lr,
            "sweep": sweep,
            "final": {seed: final_loss(rows) for seed, rows in mine.items()},
            "to_target": {seed: to_target(rows, target) for seed, rows in mine.items()},
            "tokens_per_sec": statistics.median(
                r["tokens_per_sec"] for rows in mine.values() for r in rows if r["step"] > 1
            ),
        }
    return result


# --8<-- [end:muon]


def bf16() -> dict:
    """bf16 autocast against float32: the final loss of the default run (AdamW at its default
    rate), and the time of a step, the two taking turns."""
    finals = {dtype: final_loss(run(f"adamw-lr0.001-seed123{'' if dtype == 'fp32' else '-bf16'}",
                                    tuning_flags("adamw", 1e-3) + ["--dtype", dtype]))
              for dtype in ("fp32", "bf16")}  # fmt: skip
    (_, fp32_s), (_, bf16_s) = measure([training_step(), training_step(dtype="bf16")])
    return {dtype: {"final": finals[dtype], "tokens_per_sec": DEFAULT_TOKENS / seconds}
            for dtype, seconds in (("fp32", fp32_s), ("bf16", bf16_s))}  # fmt: skip


def compile_experiment() -> dict:
    """torch.compile against eager: the first compiled step compiles; then both take turns."""
    (_, eager_s, _), (_, compiled_s, first_s) = measure(
        [training_step(), training_step(compiled=True)], first=True
    )
    return {"compile_s": first_s - compiled_s,
            "eager": {"step_s": eager_s, "tokens_per_sec": DEFAULT_TOKENS / eager_s},
            "compile": {"step_s": compiled_s, "tokens_per_sec": DEFAULT_TOKENS / compiled_s}}  # fmt: skip


def default_model() -> tuple[GPTConfig, torch.Tensor, torch.Tensor]:
    """The default run's model (cpu-small, its 8,192-token vocabulary) and a batch of random ids:
    what the speed and memory measurements in this process time, whatever ``--preset`` says."""
    cfg = GPTConfig.from_preset("cpu-small")
    generator = torch.Generator().manual_seed(0)
    shape = (BATCH, cfg.context_length)
    x, y = (torch.randint(0, cfg.vocab_size, shape, generator=generator) for _ in "xy")
    return cfg, x, y


def training_step(checkpointing: bool = False, micro: int = BATCH, dtype: str = "fp32",
                  compiled: bool = False):  # fmt: skip
    """A maker of one default training step (``BATCH`` sequences in micro-batches of ``micro``),
    through the trainer's parts: checkpointed blocks, autocast, ``torch.compile``."""

    def make():
        cfg, x, y = default_model()
        torch.manual_seed(0)
        model = GPTModel(cfg)
        if checkpointing:
            trainer.checkpoint_blocks(model)
        optimizer = adamw(model, 1e-3, 0.1)
        stepping = torch.compile(model) if compiled else model
        amp = autocast(torch.device("cpu"), dtype)
        batches = [(x[i : i + micro], y[i : i + micro]) for i in range(0, BATCH, micro)]

        def loss_fn(xy):
            with amp:
                return cross_entropy(stepping(xy[0]), xy[1])

        return lambda: optimizer_step(stepping, optimizer, batches, loss_fn, 1)

    return make


def measure(makers, repeats: int = 5, first: bool = False) -> list[tuple]:
    """For each variant: (peak bytes allocated above the weights and AdamW's moments, median
    seconds of a step), and with ``first`` the seconds of its first step. The variants take turns,
    so a busy machine slows them alike; the peak is measured in a step of its own, since watching
    every allocation slows a step down."""
    steps, firsts = [make() for make in makers], []
    for step in steps:
        start = time.perf_counter()
        step()  # warm-up: AdamW's moments, and for torch.compile the compilation
        firsts.append(time.perf_counter() - start)
    peaks = []
    for step in steps:
        with PeakMemory() as memory:
            step()
        peaks.append(memory.peak)
    times = [[] for _ in steps]
    for _ in range(repeats):
        for i, step in enumerate(steps):
            start = time.perf_counter()
            step()
            times[i].append(time.perf_counter() - start)
    medians = [statistics.median(t) for t in times]
    return [
        (peak, m, f) if first else (peak, m)
        for peak, m, f in zip(peaks, medians, firsts, strict=True)
    ]


def checkpointing() -> dict:
    """Peak memory and time per step, with and without activation checkpointing, beside the
    estimate of ``src.flops``."""
    (plain, plain_s), (kept, kept_s) = measure([training_step(), training_step(True)])
    cfg, _, _ = default_model()
    held = training_memory(cfg, BATCH).weights + training_memory(cfg, BATCH).optimizer
    return {name: {"peak_bytes": held + peak, "step_s": seconds,
                   "estimate_bytes": training_memory(cfg, BATCH, flag).peak}
            for name, flag, peak, seconds in (("plain", False, plain, plain_s),
                                              ("checkpointing", True, kept, kept_s))}  # fmt: skip


def accumulation() -> dict:
    """A batch of 8 at once against 4 micro-batches of 2: the losses of 20 trainer steps, then
    peak memory and time per step measured side by side."""
    rows = {n: run(f"accum-{n}", ["--grad-accum", str(n), "--eval-interval", "20"], steps=20)
            for n in (1, 4)}  # fmt: skip
    losses = [[r["train_loss"] for r in rows[n][1:]] for n in (1, 4)]
    (one, one_s), (four, four_s) = measure([training_step(), training_step(micro=2)])
    cfg, _, _ = default_model()
    held = training_memory(cfg, BATCH).weights + training_memory(cfg, BATCH).optimizer
    return {"max_relative_difference": max(abs(a - b) / a for a, b in zip(*losses, strict=True)),
            "final_loss": {"1": losses[0][-1], "4": losses[1][-1]},
            "peak_bytes": {"1": held + one, "4": held + four}, "step_s": {"1": one_s, "4": four_s}}  # fmt: skip


EXPERIMENTS = {"muon": muon, "bf16": bf16, "compile": compile_experiment,
               "checkpointing": checkpointing, "accumulation": accumulation}  # fmt: skip


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def muon_row(m: dict) -> str:
    def reach(entry):
        steps = [s for s, _ in entry["to_target"].values()]
        seconds = [t for _, t in entry["to_target"].values()]
        if None in steps:
            return "not reached by every seed"
        return f"{statistics.mean(steps):.0f} steps, {statistics.mean(seconds):.0f} s"

    final = {o: statistics.mean(m[o]["final"].values()) for o in ("muon", "adamw")}
    return (f"| Muon (lr {m['muon']['lr']:g}) | AdamW (lr {m['adamw']['lr']:g}), both tuned, 2 seeds "
            f"each | steps and training time to val loss {m['target']:.3f} | {reach(m['muon'])} "
            f"against {reach(m['adamw'])}; final {final['muon']:.3f} against {final['adamw']:.3f} |")  # fmt: skip


def bf16_row(b: dict) -> str:
    speed = {dtype: b[dtype]["tokens_per_sec"] for dtype in ("bf16", "fp32")}
    return (f"| bf16 autocast (CPU) | fp32 | tokens/s; final val loss | {speed['bf16']:,.0f} against "
            f"{speed['fp32']:,.0f} tokens/s ({speed['bf16'] / speed['fp32']:.2f}x); "
            f"{b['bf16']['final']:.3f} against {b['fp32']['final']:.3f} |")  # fmt: skip


def compile_row(c: dict) -> str:
    speed = {mode: c[mode]["tokens_per_sec"] for mode in ("compile", "eager")}
    return (f"| `torch.compile` | eager | compile time; tokens/s | {c['compile_s']:.0f} s to compile; "
            f"{speed['compile']:,.0f} against {speed['eager']:,.0f} tokens/s "
            f"({speed['compile'] / speed['eager']:.2f}x) |")  # fmt: skip


def checkpointing_row(k: dict) -> str:
    peak = {name: mib(k[name]["peak_bytes"]) for name in ("checkpointing", "plain")}
    ms = {name: k[name]["step_s"] * 1000 for name in ("checkpointing", "plain")}
    return (f"| activation checkpointing | none | peak memory; time per step | {peak['checkpointing']} "
            f"against {peak['plain']}; {ms['checkpointing']:.0f} against {ms['plain']:.0f} ms "
            f"({ms['checkpointing'] / ms['plain']:.2f}x) |")  # fmt: skip


def accumulation_row(a: dict) -> str:
    return (f"| gradient accumulation, 4 x 2 sequences | one batch of 8 | losses of 20 steps; peak "
            f"memory; time per step | the same losses to a relative {a['max_relative_difference']:.0e}; "
            f"{mib(a['peak_bytes']['4'])} against {mib(a['peak_bytes']['1'])}; "
            f"{a['step_s']['4'] * 1000:.0f} against {a['step_s']['1'] * 1000:.0f} ms |")  # fmt: skip


ROWS = {"muon": muon_row, "bf16": bf16_row, "compile": compile_row,
        "checkpointing": checkpointing_row, "accumulation": accumulation_row}  # fmt: skip


def table(results: dict) -> str:
    """The chapter's table: one row per technique, from whichever results exist, and the
    commands that made them."""
    lines = ["| technique | against | measured | result |", "| --- | --- | --- | --- |"]
    lines += [row(results[name]) for name, row in ROWS.items() if name in results]
    by_preset = {}
    for name in ROWS:
        if name in results:
            by_preset.setdefault(results[name].get("preset", "cpu-small"), []).append(name)
    commands = ", ".join(f"`uv run python experiments/efficiency.py"
                         f"{'' if preset == 'cpu-small' else ' --preset ' + preset} {' '.join(names)}`"
                         for preset, names in by_preset.items())  # fmt: skip
    return "\n".join(lines) + (f"\n\n*Made by {commands} ({torch.get_num_threads()} thread, torch "
                               f"{torch.__version__}).*\n")  # fmt: skip


def main() -> None:
    global PRESET  # every experiment reads it
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"experiments to run (default: all): {', '.join(EXPERIMENTS)}")  # fmt: skip
    parser.add_argument("--preset", default=PRESET, choices=list(PRESETS),
                        help="the model of every run (cpu-small: the default run's)")  # fmt: skip
    args = parser.parse_args()
    PRESET = args.preset
    # One thread: on a shared machine a second thread mostly waits for a core, and the table
    # compares the techniques with each other, on the same thread.
    torch.set_num_threads(1)
    for name in args.names:
        if name not in EXPERIMENTS:
            parser.error(f"unknown experiment {name!r}; the experiments: {', '.join(EXPERIMENTS)}")
    for name in args.names or EXPERIMENTS:
        result = EXPERIMENTS[name]() | {"preset": PRESET}
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        print(json.dumps(result, indent=1))
    results = {p.stem: json.loads(p.read_text("utf-8")) for p in sorted(OUT.glob("*.json"))}
    (OUT / "table.md").write_text(table(results), encoding="utf-8")
    print(table(results))


if __name__ == "__main__":
    main()
