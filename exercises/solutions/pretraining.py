"""Pretraining: the answers, and the cases each one is checked on.

References: ``cross_entropy`` against ``F.cross_entropy`` in float64; ``lr_at`` against the
project's ``src.training.Schedule``; ``clip_grad_norm`` against PyTorch's
``nn.utils.clip_grad_norm_``, in float64.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from exercises.checker import Case, Exercise
from src.training import Schedule


# --8<-- [start:cross_entropy]
def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    shifted = logits - logits.max(dim=-1, keepdim=True).values  # every exponent <= 0: no overflow
    log_probs = shifted - shifted.exp().sum(dim=-1, keepdim=True).log()  # log-softmax, (N, V)
    return -log_probs[torch.arange(len(targets)), targets].mean()  # each row's target, averaged


# --8<-- [end:cross_entropy]


# --8<-- [start:lr_at]
def lr_at(step: int, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)  # 0 -> 1
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


# --8<-- [end:lr_at]


# --8<-- [start:clip_grad_norm]
def clip_grad_norm(grads: tuple[torch.Tensor, ...], max_norm: float) -> tuple[torch.Tensor, ...]:
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))  # of all of them together
    factor = min(1.0, max_norm / (norm.item() + 1e-6))  # never more than 1: short ones stay
    return tuple(g * factor for g in grads)


# --8<-- [end:clip_grad_norm]


def _cross_entropy_float64(logits, targets):
    return F.cross_entropy(logits.double(), targets).to(logits.dtype)


def _schedule(step, lr, min_lr, warmup_steps, max_steps):
    return Schedule(lr, min_lr, warmup_steps, max_steps)(step)


def _clip_by_pytorch(grads, max_norm):
    params = [nn.Parameter(torch.zeros_like(g, dtype=torch.float64)) for g in grads]
    for p, g in zip(params, grads, strict=True):
        p.grad = g.double()
    nn.utils.clip_grad_norm_(params, max_norm)
    return tuple(p.grad.to(g.dtype) for p, g in zip(params, grads, strict=True))


def _t(values):
    return torch.tensor(values, dtype=torch.float32)


def _cross_entropy_cases(g):
    return [
        Case("two rows, three classes: each row is scored at its own target",
             (_t([[2.0, 1.0, 0.1], [0.5, 2.5, 0.0]]), torch.tensor([0, 2]))),
        Case("logits of 1000: exp(1000) is inf in float32, and log(softmax) of a target 1000 below "
             "the best is log(0) = -inf",
             (_t([[1000.0, 0.0, -5.0], [0.0, 1000.0, 999.0]]), torch.tensor([1, 2]))),
        Case("very negative logits: exp(-1000) is 0, and the log of 0 is -inf",
             (_t([[-1000.0, -1002.0, -1001.0]]), torch.tensor([1]))),
        Case("the mean over rows, not the sum: 8 identical rows", (torch.zeros(8, 5), torch.arange(8) % 5)),
        Case("random, a vocabulary of 1000", (torch.randn(16, 1000, generator=g) * 3,
             torch.randint(0, 1000, (16,), generator=g))),
    ]  # fmt: skip


def _lr_cases(g):
    steps = [
        (0, "step 0 of a 10-step warmup: lr / 10, not 0 (a step at rate 0 is wasted)"),
        (4, "step 4 of the warmup: lr * 5 / 10"),
        (9, "the last warmup step reaches lr"),
        (10, "the first step after warmup: the cosine starts at lr"),
        (55, "halfway through the decay: the cosine is at the middle, (lr + min_lr) / 2"),
        (99, "the last step before max_steps: just above min_lr"),
        (100, "max_steps: min_lr"),
        (250, "past max_steps: min_lr stays"),
    ]
    cases = [Case(label, (step, 6e-4, 6e-5, 10, 100)) for step, label in steps]
    return [
        *cases,
        Case("no warmup: step 0 is lr", (0, 1e-3, 0.0, 0, 50)),
        Case("no warmup, halfway", (25, 1e-3, 0.0, 0, 50)),
    ]


def _clip_cases(g):
    return [
        Case("two gradients of norm 3 and 4: the total norm is 5, so both shrink by 1/5 (not each "
             "to norm 1)", ((_t([3.0, 0.0]), _t([0.0, 4.0])), 1.0)),
        Case("a total norm below max_norm: the gradients stay as they are, never scaled up",
             ((_t([0.3, -0.4]),), 1.0)),
        Case("gradients of zeros stay zeros", ((torch.zeros(3), torch.zeros(2, 2)), 1.0)),
        Case("random gradients of a small model", ((torch.randn(8, 4, generator=g), torch.randn(4, generator=g),
             torch.randn(4, 8, generator=g)), 0.5)),
    ]  # fmt: skip


EXERCISES = [
    Exercise(
        "cross_entropy", "mean negative log-likelihood, from a numerically stable log-softmax",
        reference=_cross_entropy_float64, cases=_cross_entropy_cases,
        hint="log_softmax(x) = (x - m) - log(sum(exp(x - m))) with m the row's maximum: never "
        "log(softmax(x)), never exp(x) unshifted; pick each row's target with "
        "log_probs[arange(N), targets], then the mean",
    ),
    Exercise(
        "lr_at", "the learning rate of a step: linear warmup, then a half cosine to min_lr",
        reference=_schedule, cases=_lr_cases, atol=1e-12, rtol=1e-9,
        hint="warmup uses (step + 1) / warmup_steps, so step 0 already moves; the cosine's "
        "progress runs from 0 at warmup_steps to 1 at max_steps, and 0.5 * (1 + cos(pi * p)) "
        "goes from 1 to 0",
    ),
    Exercise(
        "clip_grad_norm", "scale all gradients by one factor so that their total norm is at most max_norm",
        reference=_clip_by_pytorch, cases=_clip_cases,
        hint="one norm over all gradients, sqrt(sum of every squared entry), and one factor "
        "min(1, max_norm / (norm + 1e-6)) for all of them; clipping each on its own changes the "
        "direction",
    ),
]  # fmt: skip
