"""How much the fused causal softmax buys: plain vs fused vs PyTorch SDPA, side by side in one run.

Part one times the softmax step alone (scale + causal mask + softmax, and its backward) on
``(B*H, T, T)`` scores, and turns each time into an effective bandwidth: the fewest bytes the step
must move (read the causal lower triangle, write the full output) divided by the time. The yardstick
is a plain tensor copy of the same size, measured in the same run.

Part two times the whole attention core, ``softmax(mask(q k^T * scale)) v`` with head dim 64 as in
GPT-2 small: the plain path, the plain path with our fused softmax in the middle, and
``F.scaled_dot_product_attention``. B*H shrinks as T grows so every shape moves the same number of
score bytes.

Method: warm-up calls, then the candidates of a shape interleaved call by call, repeated, and the
median kept; the thread count is set and stated. On a GPU each call is timed with CUDA events, on a
problem 8 times larger, so that the kernels are timed rather than their launch. Peak memory is the growth of the process's resident
set during one forward+backward (on a GPU, the allocator's peak). glibc serves allocations this large
with fresh ``mmap``s, so every call would pay to page-fault its output in; the effect is measured
once, then the allocator is told to keep and reuse freed memory, as a training loop's steady state
does, for all other timings.

    uv run python benchmarks/attention.py            # full run: table, JSON, PNG, Markdown
    uv run python benchmarks/attention.py --quick    # smoke run, a few seconds, written to a temp dir
"""

import argparse
import ctypes
import json
import math
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from src import fused_softmax
from src.attention import causal_softmax

HEAD_DIM = 64
# B*H*T*T, kept for every T: GPT-2 small's 12 heads at T=1024, times a batch of 8 on a GPU, where a
# smaller problem would time the launch instead of the kernel.
SCORE_ELEMENTS = {"cpu": 12 * 1024 * 1024, "cuda": 8 * 12 * 1024 * 1024}
OUT = Path(__file__).resolve().parent.parent / "docs" / "assets" / "attention-benchmark"


# --8<-- [start:malloc]
def _mallopt(param: int, value: int) -> None:
    libc = ctypes.CDLL("libc.so.6")
    if libc.mallopt(param, value) != 1:
        raise OSError(f"mallopt({param}, {value}) failed")


def fresh_pages() -> None:
    """Every large allocation is a new mmap, unmapped when freed: each call page-faults anew."""
    _mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD, fixed: glibc stops adapting it


def reuse_pages() -> None:
    """Freed memory stays in the heap and is reused: no page faults in the steady state."""
    _mallopt(-4, 0)  # M_MMAP_MAX: never mmap
    _mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD (a C int): keep up to 2 GiB of free heap


# --8<-- [end:malloc]


def peak_memory(fn, device: str) -> int:
    """Bytes of memory that one call of ``fn`` needs on top of what already exists."""
    fn()  # lazy initialisation happens outside the measurement
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        return torch.cuda.max_memory_allocated() - base

    def status(key: str) -> int:
        return (
            int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text())[1]) * 1024
        )

    Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident set (VmHWM)
    base = status("VmRSS")
    fn()
    return status("VmHWM") - base


def measure(candidates: dict, repeats: int, device: str) -> dict[str, float]:
    """Median milliseconds per candidate, calls interleaved so a busy neighbour hits all alike."""
    times = {name: [] for name in candidates}
    for rep in range(repeats + 2):  # the first two rounds warm up
        for name, fn in candidates.items():
            if device == "cuda":  # events on the GPU's own clock: the kernels, not Python's waiting
                torch.cuda.synchronize()
                start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                start.record()
                fn()
                end.record()
                end.synchronize()
                ms = start.elapsed_time(end)
            else:
                start = time.perf_counter()
                fn()
                ms = (time.perf_counter() - start) * 1e3
            if rep >= 2:
                times[name].append(ms)
    return {name: statistics.median(t) for name, t in times.items()}


# --8<-- [start:candidates]
def plain_softmax(scores, scale):
    T = scores.shape[-1]
    mask = torch.triu(torch.ones(T, T, dtype=torch.bool, device=scores.device), diagonal=1)
    return causal_softmax(scores, scale, mask)


def softmax_step(T: int, dtype, device: str) -> dict:
    """Callables for part one: each path forward, forward+backward; the fused backward; a copy."""
    n = SCORE_ELEMENTS[device] // (T * T)
    scale = 1 / math.sqrt(HEAD_DIM)
    scores = torch.randn(n, T, T, dtype=dtype, device=device)
    grad = torch.randn_like(scores)
    leaf = scores.clone().requires_grad_()
    probs = fused_softmax.fused_causal_softmax(scores, scale)
    copy_dst = torch.empty_like(scores)

    def fwd_bwd(fn):
        def run():
            fn(leaf, scale).backward(grad)
            leaf.grad = None

        return run

    return {
        "plain fwd": lambda: plain_softmax(scores, scale),
        "fused fwd": lambda: fused_softmax.fused_causal_softmax(scores, scale),
        "plain fwd+bwd": fwd_bwd(plain_softmax),
        "fused fwd+bwd": fwd_bwd(fused_softmax.fused_causal_softmax),
        "fused bwd": lambda: torch.ops.gpt_fused.causal_softmax_backward(grad, probs, scale),
        "copy": lambda: copy_dst.copy_(scores),
    }


def attention_core(T: int, dtype, device: str) -> dict:
    """Callables for part two: softmax(mask(q k^T * scale)) v three ways, forward and forward+backward."""
    n = SCORE_ELEMENTS[device] // (T * T)
    scale = 1 / math.sqrt(HEAD_DIM)
    # (B, H, T, d) as in the model, with B = 1: before torch 2.15, SDPA's fused kernels refuse
    # 3-D input and fall back to its plain math path.
    q, k, v = (
        torch.randn(1, n, T, HEAD_DIM, dtype=dtype, device=device, requires_grad=True)
        for _ in range(3)
    )
    grad = torch.randn(1, n, T, HEAD_DIM, dtype=dtype, device=device)
    paths = {
        "plain": lambda: plain_softmax(q @ k.transpose(-2, -1), scale) @ v,
        "fused": lambda: fused_softmax.fused_causal_softmax(q @ k.transpose(-2, -1), scale) @ v,
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
    }

    def fwd(fn):
        def run():
            with torch.no_grad():
                fn()

        return run

    def fwd_bwd(fn):
        def run():
            fn().backward(grad)
            q.grad = k.grad = v.grad = None

        return run

    return {
        **{f"{p} fwd": fwd(fn) for p, fn in paths.items()},
        **{f"{p} fwd+bwd": fwd_bwd(fn) for p, fn in paths.items()},
    }


# --8<-- [end:candidates]


def softmax_bytes(T: int, dtype, device: str) -> dict[str, int]:
    """The fewest bytes each step must move: read the lower triangle, write all of the output."""
    n, size = SCORE_ELEMENTS[device] // (T * T), torch.finfo(dtype).bits // 8
    lower, full = T * (T + 1) // 2, T * T
    return {
        "fwd": n * (lower + full) * size,
        "bwd": n * (2 * lower + full) * size,
        "copy": n * 2 * full * size,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: T=128,256, fp32, 1 thread, 2 repeats, output to a temp dir",
    )
    parser.add_argument(
        "--threads", default="1,2", help="CPU thread counts to run, comma-separated (default: 1,2)"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=7,
        help="timed calls per candidate and shape, after 2 warm-up calls (default: 7)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"output path prefix for .json/.png/.md (default: {OUT.relative_to(OUT.parents[2])}, "
        "or a temp dir with --quick)",
    )
    args = parser.parse_args()
    try:
        threads = [int(t) for t in args.threads.split(",")]
    except ValueError:
        parser.error(f"--threads must be comma-separated integers, got {args.threads!r}")
    if args.repeats < 1 or min(threads) < 1:
        parser.error("--repeats and --threads must be positive")
    if not sys.platform.startswith("linux"):
        parser.error("the memory measurements read /proc and call glibc's mallopt: Linux only")
    try:
        fused_softmax.ensure_available()
    except RuntimeError as err:
        sys.exit(f"error: {err}")

    Ts, dtypes, repeats = [128, 256, 512, 1024, 2048], [torch.float32, torch.bfloat16], args.repeats
    if args.quick:
        Ts, dtypes, threads, repeats = [128, 256], [torch.float32], [1], 2
    out = args.out or (
        Path(tempfile.gettempdir()) / "attention-benchmark-quick" if args.quick else OUT
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    T_ref = 1024 if 1024 in Ts else Ts[-1]
    report = {
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "gpu": torch.cuda.get_device_name() if "cuda" in devices else None,
        "score_elements": SCORE_ELEMENTS,
        "head_dim": HEAD_DIM,
        "repeats": repeats,
        "page_faults": [],
        "memory": [],
        "rows": [],
    }

    # Phase 1, fresh pages: the page-fault cost, and peak memory (with every free returned to the OS).
    fresh_pages()
    torch.set_num_threads(threads[0])
    for dtype in dtypes:
        step, core = softmax_step(T_ref, dtype, "cpu"), attention_core(T_ref, dtype, "cpu")
        for name in ("plain fwd+bwd", "fused fwd+bwd"):
            report["memory"].append(
                {
                    "part": "softmax",
                    "dtype": str(dtype)[6:],
                    "T": T_ref,
                    "device": "cpu",
                    "path": name.split()[0],
                    "bytes": peak_memory(step[name], "cpu"),
                }
            )
        for name in ("plain fwd+bwd", "fused fwd+bwd", "sdpa fwd+bwd"):
            report["memory"].append(
                {
                    "part": "attention",
                    "dtype": str(dtype)[6:],
                    "T": T_ref,
                    "device": "cpu",
                    "path": name.split()[0],
                    "bytes": peak_memory(core[name], "cpu"),
                }
            )
    step = softmax_step(T_ref, torch.float32, "cpu")
    fresh = measure({k: step[k] for k in ("plain fwd", "fused fwd")}, repeats, "cpu")
    reuse_pages()
    reused = measure({k: step[k] for k in ("plain fwd", "fused fwd")}, repeats, "cpu")
    for name in fresh:
        report["page_faults"].append(
            {
                "T": T_ref,
                "threads": threads[0],
                "path": name,
                "fresh_ms": fresh[name],
                "reused_ms": reused[name],
            }
        )
    print(
        f"page faults, fp32 T={T_ref}, {threads[0]} thread(s): "
        + ", ".join(f"{k} {fresh[k]:.1f} ms fresh vs {reused[k]:.1f} ms reused" for k in fresh)
    )
    if "cuda" in devices:
        for dtype in dtypes:
            step, core = softmax_step(T_ref, dtype, "cuda"), attention_core(T_ref, dtype, "cuda")
            for part, cands in (("softmax", step), ("attention", core)):
                for name in [n for n in cands if n.endswith("fwd+bwd")]:
                    report["memory"].append(
                        {
                            "part": part,
                            "dtype": str(dtype)[6:],
                            "T": T_ref,
                            "device": "cuda",
                            "path": name.split()[0],
                            "bytes": peak_memory(cands[name], "cuda"),
                        }
                    )

    # Phase 2, reused pages: the timings.
    runs = [("cpu", t) for t in threads] + [("cuda", None) for _ in devices[1:]]
    for device, nthreads in runs:
        if nthreads:
            torch.set_num_threads(nthreads)
        for dtype in dtypes:
            for T in Ts:
                for part, make in (("softmax", softmax_step), ("attention", attention_core)):
                    ms = measure(make(T, dtype, device), repeats, device)
                    row = {
                        "part": part,
                        "device": device,
                        "threads": nthreads,
                        "dtype": str(dtype)[6:],
                        "T": T,
                        "BH": SCORE_ELEMENTS[device] // (T * T),
                        "ms": ms,
                    }
                    if part == "softmax":
                        nbytes = softmax_bytes(T, dtype, device)
                        row["GBps"] = {
                            "copy": nbytes["copy"] / ms["copy"] / 1e6,
                            "fused fwd": nbytes["fwd"] / ms["fused fwd"] / 1e6,
                            "fused bwd": nbytes["bwd"] / ms["fused bwd"] / 1e6,
                        }
                    report["rows"].append(row)
                    print(format_row(row), flush=True)
                    out.with_suffix(".json").write_text(
                        json.dumps(report, indent=1)
                    )  # kept if interrupted

    report["targets"] = targets(report)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    markdown = to_markdown(report, threads)
    out.with_suffix(".md").write_text(markdown)
    plot(report, out.with_suffix(".png"))
    print("\n" + markdown)
    print(f"wrote {out.with_suffix('.json')}, {out.with_suffix('.md')}, {out.with_suffix('.png')}")


def format_row(row: dict) -> str:
    ms = row["ms"]
    where = f"{row['device']}" + (f" {row['threads']}t" if row["threads"] else "")
    head = f"{row['part']:9} {where:6} {row['dtype']:8} T={row['T']:4} BH={row['BH']:3}"
    if row["part"] == "softmax":
        bw = row["GBps"]
        return (
            f"{head} fwd {ms['plain fwd']:7.2f}/{ms['fused fwd']:6.2f} ms "
            f"({ms['plain fwd'] / ms['fused fwd']:.1f}x)  fwd+bwd {ms['plain fwd+bwd']:7.2f}/"
            f"{ms['fused fwd+bwd']:6.2f} ms ({ms['plain fwd+bwd'] / ms['fused fwd+bwd']:.1f}x)  "
            f"GB/s fwd {bw['fused fwd']:.1f} bwd {bw['fused bwd']:.1f} copy {bw['copy']:.1f}"
        )
    return (
        f"{head} fwd+bwd plain {ms['plain fwd+bwd']:7.1f} fused {ms['fused fwd+bwd']:7.1f} "
        f"sdpa {ms['sdpa fwd+bwd']:7.1f} ms (plain/fused {ms['plain fwd+bwd'] / ms['fused fwd+bwd']:.2f}x, "
        f"sdpa/fused {ms['sdpa fwd+bwd'] / ms['fused fwd+bwd']:.2f}x)"
    )


# --8<-- [start:targets]
def targets(report: dict) -> list[dict]:
    """Each performance target, per CPU thread count (the softmax ones on a GPU too): the measured
    value and met or not."""
    result = []

    def check(name, value, goal, met):
        result.append({"target": name, "value": round(value, 3), "goal": goal, "met": bool(met)})

    for r in report["rows"]:
        where = f"{r['threads']}t" if r["device"] == "cpu" else r["device"]
        ms, t = r["ms"], f"{where} {r['dtype']} T={r['T']}"
        if r["part"] == "softmax" and r["dtype"] == "float32" and r["T"] == 1024:
            fwd, both = ms["plain fwd"] / ms["fused fwd"], ms["plain fwd+bwd"] / ms["fused fwd+bwd"]
            check(f"softmax fwd speed-up, {t}", fwd, ">= 4x", fwd >= 4)
            check(f"softmax fwd+bwd speed-up, {t}", both, ">= 3x", both >= 3)
            bw = r["GBps"]
            check(
                f"fused fwd bandwidth / copy, {t}",
                bw["fused fwd"] / bw["copy"],
                ">= 0.70",
                bw["fused fwd"] / bw["copy"] >= 0.70,
            )
            check(
                f"fused bwd bandwidth / copy, {t}",
                bw["fused bwd"] / bw["copy"],
                ">= 0.85",
                bw["fused bwd"] / bw["copy"] >= 0.85,
            )
        if r["part"] == "attention" and r["device"] == "cpu":
            speedup = ms["plain fwd+bwd"] / ms["fused fwd+bwd"]
            check(f"attention fwd+bwd plain/fused, {t}", speedup, ">= 1.5x", speedup >= 1.5)
            limit = 512 if r["dtype"] == "float32" else 1024
            if r["T"] <= limit:
                vs = ms["sdpa fwd+bwd"] / ms["fused fwd+bwd"]
                check(
                    f"attention fwd+bwd sdpa/fused, {t}",
                    vs,
                    ">= 1 (fused at or below SDPA)",
                    vs >= 1,
                )
    memory = {(m["part"], m["dtype"], m["device"], m["path"]): m["bytes"] for m in report["memory"]}
    for (part, dtype, device, path), nbytes in memory.items():
        if path == "fused":
            plain = memory[(part, dtype, device, "plain")]
            check(
                f"peak memory fused/plain, {part} {device} {dtype}",
                nbytes / plain,
                "<= 1",
                nbytes <= plain,
            )
    return result


# --8<-- [end:targets]


def to_markdown(report: dict, threads: list[int]) -> str:
    lines = [
        "**Softmax step** (B*H, T, T), median ms, fused effective bandwidth vs a copy of the same size",
        "",
        (
            "| device | dtype | T | B*H | plain fwd | fused fwd | speed-up | plain fwd+bwd "
            "| fused fwd+bwd | speed-up | fused fwd GB/s | fused bwd GB/s | copy GB/s |"
        ),
        "|" + "---|" * 13,
    ]
    for r in report["rows"]:
        if r["part"] != "softmax":
            continue
        ms, bw = r["ms"], r["GBps"]
        where = f"{r['device']} {r['threads']}t" if r["threads"] else r["device"]
        lines.append(
            f"| {where} | {r['dtype']} | {r['T']} | {r['BH']} | {ms['plain fwd']:.2f} | {ms['fused fwd']:.2f} "
            f"| {ms['plain fwd'] / ms['fused fwd']:.1f}x | {ms['plain fwd+bwd']:.2f} | {ms['fused fwd+bwd']:.2f} "
            f"| {ms['plain fwd+bwd'] / ms['fused fwd+bwd']:.1f}x | {bw['fused fwd']:.1f} | {bw['fused bwd']:.1f} "
            f"| {bw['copy']:.1f} |"
        )
    lines += [
        "",
        f"**Attention core** softmax(mask(q k^T / 8)) v, head dim {HEAD_DIM}, median ms",
        "",
        (
            "| device | dtype | T | B*H | plain fwd | fused fwd | sdpa fwd | plain fwd+bwd "
            "| fused fwd+bwd | sdpa fwd+bwd | plain / fused | sdpa / fused |"
        ),
        "|" + "---|" * 12,
    ]
    for r in report["rows"]:
        if r["part"] != "attention":
            continue
        ms = r["ms"]
        where = f"{r['device']} {r['threads']}t" if r["threads"] else r["device"]
        lines.append(
            f"| {where} | {r['dtype']} | {r['T']} | {r['BH']} | {ms['plain fwd']:.1f} | {ms['fused fwd']:.1f} "
            f"| {ms['sdpa fwd']:.1f} | {ms['plain fwd+bwd']:.1f} | {ms['fused fwd+bwd']:.1f} "
            f"| {ms['sdpa fwd+bwd']:.1f} | {ms['plain fwd+bwd'] / ms['fused fwd+bwd']:.2f}x "
            f"| {ms['sdpa fwd+bwd'] / ms['fused fwd+bwd']:.2f}x |"
        )
    lines += [
        "",
        f"**Peak memory** of one forward+backward, MiB ({threads[0]} thread)",
        "",
        "| part | device | dtype | T | plain | fused | sdpa |",
        "|---|---|---|---|---|---|---|",
    ]
    groups = {}
    for m in report["memory"]:
        groups.setdefault((m["part"], m["device"], m["dtype"], m["T"]), {})[m["path"]] = (
            m["bytes"] / 2**20
        )
    for (part, device, dtype, T), paths in groups.items():
        cells = " | ".join(
            f"{paths[p]:.0f}" if p in paths else "-" for p in ("plain", "fused", "sdpa")
        )
        lines.append(f"| {part} | {device} | {dtype} | {T} | {cells} |")
    lines += [
        "",
        "**Page faults**: the same forward into fresh memory on every call vs memory reused",
        "",
        "| path | T | threads | fresh pages ms | reused ms |",
        "|---|---|---|---|---|",
    ]
    for p in report["page_faults"]:
        lines.append(
            f"| {p['path']} | {p['T']} | {p['threads']} | {p['fresh_ms']:.2f} | {p['reused_ms']:.2f} |"
        )
    lines += ["", "**Targets**", "", "| target | measured | goal | met |", "|---|---|---|---|"]
    for t in report["targets"]:
        lines.append(
            f"| {t['target']} | {t['value']:.2f} | {t['goal']} | {'yes' if t['met'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    first = report["rows"][0]["threads"]
    styles = {"float32": "-", "bfloat16": "--"}
    colors = {"plain": "tab:red", "fused": "tab:blue", "sdpa": "tab:green"}
    for ax, part, paths in (
        (axes[0], "softmax", ("plain", "fused")),
        (axes[1], "attention", ("plain", "fused", "sdpa")),
    ):
        for dtype, style in styles.items():
            rows = [
                r
                for r in report["rows"]
                if r["part"] == part
                and r["device"] == "cpu"
                and r["threads"] == first
                and r["dtype"] == dtype
            ]
            if not rows:
                continue
            for p in paths:
                ax.plot(
                    [r["T"] for r in rows],
                    [r["ms"][f"{p} fwd+bwd"] for r in rows],
                    style,
                    color=colors[p],
                    marker="o",
                    label=f"{p} {dtype}",
                )
        ax.set(
            xscale="log",
            xlabel="T (B*H shrinks so B*H*T*T is constant)",
            ylabel="forward+backward, ms (median)",
        )
        ax.set_ylim(bottom=0)
        ax.set_xticks(
            [
                r["T"]
                for r in report["rows"]
                if r["part"] == part
                and r["dtype"] == "float32"
                and r["threads"] == first
                and r["device"] == "cpu"
            ]
        )
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_title(f"softmax step, CPU {first} thread")
    axes[1].set_title(f"attention core, head dim {HEAD_DIM}, CPU {first} thread")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted: the rows measured so far are in the .json file")
