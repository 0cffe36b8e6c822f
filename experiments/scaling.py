"""A scaling-laws lab: at a fixed compute budget, which model size gives the lowest loss?

Train a grid of models in an IsoFLOP design (Hoffmann et al., 2022): for each compute budget C,
models of several sizes N, each trained on exactly the D tokens that spend C,
``D = C / training_flops_per_token``. Then fit what the grid shows, two ways:

- **IsoFLOP parabolas** (Chinchilla's approach 2): at each budget the final loss against log N is
  about a parabola; its lowest point is the compute-optimal size N_opt(C), and likewise D_opt(C).
  A line through log N_opt against log C gives the exponent ``a`` of N_opt ~ C^a, and ``b`` of
  D_opt ~ C^b.
- **A parametric law** (approach 3): L(N, D) = E + A / N^alpha + B / D^beta fitted to every run,
  with a Huber loss on log L. Minimising it at fixed C = 6 N D gives a = beta / (alpha + beta).

    uv run python experiments/scaling.py           # the full lab: 3 budgets, 18 runs
    uv run python experiments/scaling.py --quick   # 3 budgets, 12 runs

The corpus is the standard library's source and tests (``--data python-stdlib``), 15 million
tokens, so that no run sees a token twice. The models are one family with one dial (the depth, as in
nanochat): ``n_layers = depth``, ``emb_dim = 8 depth``, heads of 8 dimensions, so that neighbouring
sizes differ by a factor of about 2 where this lab's optima lie. Each budget starts from the sizes
around Chinchilla's 20 tokens per parameter; a budget whose lowest loss is at an edge of its sizes
gets the next size beyond that edge, until its minimum is inside (or no size fits its data). Every
finished run is kept as one JSON file in ``--out``/runs, written atomically, so an interrupted lab
continues where it stopped. The results go to ``--out``: ``scaling.json`` (the runs, the fit, the
exponents) and ``scaling.png``; with ``--book``, a table for the book in ``docs/assets/scaling/``.
"""

import argparse
import contextlib
import hashlib
import io
import json
import math
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere
from benchmarks.harness import markdown_table
from src.data import (
    GPTDataset,
    load_corpus,
    read_token_file,
    split_tokens,
    step_batch,
    tokenize_cached,
    train_tokenizer_cached,
)
from src.files import cache_dir, write_atomically
from src.flops import matmul_parameters, training_flops_per_token
from src.model import GPTConfig, GPTModel
from src.train import evaluate
from src.training import Schedule, adamw, cross_entropy, optimizer_step

REPO = Path(__file__).resolve().parent.parent
BOOK = REPO / "docs" / "assets" / "scaling"


# --8<-- [start:design]
@dataclass(frozen=True)
class Design:
    """Everything that decides the lab's runs; a changed field means new runs, never stale ones."""

    budgets: tuple[float, ...]  # compute budgets C, in FLOPs
    depths: tuple[int, ...]  # the sizes on offer; each budget trains the ones that fit
    sizes_per_budget: int = 5  # the depths a budget starts from, around its guess of the optimum
    data: str = "python-stdlib"
    vocab_size: int = 512
    context_length: int = 128
    batch_size: int = 8  # sequences per step: 1,024 tokens
    min_steps: int = 20  # fewer, and the schedule is all warmup
    eval_windows: int = 128  # the same first 128 validation windows for every run
    seed: int = 123


QUICK = Design(budgets=(1.5e11, 3e11, 6e11), depths=tuple(range(1, 11)), sizes_per_budget=4)
FULL = Design(budgets=(3e11, 1e12, 3e12), depths=tuple(range(1, 13)), sizes_per_budget=6)


def model_config(depth: int, design: Design) -> GPTConfig:
    """The depth dial: one number sets the width and the heads too (8 dimensions per head)."""
    return GPTConfig(vocab_size=design.vocab_size, context_length=design.context_length,
                     emb_dim=8 * depth, n_heads=depth, n_layers=depth, drop_rate=0.0)  # fmt: skip


def learning_rate(cfg: GPTConfig) -> float:
    """Narrower models take larger steps: AdamW's rate falls as 1 / sqrt(width)."""
    return 3e-3 * (64 / cfg.emb_dim) ** 0.5


def sizes(design: Design, n_train: int) -> dict[float, list[dict]]:
    """Every run each budget can train, smallest model first: the depths whose run has at least
    ``min_steps`` steps and reads no training token twice."""
    tokens_per_step = design.batch_size * design.context_length
    options = {}
    for budget in design.budgets:
        options[budget] = []
        for depth in design.depths:
            cfg = model_config(depth, design)
            steps = round(budget / (training_flops_per_token(cfg) * tokens_per_step))
            D = steps * tokens_per_step
            if design.min_steps <= steps and D <= n_train:
                options[budget].append({"budget": budget, "depth": depth, "config": cfg.to_dict(),
                                        "N": matmul_parameters(cfg), "D": D,
                                        "C": training_flops_per_token(cfg) * D, "steps": steps,
                                        "lr": learning_rate(cfg)})  # fmt: skip
    return options


def first_window(options: list[dict], design: Design) -> range:
    """The ``sizes_per_budget`` runs in a row a budget starts from, centred on the size that
    Chinchilla's 20 tokens per parameter would pick (a guess, which the losses then correct)."""
    guess = math.sqrt(options[0]["budget"] / 120)  # C = 6 N D and D = 20 N
    centre = min(range(len(options)), key=lambda i: abs(math.log(options[i]["N"] / guess)))
    first = max(
        0, min(centre - design.sizes_per_budget // 2, len(options) - design.sizes_per_budget)
    )
    return range(first, min(len(options), first + design.sizes_per_budget))


def widened(window: range, losses: list[float], n_options: int) -> range:
    """The window one size wider on the side where its lowest loss sits, if that is an edge and a
    size beyond it fits; else the same window, whose minimum is inside (or cannot be)."""
    low = min(range(len(losses)), key=losses.__getitem__)
    if low == 0 and window.start > 0:
        return range(window.start - 1, window.stop)
    if low == len(losses) - 1 and window.stop < n_options:
        return range(window.start, window.stop + 1)
    return window


# --8<-- [end:design]


# --8<-- [start:run]
def train_run(run: dict, design: Design, tokens_path: str) -> dict:
    """Train one model of the grid for its ``steps`` with the project's one optimizer step, and
    measure its final validation loss. One thread: the lab runs one model per core."""
    torch.set_num_threads(1)
    dtype = np.dtype(np.uint16 if design.vocab_size <= 2**16 else np.uint32)
    train_tokens, val_tokens = split_tokens(read_token_file(Path(tokens_path), dtype))
    # --8<-- [start:too_little_data]
    if run.get("distinct_tokens"):  # Break it: the same steps, over a sliver of the data, repeated
        train_tokens = train_tokens[: run["distinct_tokens"] + 1]
    # --8<-- [end:too_little_data]
    T, B = design.context_length, design.batch_size
    train_set, val_set = (GPTDataset(t, T, stride=T) for t in (train_tokens, val_tokens))
    cfg = GPTConfig(**run["config"])
    torch.manual_seed(design.seed)
    model = GPTModel(cfg)
    optimizer = adamw(model, run["lr"], weight_decay=0.1)
    # Warmup, then a cosine to a tenth over exactly this run's tokens: a schedule cut off early
    # would make every short run look worse than it is (Hoffmann et al., 2022, section 3).
    schedule = Schedule(run["lr"], run["lr"] / 10, max(1, run["steps"] // 10), run["steps"])
    start = time.perf_counter()
    model.train()
    for step in range(run["steps"]):
        for group in optimizer.param_groups:
            group["lr"] = schedule(step)
        batch = train_set.batch(step_batch(step, len(train_set), B, design.seed))
        loss, _ = optimizer_step(model, optimizer, [batch],
                                 lambda xy: cross_entropy(model(xy[0]), xy[1]), step + 1)  # fmt: skip
    seconds = time.perf_counter() - start
    losses = {f"{name}_loss": evaluate(model, split, design.eval_windows, B, torch.device("cpu"),
                                       contextlib.nullcontext())
              for name, split in (("val", val_set), ("eval_train", train_set))}  # fmt: skip
    return run | losses | {"train_loss": loss, "seconds": seconds}


# --8<-- [end:run]


# --8<-- [start:cache]
def run_key(run: dict, design: Design, corpus_fingerprint: str) -> str:
    """The run's file name: its budget and depth, and a hash of everything it depends on."""
    inputs = json.dumps([run, asdict(design) | {"budgets": None, "depths": None,
                                               "sizes_per_budget": None}, corpus_fingerprint],
                        sort_keys=True)  # fmt: skip
    return f"C{run['budget']:.2g}-depth{run['depth']}-{hashlib.sha256(inputs.encode()).hexdigest()[:10]}"


def lab_data(design: Design):
    """The corpus and its token ids, tokenized once and cached like every corpus here."""
    corpus = load_corpus(design.data)
    tokenizer = train_tokenizer_cached(corpus, design.vocab_size, cache_dir())
    return corpus, tokenize_cached(corpus, tokenizer, cache_dir())


def run_grid(design: Design, out: Path, jobs: int) -> list[dict]:
    """Every run of the design, trained or read back from ``out/runs``: each budget's first window
    of sizes, then, round after round, one size more for each budget whose lowest loss is at an
    edge of its window."""
    data = lab_data(design)
    options = sizes(design, len(split_tokens(data[1])[0]))
    windows = {budget: first_window(runs, design) for budget, runs in options.items()}
    while True:
        results = train_all([options[b][i] for b, w in windows.items() for i in w], design, out,
                            jobs, data)  # fmt: skip
        loss = {(r["budget"], r["depth"]): r["val_loss"] for r in results}
        wider = {b: widened(w, [loss[b, options[b][i]["depth"]] for i in w], len(options[b]))
                 for b, w in windows.items()}  # fmt: skip
        if wider == windows:
            return sorted(results, key=lambda r: (r["budget"], r["N"]))
        windows = wider


def train_all(runs: list[dict], design: Design, out: Path, jobs: int, data) -> list[dict]:
    """The results of ``runs``, in their order: read back from ``out/runs``, or trained, the
    longest first so that the workers finish together, and each kept as soon as it finishes."""
    corpus, tokens = data
    paths = [out / "runs" / f"{run_key(run, design, corpus.fingerprint)}.json" for run in runs]
    done = {path: json.loads(path.read_text("utf-8")) for path in paths if path.is_file()}
    todo = sorted(((p, r) for p, r in zip(paths, runs, strict=True) if p not in done),
                  key=lambda item: -item[1]["C"])  # fmt: skip
    print(f"{len(runs)} runs: {len(done)} done before, {len(todo)} to train on {jobs} "
          f"process(es); {len(tokens):,} tokens of {corpus.name}", file=sys.stderr)  # fmt: skip
    for path, result in trained(todo, design, tokens.filename, jobs):
        write_atomically(path, json.dumps(result, indent=1))
        done[path] = result
        print(f"[{len(done)}/{len(runs)}] C {result['budget']:.2g}, depth {result['depth']}: "
              f"N {result['N']:,}, D {result['D']:,}, {result['seconds']:.0f} s, val loss "
              f"{result['val_loss']:.3f}", file=sys.stderr)  # fmt: skip
    return [done[path] for path in paths]


def trained(todo: list[tuple[Path, dict]], design: Design, tokens_path: str, jobs: int):
    """(path, result) of every run in ``todo`` as it finishes: in this process for one job, else
    in a pool of fresh interpreters (spawned, the same on every system)."""
    if jobs == 1:
        for path, run in todo:
            yield path, train_run(run, design, tokens_path)
        return
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(train_run, run, design, tokens_path): path for path, run in todo}
        for future in as_completed(futures):
            yield futures[future], future.result()


# --8<-- [end:cache]


# --8<-- [start:isoflop]
def isoflop_minima(runs: list[dict]) -> list[dict]:
    """Approach 2: per budget, a parabola through the lowest loss and up to two runs on each side
    of it, in log N and in log D; its lowest point. Far from the minimum the curve is no parabola
    (a model trained on a tenth of a token per parameter is simply unfinished), so the fit stays
    local. A budget whose lowest loss is at the edge of its grid has no minimum to find here."""
    minima = []
    for budget in sorted({r["budget"] for r in runs}):
        group = sorted((r for r in runs if r["budget"] == budget), key=lambda r: r["N"])
        low = min(range(len(group)), key=lambda i: group[i]["val_loss"])
        if not 0 < low < len(group) - 1:
            continue
        near = group[max(0, low - 2) : low + 3]
        loss = np.array([r["val_loss"] for r in near])
        best = {}
        for name in ("N", "D"):
            x = np.log([r[name] for r in near])
            c2, c1, _ = np.polyfit(x, loss, 2)  # loss ~ c2 x^2 + c1 x + c0, c2 > 0 at a minimum
            best[name] = math.exp(-c1 / (2 * c2))
        C = float(np.exp(np.mean(np.log([r["C"] for r in group]))))  # runs round their steps
        minima.append({"budget": budget, "C": C, "N_opt": best["N"], "D_opt": best["D"]})
    return minima


def power_law(C: list[float], y: list[float]) -> tuple[float, float]:
    """(exponent, prefactor) of y = k C^exponent: a straight line in log-log."""
    exponent, log_k = np.polyfit(np.log(C), np.log(y), 1)
    return float(exponent), float(math.exp(log_k))


# --8<-- [end:isoflop]


# --8<-- [start:parametric]
def fit_law(N, D, loss) -> dict:
    """Approach 3: L(N, D) = E + A / N^alpha + B / D^beta, fitted as Chinchilla does: the Huber
    loss (delta 1e-3) of log L against the law's prediction, minimised with L-BFGS.

    The surface has poor local minima, so the start matters. Chinchilla starts from a large grid
    of all five parameters; here the grid is over the two exponents alone, because for fixed
    exponents the law is linear in E, A and B: one least-squares solve gives them. L-BFGS then
    continues from the five best points of the grid, and the lowest end point is kept."""
    N, D, loss = (np.asarray(v, dtype=np.float64) for v in (N, D, loss))
    starts = []
    for alpha in np.linspace(0.05, 1.5, 30):
        for beta in np.linspace(0.05, 1.5, 30):
            X = np.stack([np.ones_like(N), N**-alpha, D**-beta], axis=1)  # loss = X [E, A, B]
            # A law with a negative term has no logarithm: such a term starts at almost 0.
            E, A, B = np.maximum(np.linalg.lstsq(X, loss, rcond=None)[0], 1e-6)
            error = float(np.sum((X @ [E, A, B] - loss) ** 2))
            starts.append((error, (math.log(A), math.log(B), math.log(E), alpha, beta)))
    logs = [torch.tensor(np.log(v), dtype=torch.float64) for v in (N, D, loss)]
    _, (a, b, e, alpha, beta) = min(_fit_from(start, *logs) for _, start in sorted(starts)[:5])
    return {"E": math.exp(e), "A": math.exp(a), "B": math.exp(b), "alpha": alpha, "beta": beta}


def _fit_from(start, log_N, log_D, log_L) -> tuple[float, list[float]]:
    theta = torch.tensor(start, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([theta], max_iter=200, line_search_fn="strong_wolfe")

    def objective():
        optimizer.zero_grad()
        a, b, e, alpha, beta = theta
        terms = torch.stack([a - alpha * log_N, b - beta * log_D, e.expand_as(log_N)])
        value = F.huber_loss(torch.logsumexp(terms, dim=0), log_L, delta=1e-3, reduction="sum")
        value.backward()
        return value

    value = optimizer.step(objective).item()
    return (value if math.isfinite(value) else math.inf), theta.detach().tolist()


def optimal_allocation(fit: dict, C: float) -> tuple[float, float]:
    """N_opt and D_opt of the law at compute C = 6 N D: where dL/dN = 0 along that curve."""
    alpha, beta = fit["alpha"], fit["beta"]
    G = (alpha * fit["A"] / (beta * fit["B"])) ** (1 / (alpha + beta))
    N = G * (C / 6) ** (beta / (alpha + beta))
    return N, C / (6 * N)


# --8<-- [end:parametric]


def analyse(runs: list[dict]) -> dict:
    """``scaling.json``: the runs, the parametric fit, and both approaches' exponents. A grid too
    small to show them (fewer than two budgets with a lowest point) gives None, not a guess."""
    minima = isoflop_minima(runs)
    fit = fit_law([r["N"] for r in runs], [r["D"] for r in runs], [r["val_loss"] for r in runs])
    C = [m["C"] for m in minima]
    enough = len(minima) >= 2
    N3, D3 = optimal_allocation(fit, max(r["C"] for r in runs))
    keep = (
        "budget",
        "depth",
        "N",
        "D",
        "C",
        "steps",
        "lr",
        "val_loss",
        "eval_train_loss",
        "train_loss",
        "seconds",
    )
    return {
        "runs": [{k: r[k] for k in keep} for r in runs],
        "fit": fit,
        "a": power_law(C, [m["N_opt"] for m in minima])[0] if enough else None,
        "b": power_law(C, [m["D_opt"] for m in minima])[0] if enough else None,
        "tokens_per_param": minima[-1]["D_opt"] / minima[-1]["N_opt"] if minima else None,
        "isoflop_minima": minima,
        "parametric": {
            "a": fit["beta"] / (fit["alpha"] + fit["beta"]),
            "b": fit["alpha"] / (fit["alpha"] + fit["beta"]),
            "tokens_per_param": D3 / N3,
        },  # fmt: skip
    }


# --8<-- [start:plots]
def plot(result: dict, path: Path) -> None:
    """Three panels: the IsoFLOP curves, loss against compute, and the compute-optimal frontier."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, minima, fit = result["runs"], result["isoflop_minima"], result["fit"]
    budgets = sorted({r["budget"] for r in runs})
    colors = dict(zip(budgets, plt.cm.viridis(np.linspace(0, 0.85, len(budgets))), strict=True))
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4.4))
    for budget in budgets:
        group = sorted((r for r in runs if r["budget"] == budget), key=lambda r: r["N"])
        left.plot([r["N"] for r in group], [r["val_loss"] for r in group], "o", color=colors[budget],
                  label=f"C = {budget:.2g} FLOPs")  # fmt: skip
        minimum = [m for m in minima if m["budget"] == budget]
        if minimum:  # the parabola the minimum came from, over the runs it was fitted to
            low = int(np.argmin([r["val_loss"] for r in group]))
            near = group[max(0, low - 2) : low + 3]
            x = np.log([r["N"] for r in near])
            curve = np.polyfit(x, [r["val_loss"] for r in near], 2)
            xs = np.linspace(x.min(), x.max(), 50)
            left.plot(np.exp(xs), np.polyval(curve, xs), color=colors[budget], lw=1)
        middle.plot([r["C"] for r in group], [r["val_loss"] for r in group], "o",
                    color=colors[budget])  # fmt: skip
    for m in minima:
        left.axvline(m["N_opt"], color=colors[m["budget"]], ls=":", lw=1)
    C = np.geomspace(min(r["C"] for r in runs) / 2, max(r["C"] for r in runs) * 2, 50)
    frontier = [fit["E"] + fit["A"] / n ** fit["alpha"] + fit["B"] / d ** fit["beta"]
                for n, d in (optimal_allocation(fit, c) for c in C)]  # fmt: skip
    middle.plot(C, frontier, "k-", lw=1, label="fitted law at N_opt(C), D_opt(C)")
    right.plot(
        [m["C"] for m in minima], [m["N_opt"] for m in minima], "o", label="N_opt (parabolas)"
    )
    right.plot(
        [m["C"] for m in minima], [m["D_opt"] for m in minima], "s", label="D_opt (parabolas)"
    )
    N3, D3 = zip(*(optimal_allocation(fit, c) for c in C), strict=True)
    right.plot(C, N3, "C0-", lw=1, label="N_opt (fitted law)")
    right.plot(C, D3, "C1-", lw=1, label="D_opt (fitted law)")
    right.plot(C, np.sqrt(C / 120), "k:", lw=1, label="N at 20 tokens/parameter")
    for ax, xlabel, ylabel, title in (
        (left, "parameters N (matmul weights)", "validation loss", "IsoFLOP curves"),
        (middle, "compute C (FLOPs)", "validation loss", "loss against compute"),
        (right, "compute C (FLOPs)", "N (parameters), D (tokens)", "compute-optimal frontier"),
    ):
        ax.set(xscale="log", xlabel=xlabel, ylabel=ylabel, title=title)
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # 2e11, 3e11... overlap
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    right.set_yscale("log")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    write_atomically(path, buffer.getvalue())


# --8<-- [end:plots]


def book_table(result: dict, command: str) -> str:
    """The fitted law beside Chinchilla's and Kaplan's, as the chapter shows it."""
    fit, p = result["fit"], result["parametric"]
    rows = [
        "| | E | A | B | alpha | beta | a (N_opt ~ C^a) | b (D_opt ~ C^b) | tokens per parameter |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| ours, IsoFLOP parabolas | | | | | | {result['a']:.2f} | {result['b']:.2f} | "
        f"{result['tokens_per_param']:.1f} at C = {result['isoflop_minima'][-1]['C']:.1e} |",
        f"| ours, parametric fit | {fit['E']:.2f} | {fit['A']:.3g} | {fit['B']:.3g} | "
        f"{fit['alpha']:.2f} | {fit['beta']:.2f} | {p['a']:.2f} | {p['b']:.2f} | "
        f"{p['tokens_per_param']:.1f} |",
        "| Chinchilla, approach 2 | | | | | | 0.49 | 0.51 | about 20 |",
        "| Chinchilla, approach 3 | 1.69 | 406.4 | 410.7 | 0.34 | 0.28 | 0.46 | 0.54 | about 20 |",
        "| Kaplan et al. (2020) | | | | 0.076 | 0.095 | 0.73 | 0.27 | |",
    ]
    minutes = sum(r["seconds"] for r in result["runs"]) / 60
    return "\n".join(rows) + (f"\n\n*Made by `{command}` ({len(result['runs'])} runs, "
                              f"{minutes:.0f} minutes of training on one core each).*\n")  # fmt: skip


def too_little_data(design: Design, out: Path, jobs: int, distinct: int) -> str:
    """The Break it of ``experiments/compute.py``: the smallest budget's runs again, each on only
    ``distinct`` training tokens, seen over and over; beside the lab's runs, which never see a token
    twice."""
    smallest = replace(design, budgets=(min(design.budgets),))
    fresh = run_grid(smallest, out, jobs)
    measured = ("val_loss", "eval_train_loss", "train_loss", "seconds")
    starved = train_all([{k: v for k, v in r.items() if k not in measured} | {"distinct_tokens": distinct}
                         for r in fresh], smallest, out, jobs, lab_data(smallest))  # fmt: skip
    header = ["depth", "N", "D (tokens seen)", f"epochs over {distinct:,} tokens",
              "val loss, fresh data", "val loss, repeated", "training loss, repeated",
              "gap (val - training)"]  # fmt: skip
    rows = [[a["depth"], f"{a['N']:,}", f"{a['D']:,}", f"{a['D'] / distinct:.0f}",
             f"{a['val_loss']:.3f}", f"{b['val_loss']:.3f}", f"{b['eval_train_loss']:.3f}",
             f"{b['val_loss'] - b['eval_train_loss']:.3f}"]
            for a, b in zip(fresh, starved, strict=True)]  # fmt: skip
    return markdown_table(header, rows, align="r" * len(header))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a = parser.add_argument
    a("--quick", action="store_true", help="the same design at a smaller scale")
    a("--out", type=Path, help="runs/scaling or runs/scaling-quick when not given")
    a("--jobs", type=int, default=min(2, multiprocessing.cpu_count()),
      help="runs trained at once, one thread each")  # fmt: skip
    a("--book", action="store_true", help=f"also write the book's figure and tables to {BOOK}")
    args = parser.parse_args()
    design = QUICK if args.quick else FULL
    name = "scaling-quick" if args.quick else "scaling"
    out = args.out or REPO / "runs" / name
    command = "uv run python experiments/scaling.py" + (" --quick" if args.quick else "")
    start = time.perf_counter()
    result = analyse(run_grid(design, out, args.jobs))
    write_atomically(out / "scaling.json", json.dumps(result, indent=1))
    plot(result, out / "scaling.png")
    fit, a, b = result["fit"], result["a"], result["b"]
    exponents = f"N_opt ~ C^{a:.2f}, D_opt ~ C^{b:.2f}" if a is not None else "too few minima"
    print(f"L(N, D) = {fit['E']:.2f} + {fit['A']:.3g} / N^{fit['alpha']:.2f} + {fit['B']:.3g} / "
          f"D^{fit['beta']:.2f}; {exponents}; {(time.perf_counter() - start) / 60:.1f} min; "
          f"results in {out}")  # fmt: skip
    if args.book:
        write_atomically(BOOK / f"{name}.md", book_table(result, command))
        plot(result, BOOK / f"{name}.png")
        write_atomically(BOOK / f"{name}.json", json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
