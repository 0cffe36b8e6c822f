"""What ptxas says about the flash attention CUDA kernels: registers, stack and spills, per architecture.

Compiles ``csrc/`` as ``src/fused_softmax.py`` does, for ``TORCH_CUDA_ARCH_LIST="8.0;9.0"`` and with
``-Xptxas -v``, in a child process and a build folder of its own; no GPU is needed, only nvcc and a
CUDA build of torch. The table of the flash kernels goes to ``docs/assets/flash-ptxas.md``; the
script fails if any kernel of ``csrc/`` uses stack or spills.

    uv run python benchmarks/ptxas.py        # a few minutes: two architectures, every kernel
"""

import os
import re
import subprocess
import sys
import tempfile
import textwrap
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.harness import markdown_table  # noqa: E402
from src.cli import Parser, run_command  # noqa: E402
from src.errors import UserError  # noqa: E402
from src.files import write_atomically  # noqa: E402

OUT = REPO / "docs" / "assets" / "flash-ptxas.md"
ARCHS = "8.0;9.0"

BUILD = textwrap.dedent("""
    import os, sys, torch
    from pathlib import Path
    from src import fused_softmax
    cpp_extension = fused_softmax._cpp_extension()
    cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"] = fused_softmax._cuda_home()
    _, cflags, ldflags = fused_softmax.build_flags(sys.platform, torch.backends.cpu.get_cpu_capability())
    sources = sorted(fused_softmax.CSRC.glob("*.cpp")) + sorted(fused_softmax.CSRC.glob("*.cu"))
    cpp_extension.load(name="gpt_ptxas", sources=[str(s) for s in sources], extra_cflags=cflags,
                       extra_ldflags=ldflags, extra_cuda_cflags=["-O3", "-Xptxas=-v"],
                       build_directory=sys.argv[1], is_python_module=False, verbose=True)
""")
ENTRY = re.compile(
    r"Compiling entry function '(\w+)' for '(sm_\d+)'.*?"
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads\s*\n"
    r"ptxas info\s*:\s*Used (\d+) registers",
    re.S,
)
KERNEL = re.compile(
    r"\d(flash_(?:forward|backward_dot|backward_dq|backward_dkdv)_kernel)I"
    r"(?:N3c10\d+(Half|BFloat16)E|([fd]))[fd](?:Li(\d)E)?"
)


def demangle(symbol: str) -> tuple[str, str, str] | None:
    """(kernel, dtype, lanes' output values NU) of a flash kernel's mangled name, else None."""
    m = KERNEL.search(symbol)
    if m is None:
        return None
    dtype = {"Half": "half", "BFloat16": "bf16"}.get(m[2]) or {"f": "float", "d": "double"}[m[3]]
    return m[1], dtype, m[4] or "-"


def parse(log: str) -> tuple[list[tuple], list[str]]:
    """Every entry of the log as (symbol, arch, stack, spill stores, spill loads, registers), and
    the symbols that use stack or spill."""
    entries = [(s, a, *map(int, rest)) for s, a, *rest in ENTRY.findall(log)]
    bad = [e[0] for e in entries if e[2] or e[3] or e[4]]
    return entries, bad


def to_markdown(entries: list[tuple]) -> str:
    regs = defaultdict(dict)  # (kernel, dtype) -> {(arch, NU): registers}
    for symbol, arch, *_, registers in entries:
        named = demangle(symbol)
        if named:
            kernel, dtype, nu = named
            regs[kernel, dtype][arch, nu] = registers
    flash = sum(1 for e in entries if demangle(e[0]))
    rows = [[f"`{kernel}`", dtype, *(", ".join(str(r) for (a, _), r in sorted(by.items()) if a == arch)
                                     for arch in ("sm_80", "sm_90"))]
            for (kernel, dtype), by in sorted(regs.items())]  # fmt: skip
    header = ["kernel", "dtype", "registers, sm_80 (NU = 1, 2, 3, 4)", "registers, sm_90"]
    lines = [
        markdown_table(header, rows),
        "",
        f"*Made by `uv run python benchmarks/ptxas.py` ({flash // 2} flash kernels for sm_80 and "
        f"sm_90; every one of the {len(entries)} kernel builds in the log with 0 bytes of stack "
        "and 0 bytes spilled; NU = ceil(head dim / 32) is the number of output values a lane "
        "holds, one register count per NU).*",
    ]
    return "\n".join(lines) + "\n"


def parser() -> Parser:
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=OUT, help="where the Markdown table goes")
    p.add_argument("--log", type=Path, help="parse this build log instead of building")
    return p


def run(args) -> None:
    if args.log:
        log = args.log.read_text()
    else:
        with tempfile.TemporaryDirectory() as build:
            env = {"TORCH_CUDA_ARCH_LIST": ARCHS}
            done = subprocess.run([sys.executable, "-c", BUILD, build], cwd=REPO, text=True,
                                  capture_output=True, env={**os.environ, **env})  # fmt: skip
            log = done.stdout + done.stderr
            if done.returncode != 0:
                raise UserError(f"the CUDA build failed:\n{log[-3000:]}")
    entries, bad = parse(log)
    if not entries:
        raise UserError("no ptxas output found in the build log")
    if bad:
        raise UserError(f"kernels with stack or spills: {bad}")
    write_atomically(args.out, to_markdown(entries))
    print(to_markdown(entries))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(run_command(parser(), run, sys.argv[1:]))
