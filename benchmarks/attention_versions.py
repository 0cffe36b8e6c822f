"""The attention forward in its six versions, from a scalar loop to flash attention: one table.

Each version of ``src/flash_attention.forward_version`` computes the same causal attention core on
the same ``(B, H, T, D)`` float32 inputs; the script checks it against the float64 eager path, then
times the versions interleaved (median of the repeats) and turns each time into a FLOP rate: the
multiply-adds of the causal half of ``q k^T`` and ``P v``, ``2 * 2 * B*H * T(T+1)/2 * D``, whichever
version does more of them. Versions 1 and 2 run on one thread by construction; the others on
``--threads``. As in ``benchmarks/attention.py``, freed memory is reused rather than returned to
the system, so that no version pays page faults for fresh allocations.

    uv run python benchmarks/attention_versions.py            # docs/assets/attention-versions.{json,md}
    uv run python benchmarks/attention_versions.py --quick    # a smoke run into a temp dir
"""

import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.attention import reuse_pages  # freed memory is reused: no page faults
from benchmarks.harness import markdown_table, median_times
from src import flash_attention
from src.attention import causal_mask, causal_softmax
from src.cli import Parser, positive_int, run_command
from src.errors import UserError
from src.files import write_atomically

OUT = Path(__file__).resolve().parent.parent / "docs" / "assets" / "attention-versions"
# What each step buys, for the table (the chapter explains it).
STEP = {
    1: "the eager path's work, one multiply-add at a time",
    2: "8 or 16 lanes per instruction",
    3: "every core",
    4: "half the scores, no scale pass",
    5: "blocked matrix products (BLAS) around our softmax",
    6: "tiles in cache, the masked half never computed",
}


def reference(q, k, v, scale):
    weights = causal_softmax(
        q.double() @ k.double().transpose(-2, -1), scale, causal_mask(q.shape[2])
    )
    return weights @ v.double()


def measure(q, k, v, scale, repeats: int) -> dict[int, float]:
    """Median milliseconds per call of every version, the versions interleaved round by round."""
    candidates = {
        version: lambda version=version: flash_attention.forward_version(q, k, v, scale, version)
        for version in flash_attention.VERSIONS
    }
    return {v: 1e3 * t for v, t in median_times(candidates, repeats, warmup=1).items()}


def parser() -> Parser:
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--T", type=positive_int, default=1024, help="sequence length (default 1024)")
    p.add_argument("--heads", type=positive_int, default=12, help="B*H (default 12, GPT-2 small)")
    p.add_argument("--threads", type=positive_int, default=2, help="threads for versions 3-6")
    p.add_argument("--repeats", type=positive_int, default=5, help="timed calls per version")
    p.add_argument("--quick", action="store_true", help="T=256, 2 heads, 2 repeats, temp dir")
    p.add_argument("--out", type=Path, default=None, help="output prefix for .json and .md")
    return p


def run(args) -> None:
    if args.quick:
        args.T, args.heads, args.repeats = 256, 2, 2
    out = args.out or (Path(tempfile.gettempdir()) / "attention-versions" if args.quick else OUT)
    try:
        flash_attention.ensure_available()
    except RuntimeError as err:
        raise UserError(str(err)) from None
    torch.set_num_threads(args.threads)
    reuse_pages()  # as in a training loop's steady state: version 5's (T, T) tensors reuse memory
    torch.manual_seed(0)
    D, scale = 64, 1 / 8
    q, k, v = (torch.randn(1, args.heads, args.T, D) for _ in range(3))  # (1, B*H, T, D)
    want = reference(q, k, v, scale)
    errors = {
        version: (flash_attention.forward_version(q, k, v, scale, version).double() - want)
        .abs()
        .max()
        .item()
        for version in flash_attention.VERSIONS
    }
    ms = measure(q, k, v, scale, args.repeats)
    flops = 4 * args.heads * args.T * (args.T + 1) / 2 * D
    report = {
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": args.threads,
        "T": args.T,
        "BH": args.heads,
        "head_dim": D,
        "repeats": args.repeats,
        "versions": [
            {"version": ver, "name": name, "threads": 1 if ver <= 2 else args.threads,
             "ms": ms[ver], "gflops": flops / ms[ver] / 1e6, "max_error": errors[ver]}
            for ver, name in flash_attention.VERSIONS.items()
        ],
    }  # fmt: skip
    write_atomically(out.with_suffix(".json"), json.dumps(report, indent=1) + "\n")
    write_atomically(out.with_suffix(".md"), to_markdown(report))
    print(to_markdown(report))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


def to_markdown(report: dict) -> str:
    rows = report["versions"]
    table = [
        [f"{r['version']}. {r['name']}", r["threads"], f"{r['ms']:,.1f}", f"{r['gflops']:.1f}",
         f"{(rows[i - 1]['ms'] / r['ms'] if i else 1.0):.1f}x", f"{rows[0]['ms'] / r['ms']:,.0f}x",
         f"{r['max_error']:.0e}", STEP[r["version"]]]
        for i, r in enumerate(rows)
    ]  # fmt: skip
    header = ["version", "threads", "ms", "GFLOP/s", "vs previous", "vs version 1", "max error",
              "what it buys"]  # fmt: skip
    made_by = (
        f"*Made by `uv run python benchmarks/attention_versions.py` (float32, B*H = {report['BH']}, "
        f"T = {report['T']}, head dim {report['head_dim']}, {report['threads']} threads for versions "
        f"3-6, {report['cpu_capability']}, torch {report['torch']}, median of {report['repeats']}; "
        "GFLOP/s counts the causal half of both products; max error against the float64 eager "
        "path).*"
    )
    return f"{markdown_table(header, table, align='lrrrrrrl')}\n\n{made_by}\n"


if __name__ == "__main__":
    sys.exit(run_command(parser(), run, sys.argv[1:]))
