"""Break it, chapter "Fusing the softmax": skip the maximum; sum the denominator in bfloat16.

Neither needs the compiled kernel: both failures are properties of the arithmetic, shown here in
plain PyTorch on random scores.
"""

import torch

from benchmarks.harness import markdown_table


# --8<-- [start:no-max-subtraction]
def softmax_without_max(x: torch.Tensor) -> torch.Tensor:
    """e^x / sum(e^x) as written on paper: exponents as large as the scores themselves."""
    e = torch.exp(x)
    return e / e.sum(-1, keepdim=True)


# --8<-- [end:no-max-subtraction]


def no_max_subtraction(spreads: tuple[int, ...] = (1, 10, 50, 100, 1000)) -> str:
    """Softmax with and without subtracting the row maximum, as scores grow, in float32 and bf16."""
    torch.manual_seed(0)
    base = torch.randn(1024, 64)  # 1024 rows of 64 unit-variance scores
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for spread in spreads:
            x = (base * spread).to(dtype)
            reference = torch.softmax(x.double(), dim=-1)
            naive = softmax_without_max(x).double()
            stable = torch.softmax(x, dim=-1).double()  # subtracts the maximum first
            bad = ~torch.isfinite(naive).all(-1)
            rows.append([
                str(dtype).removeprefix("torch."),
                str(spread),
                f"{bad.float().mean():.0%}",
                f"{(naive - reference).abs().nan_to_num(nan=1.0).max():.1e}",
                f"{(stable - reference).abs().max():.1e}",
            ])  # fmt: skip
    header = ["dtype", "score std", "rows with inf/NaN, no max",
              "max error, no max (NaN counted as 1)", "max error, max subtracted"]  # fmt: skip
    return markdown_table(header, rows)


# --8<-- [start:narrow-accumulator]
def bf16_running_sum(e: torch.Tensor) -> torch.Tensor:
    """Each row of ``e`` summed one term at a time, the sum kept (and rounded) in bfloat16."""
    total = torch.zeros(e.shape[0], dtype=torch.bfloat16)
    for j in range(e.shape[1]):
        total = total + e[:, j]
    return total


# --8<-- [end:narrow-accumulator]


def narrow_accumulator(lengths: tuple[int, ...] = (64, 256, 1024, 4096)) -> str:
    """The softmax denominator summed in bfloat16 instead of float32, as rows grow."""
    torch.manual_seed(0)
    rows = []
    for T in lengths:
        x = torch.randn(64, T)  # 64 rows of unit-variance scores
        e = torch.exp(x - x.max(-1, keepdim=True).values).to(torch.bfloat16)
        wide = e.float().sum(-1)  # what the kernel does: widen, sum in float32
        narrow = bf16_running_sum(e)
        exact = e.double().sum(-1)
        rows.append([
            str(T),
            f"{((wide.double() - exact) / exact).abs().max():.1e}",
            f"{((narrow.double() - exact) / exact).abs().max():.1e}",
            f"{(exact / narrow.double()).sum().item() / 64:.3f}",
        ])  # fmt: skip
    header = ["T", "denominator error, float32 sum", "denominator error, bf16 sum",
              "mean sum of the bf16-normalised weights"]  # fmt: skip
    return markdown_table(header, rows)


EXPERIMENTS = {"no-max-subtraction": no_max_subtraction, "narrow-accumulator": narrow_accumulator}
