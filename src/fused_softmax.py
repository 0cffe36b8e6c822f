"""The fused causal softmax: our own C++/CUDA kernel for attention's scale + mask + softmax step.

The plain path in ``src/attention.py`` scales the ``(..., T, T)`` scores, fills the upper triangle
with ``-inf`` and takes a softmax: three passes over a large tensor, three allocations, and half of
the work spent on positions that end up exactly zero. The kernels in ``csrc/`` do it in one visit
per row, reading only the causal prefix.

This module makes those kernels usable from Python:

1. **Build** ``csrc/`` just in time with ``torch.utils.cpp_extension.load`` (ninja), with the flags
   that this CPU supports, into a cache directory keyed by everything that makes a build
   incompatible. The first use compiles (seconds for the CPU, about a minute more with CUDA) and says so; later
   uses load the cached library.
2. **Register** autograd and a fake (shape-only) implementation for the ops the library defines,
   so that ``fused_causal_softmax`` is differentiable and traceable by ``torch.compile``.
3. **Report** whether it worked: ``is_available()`` and ``unavailable_reason()`` for callers that
   can fall back to the plain path (the model does, with one warning), ``ensure_available()`` for
   callers that must not (``--fused-attention`` in the trainer).
"""

import hashlib
import logging
import os
import sys
import time
import warnings
from pathlib import Path

import torch

from src.files import cache_dir

CSRC = Path(__file__).resolve().parent.parent / "csrc"


# --8<-- [start:flags]
# How each compiler is told that it may emit a capability's instructions.
_ISA = {
    "gcc": {  # GCC and Clang, Apple's included
        "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
        "AVX2": ["-mavx2", "-mfma", "-mf16c"],
    },
    "msvc": {"AVX512": ["/arch:AVX512"], "AVX2": ["/arch:AVX2"]},
}


def build_flags(platform: str, capability: str) -> tuple[str, list[str], list[str]]:
    """The capability to compile for, and the compile and link flags, on ``sys.platform`` ``platform``.

    ``at::vec::Vectorized`` is plain scalar code unless the capability macro is defined *and* the
    compiler may emit the instructions; ``-march=native`` alone is not enough. ``at::parallel_for``
    is serial unless the extension is compiled with OpenMP and linked to its runtime. ``capability``
    is the one PyTorch itself picked for this CPU, and it is part of the cache key, so a library
    built for AVX-512 is never loaded on a CPU without it. Each platform's compiler (the one
    ``cpp_extension`` calls) spells all this its own way:

    - Linux, GCC: ``-fopenmp`` at compile and link time.
    - macOS, Apple Clang: it rejects ``-fopenmp`` but takes ``-Xclang -fopenmp``; PyTorch's wheel
      ships the ``omp.h`` and ``libomp`` to go with it (what ``torch.compile`` uses there too).
    - Windows, MSVC: ``/O2 /openmp`` and ``/arch:``; the linker finds the OpenMP runtime itself.
    """
    msvc = platform == "win32"
    isa = _ISA["msvc" if msvc else "gcc"].get(capability)
    if isa is None:  # no vector ISA that ATen compiles kernels for: its generic code
        capability, isa = "DEFAULT", []
    else:
        d = "/D" if msvc else "-D"
        isa = [*isa, f"{d}CPU_CAPABILITY={capability}", f"{d}CPU_CAPABILITY_{capability}"]
    if msvc:
        return capability, ["/O2", "/openmp", *isa], []
    if platform == "darwin":
        return capability, ["-O3", "-Xclang", "-fopenmp", *isa], ["-lomp"]
    return capability, ["-O3", "-fopenmp", *isa], ["-fopenmp"]


# --8<-- [end:flags]


def _cpp_extension():
    """``torch.utils.cpp_extension``, imported on first use rather than with this module.

    Importing it guesses CUDA_HOME and, on a machine without a GPU, logs a warning about the guess;
    ``_cuda_home`` checks the guess itself, so that warning is only noise and is held back.
    """
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        logger.setLevel(level)
    return cpp_extension


def _cuda_home() -> str | None:
    """A CUDA toolkit directory that really holds the headers, or None.

    torch guesses CUDA_HOME from the location of ``nvcc``, which is wrong when ``nvcc`` is a wrapper
    script in ``/usr/local/bin``; so the guess is checked, then ``/usr/local/cuda`` is tried.
    """
    cpp_extension = _cpp_extension()
    for home in (os.environ.get("CUDA_HOME"), cpp_extension.CUDA_HOME, "/usr/local/cuda"):
        if home and (Path(home) / "include" / "cuda_runtime.h").is_file():
            return home
    return None


def _cuda_archs() -> str:
    """The GPU architectures to compile for: ``TORCH_CUDA_ARCH_LIST`` if set, else this GPU's."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    major, minor = torch.cuda.get_device_capability()
    return f"{major}.{minor}"


def _build_dir(capability: str, cuda_archs: str | None) -> Path:
    """``$GPT_CACHE_DIR/extensions/<torch, CPU capability, CUDA arch, checkout>``, created if needed."""
    root = cache_dir()
    arch = (
        "cpu"
        if cuda_archs is None
        else "sm" + "_".join(a.replace(".", "") for a in cuda_archs.replace(";", " ").split())
    )
    # Two checkouts (or two environments) compile with different paths; each gets its own build
    # instead of rebuilding over the other's.
    where = hashlib.sha256(f"{CSRC}:{torch.__file__}".encode()).hexdigest()[:8]
    key = f"torch{torch.__version__.replace('+', '_')}-{capability.lower()}-{arch}-{where}"
    path = root / "extensions" / key
    path.mkdir(parents=True, exist_ok=True)
    return path


STALE_LOCK_S = 15 * 60  # no build of ours takes this long


def _clear_stale_lock(build_dir: Path) -> None:
    """Remove a build lock left by a killed build, on the torch versions where it would hang us.

    Older torch marks a build in progress by the mere existence of ``<build_dir>/lock``; a build
    killed midway leaves the file, and every later ``load()`` then waits for it forever, silently.
    Newer torch holds an OS lock on the file instead, which dies with its holder.
    """
    cpp_extension = _cpp_extension()
    lock = build_dir / "lock"
    if hasattr(cpp_extension, "FileLock") or not lock.exists():
        return
    age = time.time() - lock.stat().st_mtime
    if age > STALE_LOCK_S:
        print(
            f"fused softmax: removing a stale build lock ({age / 60:.0f} min old): {lock}",
            file=sys.stderr,
        )
        lock.unlink(missing_ok=True)


# --8<-- [start:build]
def _build(cuda: bool) -> None:
    """Compile (or load from the cache) the library and register its ops with PyTorch."""
    cpp_extension = _cpp_extension()
    capability, cflags, ldflags = build_flags(sys.platform, torch.backends.cpu.get_cpu_capability())
    sources = sorted(CSRC.glob("*.cpp"))  # the fused softmax, flash attention, the versions lab
    cuda_archs = None
    if cuda:
        # A .cu source makes load() need nvcc and a CUDA_HOME; a CPU-only torch has neither.
        cuda_home = _cuda_home()
        if cuda_home is None:
            raise RuntimeError(
                "torch has CUDA but no CUDA toolkit (cuda_runtime.h) was found; set CUDA_HOME"
            )
        cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"] = cuda_home
        cuda_archs = os.environ["TORCH_CUDA_ARCH_LIST"] = _cuda_archs()
        sources += sorted(CSRC.glob("*.cu"))
    build_dir = _build_dir(capability, cuda_archs)
    _clear_stale_lock(build_dir)
    library = build_dir / ("gpt_fused_softmax" + (".pyd" if sys.platform == "win32" else ".so"))
    cached = library.exists()
    if not cached:
        target = f"CPU ({capability})" + (f" and CUDA (sm {cuda_archs})" if cuda else "")
        print(
            f"fused softmax: compiling the extension for {target} in {build_dir} "
            "(first use only)...",
            file=sys.stderr,
        )
    start = time.perf_counter()
    cpp_extension.load(
        name="gpt_fused_softmax",
        sources=[str(s) for s in sources],
        extra_cflags=cflags,
        extra_ldflags=ldflags,
        extra_cuda_cflags=["-O3"] if cuda else None,
        build_directory=str(build_dir),
        is_python_module=False,  # the library registers torch ops; no Python module of its own
    )
    elapsed = time.perf_counter() - start
    if elapsed > 1.0:  # compiled: the first use, or the sources changed since the cached build
        print(f"fused softmax: built in {elapsed:.1f} s", file=sys.stderr)


# --8<-- [end:build]


# --8<-- [start:autograd]
# Shape-only versions of the two ops: what torch.compile traces instead of running the kernels.
def _fake_forward(scores, scale):
    return torch.empty_like(scores, memory_format=torch.contiguous_format)


def _fake_backward(grad, probs, scale):
    return torch.empty_like(probs, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    _, scale = inputs
    ctx.scale = scale
    ctx.save_for_backward(output)  # the backward needs only the probabilities


def _backward(ctx, grad):
    (probs,) = ctx.saved_tensors
    return torch.ops.gpt_fused.causal_softmax_backward(grad, probs, ctx.scale), None


def _register() -> None:
    torch.library.register_fake("gpt_fused::causal_softmax", _fake_forward)
    torch.library.register_fake("gpt_fused::causal_softmax_backward", _fake_backward)
    torch.library.register_autograd(
        "gpt_fused::causal_softmax", _backward, setup_context=_setup_context
    )


# --8<-- [end:autograd]


def _first_error(err: Exception) -> str:
    """One line that says why: the compiler's first error if there is one, else the message."""
    lines = str(err).strip().splitlines() or [""]
    first = next((line for line in lines if "error" in line.lower() and len(line) < 300), lines[-1])
    return f"{type(err).__name__}: {first.strip()}"


# --8<-- [start:availability]
_UNTRIED = object()
_reason: object = _UNTRIED  # None once loaded, else why the build failed
_warned = False


def unavailable_reason() -> str | None:
    """Why the extension cannot be used (building it first if not tried yet), or None if it can."""
    global _reason
    if _reason is _UNTRIED:
        try:
            _build(cuda=torch.cuda.is_available())  # CUDA kernels only where a GPU can run them
            _register()
            _reason = None
        # A build fails in many ways (no compiler, a compile error, a failed subprocess, a bad .so);
        # every one of them means the same to callers: say why, let them decide.
        except Exception as err:  # noqa: BLE001
            _reason = _first_error(err)
    return _reason


def is_available() -> bool:
    """True if the fused kernels are loaded; else warns once, with the reason, and returns False."""
    global _warned
    reason = unavailable_reason()
    if reason is not None and not _warned:
        _warned = True
        warnings.warn(f"fused softmax unavailable, using the plain path: {reason}", stacklevel=2)
    return reason is None


def ensure_available() -> None:
    """The strict switch: build/load the extension, or raise RuntimeError saying why not."""
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"the fused softmax extension could not be built: {reason}")


# --8<-- [end:availability]


# --8<-- [start:op]
def fused_causal_softmax(scores: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(scale * scores) over the last dimension, where row i sees only columns 0..i.

    ``scores`` is ``(..., T, T)``, on CPU or CUDA, in float32, float64, bfloat16 or float16; it may be
    non-contiguous. ``scale`` must be positive. Columns after the diagonal are exactly 0. The result
    is differentiable; raises RuntimeError if the extension cannot be built.
    """
    ensure_available()
    return torch.ops.gpt_fused.causal_softmax(scores, scale)


# --8<-- [end:op]
