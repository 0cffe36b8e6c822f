"""How a model takes a step: the loss, the optimizer, the learning-rate schedule, the precision.

Pretraining (``src.train``), both finetuning commands and every experiment of the book improve a model
the same way: compute a cross-entropy loss, backpropagate, clip the gradient, step AdamW at the
learning rate the schedule gives for this step. This module holds those pieces, and
``optimizer_step``, the one place where they are put together, so that every loop in the project
takes exactly the same step.

- **Device and precision**: ``resolve_device`` and ``autocast``; bf16 autocast on CPU or GPU,
  fp16 (with a gradient scaler) on GPU only.
- **Loss**: ``cross_entropy`` over every position, and ``perplexity = exp(loss)``.
- **Optimizer**: ``adamw`` decays matrices (linear weights, embeddings) and leaves vectors
  (biases, LayerNorm scale and shift) alone; ``muon`` orthogonalises the updates of the blocks'
  matrices and steps the rest with AdamW.
- **Schedule**: ``Schedule``: linear warmup, then cosine decay to ``min_lr``.
- **The step**: ``optimizer_step``: accumulate, scale, unscale, clip, step, zero.
"""

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from src.errors import NonFiniteLossError, UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# --8<-- [start:device]
def resolve_device(name: str) -> torch.device:
    """``"auto"`` picks CUDA when present, else the CPU; asking for an absent device is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {name}: use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA was asked for, but no CUDA device is available")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name}: MPS was asked for, but it is not available")
    return device


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """Run the forward pass in lower precision where it is safe; the weights stay float32.

    bf16 has float32's exponent range, so it needs no loss scaling; fp16 does (see ``grad_scaler``)
    and is only offered on CUDA, where it is fast.
    """
    if dtype == "fp32":
        return contextlib.nullcontext()
    if dtype == "fp16" and device.type != "cuda":
        raise UserError("--dtype fp16 needs a CUDA device; use bf16 on the CPU")
    return torch.autocast(device_type=device.type, dtype=DTYPES[dtype])


def grad_scaler(device: torch.device, dtype: str) -> torch.amp.GradScaler:
    """Multiplies the loss before backward so that small fp16 gradients do not flush to zero."""
    return torch.amp.GradScaler(device.type, enabled=dtype == "fp16")


# --8<-- [end:device]


# --8<-- [start:loss]
def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean negative log-probability of each target token: logits (B, T, V), targets (B, T)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def perplexity(loss: float) -> float:
    """exp(loss): the number of tokens the model is, on average, as unsure as choosing among."""
    return math.exp(loss) if loss < 700 else math.inf


def check_finite(loss: torch.Tensor, step: int) -> None:
    if not torch.isfinite(loss):
        raise NonFiniteLossError(
            f"loss is {loss.item()} at step {step}; stopping (the last good checkpoint is kept)"
        )


# --8<-- [end:loss]


# --8<-- [start:optimizer]
def adamw(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only.

    Decay pulls weights towards zero, which limits how large the model's matrices can grow. Biases
    and LayerNorm's scale and shift are vectors that set offsets and scales; pulling them to zero
    fights their purpose (a LayerNorm scale of 0 silences its layer), so they are not decayed. The
    embeddings are matrices and are decayed like the linear layers.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # The fused kernel updates every parameter in one pass (CPU and CUDA): on the default CPU
    # model it makes the optimizer step about 7x faster than the per-parameter loop.
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, lr=lr, fused=fused)


# --8<-- [end:optimizer]


# --8<-- [start:muon]
def newton_schulz(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """``G`` with every singular value moved close to 1: about ``U V^T`` of its SVD ``U S V^T``,
    the semi-orthogonal matrix nearest to it, by five steps of an odd polynomial (Jordan et al.)."""
    a, b, c = 3.4445, -4.7750, 2.0315  # p(s) = a s + b s^3 + c s^5 pulls (0, 1] towards 1 fast
    X = G / (G.norm() + 1e-7)  # every singular value <= 1 (the Frobenius norm bounds them)
    wide = X.shape[0] <= X.shape[1]
    X = X if wide else X.T  # (rows <= cols): X X^T is the smaller square
    for _ in range(steps):
        A = X @ X.T  # U S^2 U^T
        X = a * X + (b * A + c * A @ A) @ X  # U p(S) V^T: p on every singular value at once
    return X if wide else X.T


class Muon(torch.optim.Optimizer):
    """Muon for the weight matrices of the blocks, AdamW for every other parameter.

    A group with ``muon=True`` steps by its momentum, orthogonalised: the update moves every
    direction of the matrix by the same amount, where the raw gradient of a transformer's matrix is
    dominated by a few. The update is scaled to an RMS of 0.2 (Liu et al., 2025), about AdamW's, so
    that one learning rate and one schedule serve both kinds of group. Weight decay is decoupled,
    as in AdamW, in both. The state holds tensors and numbers only: it saves and loads like AdamW's.
    """

    def __init__(self, params, lr: float, weight_decay: float = 0.0, momentum: float = 0.95,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):  # fmt: skip
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, betas=betas, eps=eps,
                        muon=False)  # fmt: skip
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            update = self._muon if group["muon"] else self._adamw
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.mul_(1 - group["lr"] * group["weight_decay"])  # decoupled decay
                p.add_(update(p, group), alpha=-group["lr"])

    def _muon(self, p: torch.Tensor, group: dict) -> torch.Tensor:
        state, mu = self.state[p], group["momentum"]
        buf = state.setdefault("momentum_buffer", torch.zeros_like(p))
        buf.mul_(mu).add_(p.grad)  # m = mu m + g
        nesterov = p.grad.add(buf, alpha=mu)  # g + mu m: the momentum one step ahead
        return newton_schulz(nesterov) * (0.2 * max(p.shape) ** 0.5)  # RMS 1/sqrt(max) -> 0.2

    def _adamw(self, p: torch.Tensor, group: dict) -> torch.Tensor:
        state, (beta1, beta2) = self.state[p], group["betas"]
        state["step"] = state.get("step", 0) + 1
        m = state.setdefault("exp_avg", torch.zeros_like(p))
        v = state.setdefault("exp_avg_sq", torch.zeros_like(p))
        m.lerp_(p.grad, 1 - beta1)  # m = beta1 m + (1 - beta1) g
        v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)  # v = beta2 v + (1 - beta2) g^2
        m_hat = m / (1 - beta1 ** state["step"])  # bias correction: m and v start at zero
        v_hat = v / (1 - beta2 ** state["step"])
        return m_hat / (v_hat.sqrt() + group["eps"])


def muon(model: nn.Module, lr: float, weight_decay: float) -> Muon:
    """Muon on the matrices of every linear layer but the output head; AdamW, with the same
    decay rule as ``adamw``, on the embeddings, the head and the vectors.

    The embeddings and the head are matrices too, but not maps between hidden states: a row of the
    embedding is looked up, not multiplied, and the head's rows are scored one token each."""
    matrices = [m.weight for m in model.modules()
                if isinstance(m, nn.Linear) and m is not model.out_head and m.weight.requires_grad]  # fmt: skip
    chosen = {id(p) for p in matrices}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in chosen]
    groups = [
        {"params": matrices, "weight_decay": weight_decay, "muon": True},
        {"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
    ]
    return Muon(groups, lr=lr)


OPTIMIZERS = {"adamw": adamw, "muon": muon}


# --8<-- [end:muon]


# --8<-- [start:schedule]
@dataclass(frozen=True)
class Schedule:
    """The learning rate of every optimizer step: warmup, then a half cosine down to ``min_lr``.

    Warmup raises the rate linearly from ``lr / warmup_steps`` to ``lr``: at the start Adam's
    moment estimates are poor and large steps would throw the fresh weights around. After warmup a
    half cosine lowers it to ``min_lr`` at ``max_steps``: large steps explore early, small steps
    settle late. ``min_lr == lr`` with no warmup is a constant rate.
    """

    lr: float
    min_lr: float
    warmup_steps: int
    max_steps: int

    def __post_init__(self):
        # A negative rate is gradient ascent and a NaN one poisons every weight: both run "fine".
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise UserError(f"the learning rate must be a positive number, got {self.lr}")
        if not (math.isfinite(self.min_lr) and 0 <= self.min_lr <= self.lr):
            raise UserError(f"min_lr must be between 0 and lr = {self.lr}, got {self.min_lr}")
        if self.warmup_steps < 0 or self.max_steps < 1:
            raise UserError(f"warmup_steps must be >= 0 and max_steps >= 1, got "
                            f"{self.warmup_steps} and {self.max_steps}")  # fmt: skip

    def __call__(self, step: int) -> float:
        """The rate for optimizer step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if step >= self.max_steps:
            return self.min_lr
        progress = (step - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps)  # 0 -> 1
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))


# --8<-- [end:schedule]


# --8<-- [start:step]
def optimizer_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: Sequence,
    loss_fn: Callable[[object], torch.Tensor],
    step: int,
    grad_clip: float = 1.0,
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[float, float]:
    """One update from a batch split into micro-batches. Returns (mean loss, gradient norm).

    ``loss_fn(micro_batch)`` is the mean loss of one micro-batch. Each is divided by their number
    before its backward pass, so the gradients add up to the gradient of the mean. Under DDP the
    gradients are averaged across processes during the last backward only. The loss is checked
    before the update, so a non-finite loss leaves the weights as they were. ``grad_clip`` 0 is no
    clipping; the norm is measured either way.
    """
    scaler = scaler or torch.amp.GradScaler(enabled=False)  # a no-op unless fp16
    distributed = isinstance(model, DistributedDataParallel)
    total = 0.0
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with contextlib.nullcontext() if last or not distributed else model.no_sync():
            loss = loss_fn(batch)
            scaler.scale(loss / len(micro_batches)).backward()
        total = total + loss.detach()
    loss = total / len(micro_batches)
    if distributed:
        dist.all_reduce(loss)  # summed over processes (gloo has no average)
        loss /= dist.get_world_size()  # the loss of the global batch
    check_finite(loss, step)
    scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss.item(), grad_norm.item()


# --8<-- [end:step]
