"""Flash attention: the whole causal attention core as one kernel of our own, forward and backward.

The fused softmax (``src/fused_softmax.py``) made the middle step of attention one pass, but the
``(B, H, T, T)`` scores still exist in memory and both matrix products still compute the masked half.
``csrc/flash_attention.cpp`` (and ``csrc/flash_attention_cuda.cu``) compute
``softmax(mask(q k^T * scale)) v`` tile by tile with an online softmax: a tile of scores lives in
cache for a moment and is gone, tiles above the diagonal are never computed, and the forward keeps
only the output and one log-sum-exp per row, from which the backward recomputes the probabilities.

The kernels are built with the fused softmax, in the same library and by the same just-in-time build
(``fused_softmax.unavailable_reason``); this module registers autograd and fake implementations for
the ``gpt_flash`` ops, and says whether they can be used:

- ``flash_causal_attention(q, k, v, scale)``: the op, differentiable; raises if it cannot be built.
- ``runs(dropout_p)``: what the model asks on every call. False, with one warning, when the kernel
  cannot be built or attention dropout is on (the kernel has no dropout; the model then runs SDPA).
- ``ensure_available()``: the strict switch.

``forward_version`` runs the forward in each of its six versions (the lab of the chapter).
"""

import warnings

import torch

from src import fused_softmax

# --8<-- [start:autograd]
# Shape-only versions of the two ops, for torch.compile. The output is (B, T, H, D) in memory,
# seen as (B, H, T, D), so that the model's merge of the heads costs nothing.


def _fake_forward(q, k, v, scale):
    B, H, T, D = q.shape
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty(B, T, H, D).transpose(1, 2), q.new_empty(B, H, T, dtype=lse_dtype)


def _fake_backward(grad, q, k, v, out, lse, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, scale = inputs
    out, lse = output
    ctx.scale = scale
    ctx.save_for_backward(q, k, v, out, lse)  # no (T, T) tensor: the backward recomputes it


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.gpt_flash.causal_attention_backward(
        grad_out, q, k, v, out, lse, ctx.scale
    )
    return dq, dk, dv, None


def _register() -> None:
    torch.library.register_fake("gpt_flash::causal_attention", _fake_forward)
    torch.library.register_fake("gpt_flash::causal_attention_backward", _fake_backward)
    torch.library.register_autograd(
        "gpt_flash::causal_attention", _backward, setup_context=_setup_context
    )


# --8<-- [end:autograd]


# --8<-- [start:availability]
_registered = False
_warned: set[str] = set()  # the reasons already warned about, each once


def unavailable_reason() -> str | None:
    """Why the kernel cannot be used (building the library first if not tried yet), or None."""
    global _registered
    reason = fused_softmax.unavailable_reason()  # one library holds every kernel of csrc/
    if reason is None and not _registered:
        _register()
        _registered = True
    return reason


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


def runs(dropout_p: float = 0.0) -> bool:
    """True if the flash kernel can compute this call; else warns once why, and returns False."""
    if dropout_p > 0:
        _warn_once("flash attention has no dropout: using SDPA while attention dropout is on")
        return False
    reason = unavailable_reason()
    if reason is not None:
        _warn_once(f"flash attention unavailable, using SDPA: {reason}")
    return reason is None


def ensure_available() -> None:
    """The strict switch: build/load the kernel, or raise RuntimeError saying why not."""
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"the flash attention kernel could not be built: {reason}")


# --8<-- [end:availability]


# --8<-- [start:op]
def flash_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """softmax(mask(q k^T * scale)) v, where query i sees keys 0..i, in one kernel.

    ``q`` is ``(B, H, T, D)``; ``k`` and ``v`` are ``(B, H_kv, T, D)`` with ``H_kv`` dividing ``H``
    (query head ``h`` reads key/value head ``h // (H / H_kv)``: grouped-query attention). Any
    strides; CPU or CUDA; float32, float64, bfloat16 or float16 (sums in float32, or float64).
    ``scale`` must be positive. Returns ``(B, H, T, D)``, differentiable in ``q``, ``k`` and ``v``;
    raises RuntimeError if the kernel cannot be built.
    """
    ensure_available()
    out, _ = torch.ops.gpt_flash.causal_attention(q, k, v, scale)
    return out


# --8<-- [end:op]


# --8<-- [start:versions]
VERSIONS = {
    1: "scalar reference",
    2: "vectorised",
    3: "multi-threaded",
    4: "causal skip, scale folded",
    5: "fused softmax",
    6: "flash",
}


def forward_version(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, version: int
) -> torch.Tensor:
    """The attention forward computed by one of the six versions of the lab (``VERSIONS``).

    Versions 1 to 4 take float32 or float64 CPU tensors with as many key/value heads as query heads.
    """
    if version not in VERSIONS:
        raise ValueError(f"version must be one of {list(VERSIONS)}, got {version!r}")
    ensure_available()
    if version == 5:  # blocked matrix products around our softmax kernel
        scores = q @ k.transpose(-2, -1)  # (B, H, T, T)
        return fused_softmax.fused_causal_softmax(scores, scale) @ v
    if version == 6:
        return flash_causal_attention(q, k, v, scale)
    return torch.ops.gpt_flash.attention_version(q, k, v, scale, version)


# --8<-- [end:versions]
