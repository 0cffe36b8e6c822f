"""The fused causal softmax equals the plain PyTorch path, forward and backward, on every shape and dtype.

The reference is ``causal_softmax`` in ``src/attention.py``: scale, ``masked_fill`` with -inf,
``torch.softmax``, differentiated by autograd. The CUDA kernels are compiled here wherever ``nvcc``
and a CUDA build of torch exist, and compared with the reference wherever a GPU exists.

On a machine where the extension cannot be built (no working C++ compiler), the tests that need it
skip, saying why; ``GPT_REQUIRE_FUSED=1`` (which ``.ci/run`` sets) makes that a failure instead, so
CI proves the kernel.
"""

import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from src import fused_softmax
from src.attention import causal_softmax
from src.model import GPTConfig, GPTModel

REPO = Path(__file__).resolve().parent.parent
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def without_extension(test):
    """Mark a test that needs no built extension, so it runs even where none can be built."""
    test.without_extension = True
    return test


@pytest.fixture(autouse=True)
def built(request):
    """Build (or load, once per process) the extension; skip, saying why, where it cannot be built."""
    if getattr(request.function, "without_extension", False):
        return
    reason = fused_softmax.unavailable_reason()
    if reason is None:
        return
    if os.environ.get("GPT_REQUIRE_FUSED") == "1":
        pytest.fail(f"GPT_REQUIRE_FUSED=1 but the fused softmax extension was not built: {reason}")
    pytest.skip(f"the fused softmax extension could not be built: {reason}")


def plain(scores: torch.Tensor, scale: float) -> torch.Tensor:
    T = scores.shape[-1]
    mask = torch.triu(torch.ones(T, T, dtype=torch.bool, device=scores.device), diagonal=1)
    return causal_softmax(scores, scale, mask)


def both_ways(scores: torch.Tensor, scale: float, grad: torch.Tensor):
    """Outputs and input gradients of the fused and the plain path, from the same input."""
    results = []
    for fn in (fused_softmax.fused_causal_softmax, plain):
        x = scores.detach().clone().requires_grad_()
        y = fn(x, scale)
        y.backward(grad)
        results.append((y.detach(), x.grad))
    return results


SHAPES = [(3, T, T) for T in (1, 2, 7, 33, 64, 127)] + [(2, 3, T, T) for T in (1, 7, 64, 127)]
SHAPES += [(1, 2, 1000, 1000)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_float32_matches_plain(shape, device):
    scores = torch.randn(shape, device=device) * 3
    grad = torch.randn(shape, device=device)
    (y, dx), (y_ref, dx_ref) = both_ways(scores, 0.125, grad)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-6)
    # The future gets exactly zero probability and exactly zero gradient.
    future = torch.ones(shape[-2:], dtype=torch.bool, device=device).triu(1)
    assert (y[..., future] == 0).all() and (dx[..., future] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    base = torch.randn(4, 70, 2, 70, device=device)
    scores = base.transpose(1, 2)  # (4, 2, 70, 70), rows strided in memory
    grad = torch.randn(2, 70, 70, 4, device=device).permute(3, 0, 1, 2)  # (4, 2, 70, 70)
    assert not scores.is_contiguous() and not grad.is_contiguous()
    (y, dx), (y_ref, dx_ref) = both_ways(scores, 0.3, grad)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T", [7, 64, 200])
def test_half_types_match_plain(dtype, T, device):
    scores = (torch.randn(2, 3, T, T, device=device) * 3).to(dtype)
    grad = torch.randn(2, 3, T, T, device=device).to(dtype)
    (y, dx), (y_ref, dx_ref) = both_ways(scores, 0.125, grad)
    assert y.dtype == dx.dtype == dtype
    # Both round to the same 8 (bf16) or 11 (fp16) significant bits; the fused path accumulates
    # in float32 throughout, the plain one rounds between its steps.
    tol = {"rtol": 2e-2, "atol": 1e-2} if dtype == torch.bfloat16 else {"rtol": 2e-3, "atol": 2e-3}
    torch.testing.assert_close(y.float(), y_ref.float(), **tol)
    torch.testing.assert_close(dx.float(), dx_ref.float(), **tol)


@pytest.mark.parametrize("device", DEVICES)
def test_extreme_values(device):
    T = 50
    scores = torch.randn(2, T, T, device=device) * 1e4  # exp would overflow without the max
    hidden = torch.rand(2, T, T, device=device) < 0.3
    hidden.diagonal(dim1=-2, dim2=-1).fill_(False)  # keep one visible value per row
    scores = scores.masked_fill(hidden, float("-inf"))  # -inf already present, as after padding
    grad = torch.randn(2, T, T, device=device)
    (y, dx), (y_ref, dx_ref) = both_ways(scores, 0.125, grad)
    assert torch.isfinite(y).all() and torch.isfinite(dx).all()
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_float64(device):
    scores = torch.randn(2, 3, 9, 9, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: fused_softmax.fused_causal_softmax(x, 0.7), (scores,))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    scores = torch.randn(2, 5, 5, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.gpt_fused.causal_softmax, (scores, 0.5))
    torch.library.opcheck(
        torch.ops.gpt_fused.causal_softmax_backward,
        (torch.randn(2, 5, 5, device=device), torch.rand(2, 5, 5, device=device), 0.5),
    )


def test_torch_compile_fullgraph():
    def attention_weights(q, k):
        return fused_softmax.fused_causal_softmax(q @ k.transpose(-2, -1), 0.25)

    compiled = torch.compile(attention_weights, fullgraph=True)  # inductor, through the fake
    q = torch.randn(2, 16, 8, requires_grad=True)
    k = torch.randn(2, 16, 8, requires_grad=True)
    compiled(q, k).sum().backward()
    q_ref, k_ref = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    plain(q_ref @ k_ref.transpose(-2, -1), 0.25).sum().backward()
    torch.testing.assert_close(q.grad, q_ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(k.grad, k_ref.grad, rtol=1e-5, atol=1e-6)


def test_model_fused_equals_eager():
    cfg = GPTConfig.from_preset("cpu-tiny")
    eager = GPTModel(cfg)
    fused = GPTModel(GPTConfig.from_preset("cpu-tiny", attn_impl="fused"))
    fused.load_state_dict(eager.state_dict())
    idx = torch.randint(0, cfg.vocab_size, (3, cfg.context_length))
    logits = [model(idx) for model in (eager, fused)]
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-5)
    for out in logits:
        out.square().mean().backward()
    for (name, p_eager), p_fused in zip(eager.named_parameters(), fused.parameters(), strict=True):
        torch.testing.assert_close(p_fused.grad, p_eager.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_bad_input_is_a_clear_error():
    with pytest.raises(RuntimeError, match=r"must be \(\.\.\., T, T\)"):
        fused_softmax.fused_causal_softmax(torch.randn(2, 3, 4), 1.0)
    with pytest.raises(RuntimeError, match="scale must be positive"):
        fused_softmax.fused_causal_softmax(torch.randn(4, 4), 0.0)


FALLBACK = textwrap.dedent("""
    import warnings, torch
    from src import fused_softmax
    from src.model import GPTConfig, GPTModel
    torch.manual_seed(0)
    eager = GPTModel(GPTConfig.from_preset("cpu-tiny"))
    fused = GPTModel(GPTConfig.from_preset("cpu-tiny", attn_impl="fused"))
    fused.load_state_dict(eager.state_dict())
    idx = torch.randint(0, 1024, (2, 16))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        same = all(torch.equal(fused(idx), eager(idx)) for _ in range(3))
    print("same", same)
    print("warnings", len(caught), caught[0].message if caught else "")
    try:
        fused_softmax.ensure_available()
    except RuntimeError as err:
        print("strict", err)
""")


@without_extension
def test_failed_build_falls_back_once_and_strict_raises(tmp_path):
    # A compiler that always fails, and an empty cache, so the build really runs and really fails.
    env = {**os.environ, "CXX": "false", "GPT_CACHE_DIR": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-c", FALLBACK],
        cwd=REPO,
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    assert lines["same"] == "True"  # the plain path ran in every layer, every call
    assert lines["warnings"].startswith("1 fused softmax unavailable, using the plain path")
    assert lines["strict"].startswith("the fused softmax extension could not be built")


@without_extension
@pytest.mark.slow
@pytest.mark.parametrize("require, outcome", [("0", "1 skipped"), ("1", "1 error")])
def test_without_a_compiler_tests_skip_unless_required(tmp_path, require, outcome):
    # The ``built`` fixture seen from outside: a test of this file, run where no compiler works.
    env = {
        **os.environ,
        "CXX": "false",
        "GPT_CACHE_DIR": str(tmp_path),
        "GPT_REQUIRE_FUSED": require,
    }
    test = "tests/test_fused_softmax.py::test_bad_input_is_a_clear_error"
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rs", test],
        cwd=REPO,
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert outcome in out.stdout, out.stdout[-3000:]
    if require == "0":
        assert "SKIPPED" in out.stdout and "could not be built" in out.stdout


@without_extension
def test_stale_lock_from_a_killed_build_is_removed(tmp_path, monkeypatch, capsys):
    from torch.utils import cpp_extension

    monkeypatch.delattr(cpp_extension, "FileLock", raising=False)  # older torch
    lock = tmp_path / "lock"
    lock.touch()
    fused_softmax._clear_stale_lock(tmp_path)
    assert lock.exists()  # a fresh lock belongs to a build in progress
    old = time.time() - fused_softmax.STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    fused_softmax._clear_stale_lock(tmp_path)
    assert not lock.exists()
    assert "stale build lock" in capsys.readouterr().err


AVX512_GCC = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma",
              "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]  # fmt: skip
AVX2_GCC = ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
FLAGS = {  # (sys.platform, torch's CPU capability) -> (capability built, cflags, ldflags)
    ("linux", "AVX512"): ("AVX512", ["-O3", "-fopenmp", *AVX512_GCC], ["-fopenmp"]),
    ("linux", "AVX2"): ("AVX2", ["-O3", "-fopenmp", *AVX2_GCC], ["-fopenmp"]),
    ("linux", "DEFAULT"): ("DEFAULT", ["-O3", "-fopenmp"], ["-fopenmp"]),
    ("linux", "SVE256"): ("DEFAULT", ["-O3", "-fopenmp"], ["-fopenmp"]),  # an Arm server
    ("darwin", "DEFAULT"): ("DEFAULT", ["-O3", "-Xclang", "-fopenmp"], ["-lomp"]),  # Apple silicon
    ("darwin", "AVX2"): ("AVX2", ["-O3", "-Xclang", "-fopenmp", *AVX2_GCC], ["-lomp"]),  # Intel Mac
    ("win32", "AVX512"): (
        "AVX512",
        ["/O2", "/openmp", "/arch:AVX512", "/DCPU_CAPABILITY=AVX512", "/DCPU_CAPABILITY_AVX512"],
        [],
    ),
    ("win32", "AVX2"): (
        "AVX2",
        ["/O2", "/openmp", "/arch:AVX2", "/DCPU_CAPABILITY=AVX2", "/DCPU_CAPABILITY_AVX2"],
        [],
    ),
    ("win32", "DEFAULT"): ("DEFAULT", ["/O2", "/openmp"], []),
}


@without_extension
@pytest.mark.parametrize("platform, capability", FLAGS, ids="-".join)
def test_build_flags_per_platform(platform, capability):
    # Apple Clang rejects -fopenmp and MSVC takes no GCC-style flag; Linux keeps GCC's flags.
    assert fused_softmax.build_flags(platform, capability) == FLAGS[platform, capability]


CUDA_BUILD = textwrap.dedent("""
    import torch
    from src import fused_softmax
    fused_softmax._build(cuda=True)
    for op in ("gpt_fused::causal_softmax", "gpt_fused::causal_softmax_backward",
               "gpt_flash::causal_attention", "gpt_flash::causal_attention_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), op
    print("cuda kernels registered")
""")


@pytest.mark.skipif(torch.version.cuda is None, reason="torch is a CPU-only build")
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.slow
def test_cuda_sources_compile_and_load():
    # In a subprocess: the CUDA build defines the same ops as the CPU build already loaded here.
    env = {**os.environ, "TORCH_CUDA_ARCH_LIST": "8.0;9.0"}  # two archs, to bound the build time
    out = subprocess.run(
        [sys.executable, "-c", CUDA_BUILD],
        cwd=REPO,
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "cuda kernels registered" in out.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T", [1, 31, 33, 100, 512, 1000, 1024, 1025, 2048])
def test_cuda_all_row_lengths(T, dtype):
    # Every warp-per-row width, the scalar tail (odd T) and the block-per-row kernel (T > 1024).
    scores = (torch.randn(2, T, T, device="cuda") * 3).to(dtype)
    grad = torch.randn(2, T, T, device="cuda").to(dtype)
    (y, dx), (y_ref, dx_ref) = both_ways(scores, 0.125, grad)
    tol = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (2e-2, 1e-2), torch.float16: (2e-3, 2e-3)}
    rtol, atol = tol[dtype]
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=rtol, atol=atol)
    torch.testing.assert_close(dx.float(), dx_ref.float(), rtol=rtol, atol=atol)
