"""How much our kernels buy: plain vs fused softmax vs flash attention vs PyTorch SDPA, in one run.

Part one times the softmax step alone (scale + causal mask + softmax, and its backward) on
``(B*H, T, T)`` scores, and turns each time into an effective bandwidth: the fewest bytes the step
must move (read the causal lower triangle, write the full output) divided by the time. The yardstick
is a plain tensor copy of the same size, measured in the same run.

Part two times the whole attention core, ``softmax(mask(q k^T * scale)) v`` with head dim 64 as in
GPT-2 small: the plain path, the plain path with our fused softmax in the middle, our flash attention
kernel, and ``F.scaled_dot_product_attention``. B*H shrinks as T grows so every shape moves the same
number of score bytes.

Every row names the instruction set its kernels ran with (PyTorch's CPU capability, which our
extension is built for too). On an AVX-512 machine the softmax step is measured a second time with
PyTorch and our kernels forced to AVX2 (``ATEN_CPU_CAPABILITY=avx2``, in a child process), so one run
gives both.

Method: warm-up calls, then the candidates of a shape interleaved call by call, repeated, and the
median kept; the thread count is set and stated. On a GPU each call is timed with CUDA events, on a
problem 8 times larger, so that the kernels are timed rather than their launch. Peak memory is the growth of the process's resident
set during one forward+backward (on a GPU, the allocator's peak), at T = 1024 and, for the attention
core, at T = 4096. glibc serves allocations this large
with fresh ``mmap``s, so every call would pay to page-fault its output in; the effect is measured
once, then the allocator is told to keep and reuse freed memory, as a training loop's steady state
does, for all other timings.

    uv run python benchmarks/attention.py            # full run: table, JSON, PNG, Markdown
    uv run python benchmarks/attention.py --quick    # smoke run, a minute, written to a temp dir
    uv run python benchmarks/attention.py --from-json docs/assets/attention-benchmark-h100.json
                                                     # redraw a run's tables and plot, timing nothing
"""

import argparse
import ctypes
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.harness import markdown_table, median_times
from src import flash_attention, fused_softmax
from src.attention import causal_softmax
from src.cli import Parser, positive_int, run_command
from src.errors import UserError
from src.files import write_atomically

HEAD_DIM = 64
# B*H*T*T, kept for every T: GPT-2 small's 12 heads at T=1024, times a batch of 8 on a GPU, where a
# smaller problem would time the launch instead of the kernel.
SCORE_ELEMENTS = {"cpu": 12 * 1024 * 1024, "cuda": 8 * 12 * 1024 * 1024}
TS = [128, 256, 512, 1024, 2048]
DTYPES = [torch.float32, torch.bfloat16]
LONG_T, LONG_BH = 4096, 4  # the long-context memory row: eager's scores alone are 256 MiB
PATHS = ("plain", "fused", "flash", "sdpa")
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
    return {
        name: 1e3 * seconds
        for name, seconds in median_times(candidates, repeats, device=device).items()
    }


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


def attention_core(T: int, dtype, device: str, n: int | None = None) -> dict:
    """Callables for part two: softmax(mask(q k^T * scale)) v four ways, forward and forward+backward."""
    n = n or SCORE_ELEMENTS[device] // (T * T)
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
        "flash": lambda: flash_attention.flash_causal_attention(q, k, v, scale),
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


def thread_counts(text: str) -> list[int]:
    """``--threads 1,2``: comma-separated positive integers."""
    try:
        counts = [int(t) for t in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(
            f"must be positive integers, comma-separated, got {text!r}"
        )
    return counts


def parser() -> Parser:
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke run: T=128,256, fp32, 1 thread, 2 repeats, output to a temp dir")  # fmt: skip
    p.add_argument("--threads", type=thread_counts, default=[1, 2],
                   help="CPU thread counts to run, comma-separated (default: 1,2)")  # fmt: skip
    p.add_argument("--repeats", type=positive_int, default=7,
                   help="timed calls per candidate and shape, after 2 warm-up calls")  # fmt: skip
    p.add_argument("--out", type=Path, default=None,
                   help=f"output path prefix for .json/.png/.md (default: "
                   f"{OUT.relative_to(OUT.parents[2])}, or a temp dir with --quick)")  # fmt: skip
    p.add_argument("--from-json", type=Path, metavar="JSON",
                   help="measure nothing: write the .md and .png of a finished run from its JSON, "
                   "beside it (or at --out)")  # fmt: skip
    p.add_argument("--no-avx2", action="store_true",
                   help="on an AVX-512 machine, do not measure the softmax step again with AVX2 kernels")  # fmt: skip
    p.add_argument("--softmax-only", action="store_true", help=argparse.SUPPRESS)
    return p


def run(args) -> None:
    if args.from_json:
        return redraw(args.from_json, args.out or args.from_json.with_suffix(""))
    if not sys.platform.startswith("linux"):
        raise UserError("the memory measurements read /proc and call glibc's mallopt: Linux only")
    try:
        flash_attention.ensure_available()  # the library of every kernel: softmax and flash
    except RuntimeError as err:
        raise UserError(str(err)) from None
    if args.softmax_only:  # the child process of the AVX2 measurement: its rows, as JSON
        reuse_pages()
        Ts = [1024] if args.quick else TS
        rows = timed_rows(
            [("cpu", t) for t in args.threads], DTYPES, Ts, args.repeats, ("softmax",)
        )
        write_atomically((args.out or OUT).with_suffix(".json"), json.dumps(rows))
        return

    Ts, dtypes, threads, repeats = TS, DTYPES, args.threads, args.repeats
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
        # How flash multiplies bfloat16 tiles on this CPU (GPT_FLASH_BF16_WIDEN forces widening).
        "flash_bf16_products": "bfloat16 dot products (AVX512-BF16)"
        if torch.ops.gpt_flash.bf16_dot_products()
        else "widened to float32",
        "gpu": torch.cuda.get_device_name() if "cuda" in devices else None,
        "score_elements": SCORE_ELEMENTS,
        "head_dim": HEAD_DIM,
        "repeats": repeats,
        "page_faults": [],
        "memory": [],
        "rows": [],
    }

    # Phase 1, fresh pages: peak memory (with every free returned to the OS), the page-fault cost.
    fresh_pages()
    torch.set_num_threads(threads[0])
    report["memory"] = memory_rows(dtypes, T_ref, devices, long=not args.quick)
    report["page_faults"] = page_fault_rows(T_ref, threads[0], repeats)

    # Phase 2, reused pages: the timings; then the softmax step again with AVX2 kernels.
    def save(row):
        report["rows"].append(row)
        print(format_row(row), flush=True)
        write_atomically(
            out.with_suffix(".json"), json.dumps(report, indent=1)
        )  # kept if interrupted

    runs = [("cpu", t) for t in threads] + [("cuda", None) for _ in devices[1:]]
    timed_rows(runs, dtypes, Ts, repeats, ("softmax", "attention"), save)
    if report["cpu_capability"] == "AVX512" and not args.no_avx2:
        for row in avx2_rows(threads, repeats, args.quick):
            save(row)

    report["targets"] = targets(report)
    write_atomically(out.with_suffix(".json"), json.dumps(report, indent=1))
    markdown = to_markdown(report, threads)
    write_atomically(out.with_suffix(".md"), markdown)
    plot(report, out.with_suffix(".png"))
    print("\n" + markdown)
    print(f"wrote {out.with_suffix('.json')}, {out.with_suffix('.md')}, {out.with_suffix('.png')}")


def memory_rows(dtypes, T_ref: int, devices: list[str], long: bool) -> list[dict]:
    """Peak memory of one forward+backward of each path: the softmax step and the attention core
    at T_ref, and the attention core at LONG_T (CPU, float32) where the (T, T) tensors dominate."""
    rows = []

    def add(part, dtype, T, device, cands):
        for name in [n for n in cands if n.endswith("fwd+bwd") and not n.startswith("copy")]:
            row = {"part": part, "dtype": str(dtype)[6:], "T": T, "device": device}
            rows.append({**row, "path": name.split()[0], "bytes": peak_memory(cands[name], device)})

    for device in devices:
        for dtype in dtypes:
            step = softmax_step(T_ref, dtype, device)
            add(
                "softmax",
                dtype,
                T_ref,
                device,
                {k: step[k] for k in ("plain fwd+bwd", "fused fwd+bwd")},
            )
            add("attention", dtype, T_ref, device, attention_core(T_ref, dtype, device))
    if long:
        add(
            "attention",
            torch.float32,
            LONG_T,
            "cpu",
            attention_core(LONG_T, torch.float32, "cpu", LONG_BH),
        )
    return rows


def page_fault_rows(T_ref: int, nthreads: int, repeats: int) -> list[dict]:
    """The fused and plain softmax forward into fresh pages on every call, then into reused ones
    (this switches the allocator to reuse, for every later measurement)."""
    step = softmax_step(T_ref, torch.float32, "cpu")
    fresh = measure({k: step[k] for k in ("plain fwd", "fused fwd")}, repeats, "cpu")
    reuse_pages()
    reused = measure({k: step[k] for k in ("plain fwd", "fused fwd")}, repeats, "cpu")
    print(
        f"page faults, fp32 T={T_ref}, {nthreads} thread(s): "
        + ", ".join(f"{k} {fresh[k]:.1f} ms fresh vs {reused[k]:.1f} ms reused" for k in fresh)
    )
    return [
        {"T": T_ref, "threads": nthreads, "path": name, "fresh_ms": fresh[name],
         "reused_ms": reused[name]}
        for name in fresh
    ]  # fmt: skip


def timed_rows(runs, dtypes, Ts, repeats: int, parts, on_row=None) -> list[dict]:
    """One row of median times per (device and threads, dtype, T, part), each handed to on_row."""
    isa = torch.backends.cpu.get_cpu_capability()
    makers = {"softmax": softmax_step, "attention": attention_core}
    rows = []
    for device, nthreads in runs:
        if nthreads:
            torch.set_num_threads(nthreads)
        for dtype in dtypes:
            for T in Ts:
                for part in parts:
                    ms = measure(makers[part](T, dtype, device), repeats, device)
                    row = {
                        "part": part,
                        "device": device,
                        "threads": nthreads,
                        "isa": isa if device == "cpu" else None,
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
                    rows.append(row)
                    if on_row:
                        on_row(row)
    return rows


def avx2_rows(threads: list[int], repeats: int, quick: bool) -> list[dict]:
    """The softmax step again in a child process whose PyTorch, and so our extension, runs AVX2."""
    with tempfile.TemporaryDirectory() as tmp:
        child = [sys.executable, __file__, "--softmax-only", "--out", f"{tmp}/avx2",
                 "--threads", ",".join(map(str, threads)), "--repeats", str(repeats)]  # fmt: skip
        env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
        subprocess.run(child + (["--quick"] if quick else []), env=env, check=True)
        return json.loads(Path(f"{tmp}/avx2.json").read_text())


def redraw(json_path: Path, out: Path) -> None:
    """The tables and the plot of a finished run, from its JSON alone."""
    try:
        report = json.loads(json_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read a benchmark run from {json_path}: {err}") from None
    threads = list(dict.fromkeys(r["threads"] for r in report["rows"] if r["device"] == "cpu"))
    report["targets"] = targets(report)
    write_atomically(out.with_suffix(".md"), to_markdown(report, threads))
    plot(report, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.md')}, {out.with_suffix('.png')} from {json_path}")


def format_row(row: dict) -> str:
    ms = row["ms"]
    head = f"{row['part']:9} {_where(row):13} {row['dtype']:8} T={row['T']:4} BH={row['BH']:3}"
    if row["part"] == "softmax":
        bw = row["GBps"]
        return (
            f"{head} fwd {ms['plain fwd']:7.2f}/{ms['fused fwd']:6.2f} ms "
            f"({ms['plain fwd'] / ms['fused fwd']:.1f}x)  fwd+bwd {ms['plain fwd+bwd']:7.2f}/"
            f"{ms['fused fwd+bwd']:6.2f} ms ({ms['plain fwd+bwd'] / ms['fused fwd+bwd']:.1f}x)  "
            f"GB/s fwd {bw['fused fwd']:.1f} bwd {bw['fused bwd']:.1f} copy {bw['copy']:.1f}"
        )
    times = " ".join(f"{p} {ms[f'{p} fwd+bwd']:7.1f}" for p in PATHS if f"{p} fwd+bwd" in ms)
    return (
        f"{head} fwd+bwd {times} ms (plain/flash {ms['plain fwd+bwd'] / ms['flash fwd+bwd']:.2f}x, "
        f"sdpa/flash {ms['sdpa fwd+bwd'] / ms['flash fwd+bwd']:.2f}x)"
    )


# --8<-- [start:targets]
def targets(report: dict) -> list[dict]:
    """Each performance target, per CPU thread count and instruction set (the softmax ones on a GPU
    too): the measured value and met or not."""
    result = []

    def check(name, value, goal, met):
        result.append({"target": name, "value": round(value, 3), "goal": goal, "met": bool(met)})

    for r in report["rows"]:
        where = (
            f"{r['threads']}t {r.get('isa') or ''}".strip() if r["device"] == "cpu" else r["device"]
        )
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
        if r["part"] == "attention" and r["device"] == "cpu" and "flash fwd+bwd" in ms:
            vs_sdpa = ms["sdpa fwd+bwd"] / ms["flash fwd+bwd"]
            if r["T"] >= 256 and (r["dtype"] == "float32" or r["T"] <= 1024):
                check(f"attention fwd+bwd sdpa/flash, {t}", vs_sdpa, ">= 1", vs_sdpa >= 1)
            vs_plain = ms["plain fwd+bwd"] / ms["flash fwd+bwd"]
            if r["T"] >= 512:
                check(f"attention fwd+bwd plain/flash, {t}", vs_plain, ">= 2x", vs_plain >= 2)
    memory = {(m["part"], m["dtype"], m["device"], m["T"], m["path"]): m["bytes"]
              for m in report["memory"]}  # fmt: skip
    for (part, dtype, device, T, path), nbytes in memory.items():
        plain = memory[(part, dtype, device, T, "plain")]
        if path == "fused" and T != LONG_T:
            check(f"peak memory fused/plain, {part} {device} {dtype} T={T}", nbytes / plain, "<= 1",
                  nbytes <= plain)  # fmt: skip
        if path == "flash" and T == LONG_T:
            check(f"peak memory flash/plain, {part} {device} {dtype} T={T}", nbytes / plain,
                  "<= 0.1", nbytes <= 0.1 * plain)  # fmt: skip
    return result


# --8<-- [end:targets]


def _where(r: dict) -> str:
    """Where a row ran: the GPU, or the CPU's thread count and instruction set."""
    return (
        f"{r['device']} {r['threads']}t {r.get('isa') or ''}".strip()
        if r["threads"]
        else r["device"]
    )


def _marker(kind: str, name: str) -> str:
    """A section marker for pymdownx.snippets in an HTML comment, so that a page can include one
    part of the tables; spelled in two pieces here, or this file's own sections would see it."""
    return f"<!-- {'--8' + '<--'} [{kind}:{name}] -->"


def _ms(r: dict, key: str) -> str:
    return f"{r['ms'][key]:.1f}" if key in r["ms"] else "-"  # runs from before flash have no flash


def _ratio(r: dict, a: str, b: str) -> str:
    return f"{r['ms'][a] / r['ms'][b]:.2f}x" if a in r["ms"] and b in r["ms"] else "-"


def to_markdown(report: dict, threads: list[int]) -> str:
    """The run as Markdown tables, none wider than ten columns so that each fits the page."""
    softmax = [r for r in report["rows"] if r["part"] == "softmax"]
    attention = [r for r in report["rows"] if r["part"] == "attention"]
    # Each part between section markers, so that a page can include one part (pymdownx.snippets).
    lines = [_marker("start", "softmax"), "", "**Softmax step** (B*H, T, T), median ms", ""]
    lines += [markdown_table(
        ["device", "dtype", "T", "B*H", "plain fwd", "fused fwd", "speed-up", "plain fwd+bwd",
         "fused fwd+bwd", "speed-up"],
        [[_where(r), r["dtype"], r["T"], r["BH"], f"{r['ms']['plain fwd']:.2f}",
          f"{r['ms']['fused fwd']:.2f}", f"{r['ms']['plain fwd'] / r['ms']['fused fwd']:.1f}x",
          f"{r['ms']['plain fwd+bwd']:.2f}", f"{r['ms']['fused fwd+bwd']:.2f}",
          f"{r['ms']['plain fwd+bwd'] / r['ms']['fused fwd+bwd']:.1f}x"] for r in softmax],
    )]  # fmt: skip
    lines += ["", "**Softmax step**, the fused path's effective bandwidth against a copy of the "
              "same size", ""]  # fmt: skip
    lines += [markdown_table(
        ["device", "dtype", "T", "fused fwd GB/s", "fused bwd GB/s", "copy GB/s", "fwd / copy",
         "bwd / copy"],
        [[_where(r), r["dtype"], r["T"], f"{r['GBps']['fused fwd']:.1f}",
          f"{r['GBps']['fused bwd']:.1f}", f"{r['GBps']['copy']:.1f}",
          f"{r['GBps']['fused fwd'] / r['GBps']['copy']:.0%}",
          f"{r['GBps']['fused bwd'] / r['GBps']['copy']:.0%}"] for r in softmax],
    )]  # fmt: skip
    lines += ["", _marker("end", "softmax"), _marker("start", "attention")]
    for step, title in (("fwd", "forward"), ("fwd+bwd", "forward+backward")):
        lines += ["", f"**Attention core** softmax(mask(q k^T / 8)) v, head dim {HEAD_DIM}, "
                  f"{title}, median ms", ""]  # fmt: skip
        if step == "fwd" and "flash_bf16_products" in report:  # older runs do not say
            lines += [f"flash's bfloat16 tile products on the CPU: {report['flash_bf16_products']}", ""]
        lines += [markdown_table(
            ["device", "dtype", "T", "B*H", *PATHS, "plain / flash", "sdpa / flash"],
            [[_where(r), r["dtype"], r["T"], r["BH"], *(_ms(r, f"{p} {step}") for p in PATHS),
              _ratio(r, f"plain {step}", f"flash {step}"), _ratio(r, f"sdpa {step}", f"flash {step}")]
             for r in attention],
        )]  # fmt: skip
    lines += ["", _marker("end", "attention"), _marker("start", "memory")]
    groups = {}
    for m in report["memory"]:
        key = (m["part"], m["device"], m["dtype"], m["T"])
        groups.setdefault(key, {})[m["path"]] = m["bytes"] / 2**20
    n = threads[0]
    lines += ["", f"**Peak memory** of one forward+backward, MiB (the CPU at {n} "
              f"thread{'s' if n != 1 else ''}; B*H as in the timings, and {LONG_BH} at "
              f"T = {LONG_T})", ""]  # fmt: skip
    lines += [markdown_table(
        ["part", "device", "dtype", "T", *PATHS],
        [[*key, *(f"{paths[p]:,.0f}" if p in paths else "-" for p in PATHS)]
         for key, paths in groups.items()],
    )]  # fmt: skip
    lines += ["", "**Page faults**: the same forward into fresh memory on every call vs memory "
              "reused", ""]  # fmt: skip
    lines += [markdown_table(
        ["path", "T", "threads", "fresh pages ms", "reused ms"],
        [[p["path"], p["T"], p["threads"], f"{p['fresh_ms']:.2f}", f"{p['reused_ms']:.2f}"]
         for p in report["page_faults"]],
    )]  # fmt: skip
    lines += ["", _marker("end", "memory"), _marker("start", "targets")]
    lines += ["", "**Targets**", ""]
    lines += [markdown_table(
        ["target", "measured", "goal", "met"],
        [[t["target"], f"{t['value']:.2f}", t["goal"], "yes" if t["met"] else "no"]
         for t in report["targets"]],
    )]  # fmt: skip
    lines += ["", _marker("end", "targets")]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """Forward+backward time against T, for the device the run was about: the GPU if it had one
    (its host CPU's rows are in the tables only), else the CPU at its first thread count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cuda = any(r["device"] == "cuda" for r in report["rows"])
    device = "cuda" if cuda else "cpu"
    threads = next(r["threads"] for r in report["rows"] if r["device"] == device)
    where = report["gpu"] if cuda else f"CPU {threads} thread{'s' if threads != 1 else ''}"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    styles = {"float32": "-", "bfloat16": "--"}
    colors = {"plain": "tab:red", "fused": "tab:blue", "flash": "tab:purple", "sdpa": "tab:green"}
    for ax, part, paths in (
        (axes[0], "softmax", ("plain", "fused")),
        (axes[1], "attention", PATHS),
    ):
        rows = [r for r in report["rows"] if r["part"] == part and r["device"] == device
                and r["threads"] == threads and r.get("isa") in (None, report["cpu_capability"])]  # fmt: skip
        for dtype, style in styles.items():
            for p in [p for p in paths if all(f"{p} fwd+bwd" in r["ms"] for r in rows)]:
                ax.plot(
                    [r["T"] for r in rows if r["dtype"] == dtype],
                    [r["ms"][f"{p} fwd+bwd"] for r in rows if r["dtype"] == dtype],
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
        ax.set_xticks(sorted({r["T"] for r in rows}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    axes[0].set_title(f"softmax step, {where}", fontsize=10)
    axes[1].set_title(f"attention core, head dim {HEAD_DIM}, {where}", fontsize=10)
    # One legend for both panels, below them: it covers no curve.
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    try:
        sys.exit(run_command(parser(), run, sys.argv[1:]))
    except KeyboardInterrupt:
        sys.exit("interrupted: the rows measured so far are in the .json file")
