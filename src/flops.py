"""What a training step costs: FLOPs, memory, and how much of the machine it uses.

Before training a model of a given size on a given number of tokens, three numbers say whether it
fits and how long it will take:

- **FLOPs.** Nearly all the arithmetic of a transformer is in its matrix multiplies. A multiply of
  an ``(m, k)`` by a ``(k, n)`` matrix costs ``m k n`` multiply-adds, counted as ``2 m k n``
  floating-point operations. ``training_flops_per_token`` adds them up for one forward and backward
  pass, per token; ``six_n_flops_per_token`` is the rule of thumb ``6 N`` it refines.
- **Memory.** A step holds the weights, their gradients, AdamW's two moments, and the activations
  that the backward pass needs. ``training_memory`` estimates each; ``PeakMemory`` measures what a
  step really holds at its fullest, so the estimate can be checked.
- **Utilisation.** Achieved FLOPs per second over the peak the device can do: the model FLOPs
  utilisation, MFU (Chowdhery et al., 2022). The peak is not a number from a data sheet: it is
  measured once on this machine, per device and dtype, by ``peak_matmul_flops``, and cached.
"""

import json
import math
import os
import platform
import time
import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from src.files import cache_dir, write_atomically
from src.model import GPTConfig


# --8<-- [start:flops]
def training_flops_per_token(cfg: GPTConfig) -> int:
    """Matrix-multiply FLOPs of one forward and backward pass, per token, at a full context of
    ``cfg.context_length`` tokens, counted as dense (2 FLOPs per multiply-add), the head included.

    The modern switches change the shapes, not the rule: grouped-query attention has narrower key
    and value projections, SwiGLU three feed-forward matrices, Qwen3 a head width of its own.
    Elementwise work (the norms, GELU or SiLU, rotary positions, softmax, the optimizer) is left
    out: it is a few percent of the total and is limited by memory bandwidth, not arithmetic."""
    d, T = cfg.emb_dim, cfg.context_length
    q_width = cfg.n_heads * cfg.head_size  # the query heads, and the heads' output
    kv_width = cfg.kv_heads * cfg.head_size  # the key and value heads: fewer with grouped queries
    projections = 2 * d * (2 * q_width + 2 * kv_width)  # W_query, out_proj; W_key, W_value
    attention = 2 * 2 * T * q_width  # q k^T, weights @ v: T keys a query head, masked half too
    feedforward = 2 * ff_matrices(cfg) * d * cfg.ff_width  # fc (d, h), proj (h, d); SwiGLU's gate
    head = 2 * d * cfg.vocab_size  # out_head (d, vocab_size)
    forward = cfg.n_layers * (projections + attention + feedforward) + head
    # Backward: every y = x W needs dL/dx = dL/dy W^T and dL/dW = x^T dL/dy, two multiplies of
    # the forward's size.
    return 3 * forward


def ff_matrices(cfg: GPTConfig) -> int:
    """The feed-forward network's matrices: GELU's MLP has two, SwiGLU a gate besides."""
    return 3 if cfg.ff == "swiglu" else 2


def matmul_parameters(cfg: GPTConfig) -> int:
    """N: the weights a token is multiplied by, every linear layer's and the head's. Not the
    embeddings (a lookup), the biases or the norms (elementwise)."""
    d, q_width, kv_width = cfg.emb_dim, cfg.n_heads * cfg.head_size, cfg.kv_heads * cfg.head_size
    block = d * (2 * q_width + 2 * kv_width) + ff_matrices(cfg) * d * cfg.ff_width
    return cfg.n_layers * block + d * cfg.vocab_size


def six_n_flops_per_token(cfg: GPTConfig) -> int:
    """The rule of thumb: each of N weights does one multiply-add forward (2 FLOPs) and two
    backward (4 FLOPs). It leaves out attention's 12 n_layers T emb_dim, which has no weights."""
    return 6 * matmul_parameters(cfg)


# --8<-- [end:flops]


# --8<-- [start:memory]
@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a float32 training step with AdamW holds, by what holds them."""

    weights: int
    gradients: int
    optimizer: int  # AdamW's two moments per weight
    activations: int  # what the forward pass saves for the backward pass
    logits_grads: int  # two (B, T, vocab_size) buffers as the backward pass starts
    recomputed: int  # one block's activations, rebuilt in the backward pass (checkpointing)

    @property
    def peak(self) -> int:
        """Gradients and activations are never all alive at once: the backward pass frees each
        layer's activations as it makes that layer's gradients. The fullest moments are the start
        of the backward pass, before any gradient; with checkpointing, a block recomputed; and the
        optimizer step, after the last activation is gone."""
        held = self.weights + self.optimizer + self.activations
        return max(held + self.logits_grads, held + self.recomputed,
                   self.weights + self.gradients + self.optimizer)  # fmt: skip


def parameter_count(cfg: GPTConfig) -> int:
    """Every trained number of ``GPTModel(cfg)``: what ``count_parameters`` counts, from the config."""
    d, h, hd = cfg.emb_dim, cfg.ff_width, cfg.head_size
    q_width, kv_width = cfg.n_heads * hd, cfg.kv_heads * hd
    attention = d * (2 * q_width + 2 * kv_width) + (q_width + 2 * kv_width if cfg.qkv_bias else 0)
    attention += (d if cfg.bias else 0) + (2 * hd if cfg.qk_norm else 0)  # out bias; q, k norms
    feedforward = ff_matrices(cfg) * d * h + ((ff_matrices(cfg) - 1) * h + d if cfg.bias else 0)
    norm = 2 * d if cfg.norm == "layernorm" else d  # scale and shift, or a scale alone
    head = 0 if cfg.tie_weights else d * cfg.vocab_size
    embeddings = (cfg.vocab_size + (cfg.context_length if cfg.pos_emb == "learned" else 0)) * d
    return embeddings + cfg.n_layers * (attention + feedforward + 2 * norm) + norm + head


GPT2_BLOCK = {"norm": "layernorm", "pos_emb": "learned", "ff": "gelu", "ff_hidden_dim": None,
              "n_kv_heads": None, "head_dim": None, "qk_norm": False}  # fmt: skip


def block_activation_bytes(cfg: GPTConfig) -> int:
    """What one block saves for the backward pass, per token, counted tensor by tensor.

    In units of emb_dim floats, 32: each LayerNorm its input, the centred input and the normalised
    output (3, twice); attention the projections' input, q, k, v and the heads' output (5); the
    feed-forward its input (1), and GELU, spelled out elementwise, four 4 emb_dim tensors (16) and
    its output (4). Besides, the softmax weights (n_heads T floats) and the two LayerNorms'
    deviations (1 float each). Dropout adds its masks (float32 on a CPU) and a second copy of the
    attention weights, the one after dropout.

    GPT-2's block only: the modern switches save other tensors, and are refused rather than
    guessed at."""
    modern = {
        name: getattr(cfg, name) for name, gpt2 in GPT2_BLOCK.items() if getattr(cfg, name) != gpt2
    }
    if modern:
        raise ValueError(f"the activation count knows GPT-2's block only, not {modern}")
    d, H, T = cfg.emb_dim, cfg.n_heads, cfg.context_length
    dropout = 2 * H * T + 2 * d if cfg.drop_rate > 0 else 0
    return 4 * (32 * d + H * T + 2 + dropout)


def activation_bytes(
    cfg: GPTConfig, batch_size: int, activation_checkpointing: bool = False
) -> int:
    """What the forward pass of ``batch_size`` full windows saves, in float32 with the eager (or
    fused) attention core. With activation checkpointing a block keeps only its input."""
    d = cfg.emb_dim
    per_block = 4 * d if activation_checkpointing else block_activation_bytes(cfg)
    # After the blocks: the final LayerNorm (3 d and 1), the head's input (d), the
    # log-probabilities the loss saves (vocab_size); dropout's mask on the embeddings (d).
    after = 4 * (4 * d + 1 + cfg.vocab_size + (d if cfg.drop_rate > 0 else 0))
    return batch_size * cfg.context_length * (cfg.n_layers * per_block + after)


def training_memory(
    cfg: GPTConfig, batch_size: int, activation_checkpointing: bool = False
) -> MemoryEstimate:
    """The memory of one float32 training step with AdamW on ``batch_size`` full windows."""
    weights = 4 * parameter_count(cfg)
    tokens = batch_size * cfg.context_length
    return MemoryEstimate(
        weights=weights,
        gradients=weights,
        optimizer=2 * weights,
        activations=activation_bytes(cfg, batch_size, activation_checkpointing),
        logits_grads=2 * 4 * tokens * cfg.vocab_size,
        recomputed=tokens * block_activation_bytes(cfg) if activation_checkpointing else 0,
    )


# --8<-- [end:memory]


# --8<-- [start:peak_memory]
class PeakMemory(TorchDispatchMode):
    """The most tensor memory alive at any moment while it is active, above what was alive before:
    ``with PeakMemory() as m: step()``, then ``m.peak`` in bytes.

    On a GPU, ``torch.cuda.max_memory_allocated`` answers this; on a CPU nothing does, so this
    watches like ``tracemalloc``: every operation's outputs pass through ``__torch_dispatch__``, a
    storage that is new (not one of the operation's inputs: not a view, not in place) is counted
    when it appears, and uncounted when Python tells us it died (``weakref.finalize``). Buffers an
    operation allocates and frees inside itself are not seen."""

    def __enter__(self):
        self.now = self.peak = 0
        self._seen = set()  # ids of counted storages; a storage keeps its Python object for life
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if _dense(t)}
        for t in tree_leaves(out):
            if not _dense(t):
                continue
            storage = t.untyped_storage()
            if id(storage) not in inputs and id(storage) not in self._seen:
                self._seen.add(id(storage))
                self.now += storage.nbytes()
                weakref.finalize(storage, self._free, id(storage), storage.nbytes())
        self.peak = max(self.peak, self.now)
        return out

    def _free(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.now -= nbytes


def _dense(t) -> bool:
    return isinstance(t, torch.Tensor) and t.layout == torch.strided and t.device.type != "meta"


# --8<-- [end:peak_memory]


# --8<-- [start:peak_flops]
def device_name(device: torch.device) -> str:
    """The device as the cache knows it: a GPU's model, or the CPU's, its vector unit and threads."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return f"Apple GPU (MPS) of {platform.processor() or platform.machine()}"
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):  # Linux: platform.processor() is often empty there
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), cpu)  # fmt: skip
    capability = torch.backends.cpu.get_cpu_capability()
    return f"{cpu} ({capability}, {torch.get_num_threads()} threads)"


def peak_matmul_flops(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matrix multiply on ``device`` in ``dtype``: the best of several,
    measured once and kept in the cache (``peak-matmul.json``), keyed by device, dtype and torch.

    MFU against this number says how close a run comes to what the same library can do on the same
    machine; against a data sheet's peak, an untuned CPU would look worse than it is."""
    key = f"{device_name(device)}, {str(dtype).removeprefix('torch.')}, torch {torch.__version__}"
    path = cache_dir() / "peak-matmul.json"
    try:
        known = json.loads(path.read_text("utf-8")) if path.is_file() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        known = {}  # a damaged cache is measured again
    if isinstance(known, dict) and isinstance(known.get(key), (int, float)) and known[key] > 0:
        return float(known[key])
    rate = _measure_matmul(device, dtype)
    write_atomically(path, json.dumps((known if isinstance(known, dict) else {}) | {key: rate},
                                      indent=1))  # fmt: skip
    return rate


def _measure_matmul(device: torch.device, dtype: torch.dtype) -> float:
    n = 1024 if device.type == "cpu" else 8192  # big enough to be compute-bound, quick to time
    # A generator of its own: measuring the peak must not move the run's random numbers.
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=generator).to(device, dtype) for _ in range(2))
    threads = torch.get_num_threads()
    best = math.inf
    for _ in range(8):  # the fastest of eight; the first also warms up
        start, cpu_start = time.perf_counter(), time.process_time()
        a @ b
        synchronize(device)
        wall = time.perf_counter() - start
        # On a CPU shared with other work the clock also counts the time this process waited for a
        # core; its CPU time per thread does not. Both are bounds from below on the undisturbed
        # rate, so the better of the two is the peak: a busy machine must not lower it.
        busy = (time.process_time() - cpu_start) / threads if device.type == "cpu" else wall
        best = min(best, wall, busy)
    return 2 * n**3 / best


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work: a GPU returns from a call before it has done it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def mfu(tokens_per_sec: float, cfg: GPTConfig, peak_flops: float) -> float:
    """Model FLOPs utilisation: the FLOPs the model needs per second at this speed, over the peak.
    Recomputed activations (checkpointing) are work the model does not need, so they do not count."""
    return tokens_per_sec * training_flops_per_token(cfg) / peak_flops


# --8<-- [end:peak_flops]
