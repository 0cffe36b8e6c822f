"""What every benchmark shares: one way to time candidates against each other, one way to write a table.

**Timing.** A benchmark compares candidates: the plain path against the fused one, the cache against
none. Absolute times on a shared machine move with the load, so a benchmark measures *ratios*, in one
process, with the candidates interleaved: each round calls every candidate once, in turn, and a burst
of load from another process slows them all alike. The first rounds warm up caches, the allocator and
lazy initialisation, and are not kept; of the rest, the median is reported, which one slow round
cannot move. On a GPU each call is timed with CUDA events, on the GPU's own clock, so the time is the
kernels' and not Python's waiting for them.

**Tables.** Every table the book includes from a script (benchmarks, "Break it" experiments, training
curves) is written by ``markdown_table``, so they all look alike in the Markdown source too.
"""

import statistics
import time
from collections.abc import Callable, Sequence

import torch


# --8<-- [start:median_times]
def median_times(
    candidates: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 2,
    device: str = "cpu",
    before_round: Callable[[], None] | None = None,
) -> dict[str, float]:
    """Median seconds per call of each candidate, over ``repeats`` rounds after ``warmup`` rounds.

    A round calls every candidate once, in the order given. ``before_round``, if given, runs before
    each round, untimed: to give every round a fresh object (a tokenizer with an empty cache).
    """
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for round_number in range(warmup + repeats):
        if before_round is not None:
            before_round()
        for name, call in candidates.items():
            seconds = _cuda_seconds(call) if device == "cuda" else _cpu_seconds(call)
            if round_number >= warmup:
                times[name].append(seconds)
    return {name: statistics.median(t) for name, t in times.items()}


def _cpu_seconds(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def _cuda_seconds(call: Callable[[], object]) -> float:
    torch.cuda.synchronize()  # nothing queued before the call is timed with it
    start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
    start.record()
    call()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3  # events count milliseconds


# --8<-- [end:median_times]


def markdown_table(
    header: Sequence[str], rows: Sequence[Sequence[object]], align: str | None = None
) -> str:
    """A Markdown table: ``header``, then one line per row. ``align`` has one letter per column,
    ``l`` or ``r`` (numbers read best right-aligned); every column is left-aligned by default."""
    align = align or "l" * len(header)
    if len(align) != len(header) or any(len(row) != len(header) for row in rows):
        raise ValueError(
            f"a table of {len(header)} columns needs as many in every row and in align"
        )
    rule = [{"l": "---", "r": "---:"}[a] for a in align]
    return "\n".join(_line(cells) for cells in (header, rule, *rows))


def _line(cells: Sequence[object]) -> str:
    return "|" + "|".join(f" {cell} " if str(cell) else " " for cell in cells) + "|"
