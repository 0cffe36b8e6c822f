"""Regenerate every figure and table of the book with one command.

Each page says which command made each of its figures and tables. This script runs all of those
commands, in about the order of the chapters, and stops at the first one that fails; ``--from NAME`` then
starts again at that step, since every earlier step has already written its files:

    uv run python book/regenerate.py                  # everything this machine can run
    uv run python book/regenerate.py --list           # the steps, their commands, their outputs
    uv run python book/regenerate.py break-it run-it  # some steps
    uv run python book/regenerate.py --skip verdict   # all but the chapter-5 run

A step that needs something this machine lacks (the reference data for the chapter-5 run and the
GPT-2 comparison, an H100 for the GPU benchmark) is skipped, and the script says why; the training
benchmark compares with nanoGPT when ``$NANOGPT`` names its ``model.py``. Every output is
written into ``docs/assets/``; ``git diff`` then shows what changed.
"""

import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from src.cli import Parser  # noqa: E402


def reference_data() -> Path | None:
    """The reference data folder (``GPT_REFERENCE_DATA``), if it is set and exists."""
    path = os.environ.get("GPT_REFERENCE_DATA")
    return Path(path) if path and Path(path).is_dir() else None


def needs_reference_data() -> str | None:
    if reference_data() is None:
        return "needs GPT_REFERENCE_DATA (the-verdict.txt and GPT-2's vocabulary files)"
    return None


def needs_h100() -> str | None:
    """The GPU numbers in the book are an H100's: another GPU's would not match the prose."""
    if torch.cuda.is_available() and "H100" in torch.cuda.get_device_name():
        return None
    return "needs an NVIDIA H100 (the chapter describes one)"


def verdict_command() -> list[str]:
    """The chapter-5 experiment, as the Pretraining chapter prints it."""
    data = reference_data() or Path("$GPT_REFERENCE_DATA")
    return [
        "-m", "src.train", "--preset", "gpt2-small", "--init", "pytorch",
        "--context-length", "256", "--data", str(data / "the-verdict.txt"),
        "--tokenizer", str(data / "gpt2"), "--batch-size", "2", "--lr", "4e-4", "--min-lr", "4e-4",
        "--warmup-steps", "0", "--weight-decay", "0.1", "--grad-clip", "0", "--epochs", "10",
        "--eval-interval", "5", "--eval-iters", "5", "--save-interval", "90",
        "--sample-prompt", "Every effort moves you", "--out-dir", "runs/verdict",
    ]  # fmt: skip


def needs_nvcc() -> str | None:
    """The ptxas report compiles the CUDA kernels; running them is not needed."""
    if torch.version.cuda is None or shutil.which("nvcc") is None:
        return "needs nvcc and a CUDA build of torch (no GPU)"
    return None


@dataclass(frozen=True)
class Step:
    name: str
    commands: Callable[[], list[list[str]]]  # arguments to ``python``, run from the repository
    writes: str  # under docs/assets/
    minutes: int  # about, on the book's 2-core machine
    missing: Callable[[], str | None] = lambda: None  # why it cannot run here, or None


STEPS = [
    Step("figures", lambda: [["book/figures.py"]], "diagrams/*.svg", 1),
    Step("break-it", lambda: [["-m", "experiments"]], "break-it/*.md", 30),
    Step("tokenizer", lambda: [["benchmarks/tokenizer.py", "--repeats", "7"]],
         "tokenizer-benchmark.{json,md}", 3),
    Step("attention", lambda: [["benchmarks/attention.py"]], "attention-benchmark.{json,md,png}", 12),
    Step("attention-versions", lambda: [["benchmarks/attention_versions.py"]],
         "attention-versions.{json,md}", 2),
    Step("attention-gpu",
         lambda: [["benchmarks/attention.py", "--threads", str(os.cpu_count()),
                   "--out", "docs/assets/attention-benchmark-h100"]],
         "attention-benchmark-h100.{json,md,png}", 2, needs_h100),
    Step("ptxas", lambda: [["benchmarks/ptxas.py"]], "flash-ptxas.md", 8, needs_nvcc),
    Step("activations", lambda: [["experiments/activations.py"]], "gelu-vs-relu.md", 5),
    Step("train-speed", lambda: [["benchmarks/train.py"]],
         "train-{benchmark.json,benchmark.md,nanogpt.md}", 6),
    Step("generate-speed", lambda: [["benchmarks/generate.py"]], "generate-benchmark.{json,md}", 1),
    Step("default-run",
         lambda: [["-m", "src.train"], ["book/curves.py", "runs/default"]],
         "default-curve.{png,md}", 4),
    # After the default run, which it measures (it trains the draft run first if it is missing).
    Step("inference", lambda: [["benchmarks/inference.py", "--threads", "1"]],
         "inference-*.{json,md}", 15),
    # After the default run: the Generating chapter's output is the generator on its checkpoint.
    Step("run-it", lambda: [["book/run_it.py"]], "run-it/*.md", 15),  # 13 of them instructions
    # After the default run: its MFU is read from runs/default.
    Step("accounting", lambda: [["experiments/accounting.py"]], "accounting/*.md", 2),
    Step("scaling-lab",
         lambda: [["experiments/scaling.py", "--book"],
                  ["experiments/scaling.py", "--quick", "--book"]],
         "scaling/*", 60),
    Step("efficiency", lambda: [["experiments/efficiency.py"]], "efficiency/*", 75),
    Step("ablation", lambda: [["experiments/ablation.py"]], "ablation.{md,json}", 120),
    Step("verdict",
         lambda: [verdict_command(),
                  ["book/curves.py", "runs/verdict", "--reference", "verdict"]],
         "verdict-curve.{png,md}", 10, needs_reference_data),
]  # fmt: skip
BY_NAME = {step.name: step for step in STEPS}


def shown(args: list[str]) -> str:
    return "uv run python " + shlex.join(args)


def main() -> None:
    parser = Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("steps", nargs="*", metavar="STEP", help="steps to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the steps and exit")
    parser.add_argument("--skip", nargs="+", default=[], metavar="STEP", help="steps to leave out")
    parser.add_argument("--from", dest="start", metavar="STEP", help="start at this step")
    args = parser.parse_args()
    for name in [*args.steps, *args.skip, *([args.start] if args.start else [])]:
        if name not in BY_NAME:
            parser.error(f"unknown step {name!r}; the steps are: {', '.join(BY_NAME)}")

    if args.list:
        for step in STEPS:
            why = step.missing()
            print(f"{step.name} (about {step.minutes} min{'; ' + why if why else ''})")
            for command in step.commands():
                print(f"    {shown(command)}")
            print(f"    -> docs/assets/{step.writes}")
        return

    chosen = [BY_NAME[name] for name in args.steps] or STEPS
    if args.start:
        names = [s.name for s in chosen]
        if args.start not in names:
            parser.error(f"--from {args.start}: not among the chosen steps ({', '.join(names)})")
        chosen = chosen[names.index(args.start) :]
    chosen = [s for s in chosen if s.name not in args.skip]
    total = time.perf_counter()
    for step in chosen:
        why = step.missing()
        if why:
            print(f"== {step.name}: skipped, {why}", flush=True)
            continue
        print(f"== {step.name} (about {step.minutes} min) -> docs/assets/{step.writes}", flush=True)
        start = time.perf_counter()
        for command in step.commands():
            print(f"$ {shown(command)}", flush=True)
            if subprocess.run([sys.executable, *command], cwd=REPO).returncode != 0:
                sys.exit(
                    f"error: step {step.name} failed; after fixing it, continue with "
                    f"`uv run python book/regenerate.py --from {step.name}`"
                )
        print(f"== {step.name} done in {(time.perf_counter() - start) / 60:.1f} min", flush=True)
    print(f"all done in {(time.perf_counter() - total) / 60:.1f} min; `git diff docs/assets` shows "
          "what changed")  # fmt: skip


if __name__ == "__main__":
    main()
