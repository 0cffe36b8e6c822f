"""Compute and scaling laws: the answers, and the cases each one is checked on.

References: ``flops_per_token`` against ``FlopCounterMode`` on a real forward and backward pass of
``GPTModel`` (on the meta device: shapes, no arithmetic); ``newton_schulz`` against the project's
``src.training.newton_schulz`` (itself tested against the SVD in ``tests/test_training.py``);
``optimal_size`` against a numerical search for the lowest loss along ``C = 6 N D``.
"""

import math

import torch
from torch.utils.flop_counter import FlopCounterMode

from exercises.checker import Case, Exercise
from src.model import GPTConfig, GPTModel
from src.training import cross_entropy
from src.training import newton_schulz as project_newton_schulz


# --8<-- [start:flops_per_token]
def flops_per_token(n_layers: int, emb_dim: int, context_length: int, vocab_size: int) -> int:
    d, T, V = emb_dim, context_length, vocab_size
    # the projections, the feed-forward layers, q k^T and weights @ v
    block = 4 * 2 * d * d + 2 * 2 * d * 4 * d + 2 * 2 * T * d
    forward = n_layers * block + 2 * d * V  # and the head
    return 3 * forward  # backward: two multiplies of the same size for each forward one


# --8<-- [end:flops_per_token]


# --8<-- [start:newton_schulz]
def newton_schulz(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G / (G.norm() + 1e-7)  # the Frobenius norm bounds every singular value: all <= 1
    wide = X.shape[0] <= X.shape[1]
    X = X if wide else X.T  # X X^T is then the smaller square
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X  # the odd polynomial on every singular value
    return X if wide else X.T


# --8<-- [end:newton_schulz]


# --8<-- [start:optimal_size]
def optimal_size(C: float, E: float, A: float, B: float, alpha: float, beta: float) -> float:
    # L(N) = E + A N^-alpha + B (6N / C)^beta; dL/dN = 0 gives alpha A N^-alpha = beta B (6N/C)^beta
    G = (alpha * A / (beta * B)) ** (1 / (alpha + beta))
    N = G * (C / 6) ** (beta / (alpha + beta))
    return N  # and D_opt = C / (6 N)


# --8<-- [end:optimal_size]


def _counted(n_layers, emb_dim, context_length, vocab_size):
    cfg = GPTConfig(vocab_size=vocab_size, context_length=context_length, emb_dim=emb_dim,
                    n_heads=2, n_layers=n_layers, drop_rate=0.0)  # fmt: skip
    with torch.device("meta"):
        model = GPTModel(cfg)
        idx = torch.zeros(1, context_length, dtype=torch.long)
    counter = FlopCounterMode(display=False)
    with counter:
        cross_entropy(model(idx), idx).backward()
    return counter.get_total_flops() // context_length


def _searched(C, E, A, B, alpha, beta):
    """The lowest loss along C = 6 N D, found numerically: bisection in log N on the sign of the
    slope dL/dlog N = -alpha A / N^alpha + beta B / D^beta (no closed form)."""
    lo, hi = 0.0, math.log(C / 6)  # from N = 1 to D = 1
    for _ in range(200):
        mid = (lo + hi) / 2
        n = math.exp(mid)
        slope = -alpha * A / n**alpha + beta * B / (C / (6 * n)) ** beta
        lo, hi = (mid, hi) if slope < 0 else (lo, mid)
    return math.exp((lo + hi) / 2)


def _flops_cases(g):
    return [
        Case("the tiny preset: 2 layers, emb_dim 64, context 64, 1,024 tokens", (2, 64, 64, 1024)),
        Case("one layer, a context longer than the width: attention's 4 T d per layer matters",
             (1, 32, 512, 256)),
        Case("the default run's model: cpu-small", (4, 256, 256, 8192)),
        Case("GPT-2 small's shape", (12, 768, 1024, 50257)),
    ]  # fmt: skip


def _ns_cases(g):
    return [
        Case("a wide matrix (rows < cols)", (torch.randn(4, 16, generator=g),)),
        Case("a tall matrix: transposed, iterated, transposed back", (torch.randn(24, 6, generator=g),)),
        Case("large entries: without dividing by the norm first, the polynomial explodes",
             (torch.randn(8, 8, generator=g) * 100,)),
        Case("one step instead of five", (torch.randn(5, 7, generator=g),), {"steps": 1}),
    ]  # fmt: skip


def _optimal_cases(g):
    chinchilla = (1.69, 406.4, 410.7, 0.34, 0.28)
    return [
        Case("Chinchilla's fit at 5.76e23 FLOPs (Chinchilla's own budget)", (5.76e23, *chinchilla)),
        Case("Chinchilla's fit at 1e18 FLOPs", (1e18, *chinchilla)),
        Case("alpha > beta: more of the budget goes to data", (1e15, 2.0, 100.0, 300.0, 0.5, 0.25)),
        Case("alpha = beta, A = B: N_opt = D_opt", (6e12, 1.0, 50.0, 50.0, 0.3, 0.3)),
    ]  # fmt: skip


EXERCISES = [
    Exercise(
        "flops_per_token", "training FLOPs per token of a full window, counted like FlopCounterMode",
        reference=_counted, cases=_flops_cases,
        hint="forward per block: 4 projections of 2 d^2, feed-forward 2 x 2 d (4d), attention "
        "2 T d for q k^T and 2 T d for weights @ v; plus the head 2 d V; training is 3x the "
        "forward pass. 6N leaves out attention's 12 T d per layer",
    ),
    Exercise(
        "newton_schulz", "Muon's orthogonalisation: five Newton-Schulz steps of an odd polynomial",
        reference=project_newton_schulz, cases=_ns_cases, atol=1e-4, rtol=1e-4,
        hint="divide by G.norm() + 1e-7 before iterating, so that every singular value is at most "
        "1; A = X @ X.T, then X = a X + (b A + c A @ A) @ X; transpose a tall matrix first and back "
        "at the end",
    ),
    Exercise(
        "optimal_size", "N_opt of Chinchilla's law at a compute budget C = 6 N D",
        reference=_searched, cases=_optimal_cases, atol=0.0, rtol=1e-6,
        hint="G = (alpha A / (beta B))^(1 / (alpha + beta)), N_opt = G (C / 6)^a with "
        "a = beta / (alpha + beta): N grows with the data's exponent, not its own",
    ),
]  # fmt: skip
