"""The "Run it" outputs in the book are what ``book/run_it.py`` prints today.

Each chapter is regenerated into a temporary folder and compared with the committed file, so a change
to the code that changes what a reader would see fails here until the page is regenerated with
``uv run python book/run_it.py CHAPTER``.

The comparison is exact for the words and the layout, and within a stated tolerance for the numbers:
CPUs with and without AVX-512 (and different BLAS kernels on the same width) add in different
orders, so the last digits of a computed number are not portable. ``test_tolerance_*`` check the
checker: a number moved within the tolerance passes, one moved past it fails.
"""

import importlib.util
import itertools
import re
from dataclasses import dataclass

import pytest
from conftest import REPO

from src import fused_softmax
from src.data import load_corpus

spec = importlib.util.spec_from_file_location("run_it", REPO / "book" / "run_it.py")
run_it = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run_it)

NOT_COMPARED = {
    # Slow: three Python processes start (two of them under torchrun), 20-40 s on two cores. The
    # equality its output shows, two processes training as one, is required by
    # tests/test_train.py::test_ddp_two_processes_match_one.
    "scaling-out": "slow (three Python processes); its claim is tested by test_train.py's DDP test",
    # Needs the default run's checkpoint (minutes of training); the streaming it shows is tested by
    # tests/test_generate.py's command-line tests on a small checkpoint they train.
    "generating": "needs runs/default, the default training run's checkpoint",
    # Needs runs/default and its draft run; what it shows (the same greedy text with and without
    # the draft, int4 weights from the command line) is tested by tests/test_generate.py and
    # tests/test_quantize.py on small models.
    "small-and-fast": "needs runs/default and runs/draft, two training runs' checkpoints",
    # Two finetuning runs on the real instruction data, about 13 minutes; the path it exercises is
    # tested on synthetic data by tests/test_instruct.py.
    "instructions": "about 13 minutes of finetuning on the reference data",
}


@dataclass(frozen=True)
class Tolerance:
    """How far a regenerated number may be from the committed one.

    ``last_digits``: units of the last printed digit (a sum in another order can round the other
    way). ``fraction``: an absolute amount for numbers printed with a decimal point. ``count``: for
    integers. ``tiny``: numbers in scientific notation are the sizes of rounding errors, which
    differ from CPU to CPU; both must be below ``tiny``.
    """

    last_digits: int = 1
    fraction: float = 0.0
    count: int = 0
    tiny: float = 1e-5
    reason: str = "a different summation order can move the last printed digit by one"


TOLERANCE = {
    # A 108-step training run: the decaying learning rate makes it settle, so on every CPU tried
    # (AVX-512, and AVX2 and scalar code forced with ATEN_CPU_CAPABILITY) the tables agreed and the
    # probabilities differed in the third decimal. Allow two of the 80 validation texts to flip
    # (0.025 of accuracy, two counts in a confusion matrix) and probabilities to move by 0.03.
    "classification": Tolerance(
        fraction=0.03, count=2, reason="a short training run amplifies the summation order"
    ),
}

NUMBER = re.compile(r"(?<![\w.])[-+]?\d[\d,]*(?:\.\d+)?(?:e[-+]?\d+)?(?!\w)")


def allowed(number: str, tol: Tolerance) -> float | None:
    """How far the number written ``number`` may move; None for a rounding error's size."""
    if "e" in number.lower():
        return None
    decimals = len(number.partition(".")[2])
    if decimals:
        return max(tol.last_digits * 10.0**-decimals, tol.fraction)
    return float(tol.count)


def differences(committed: str, fresh: str, tol: Tolerance) -> list[str]:
    """Where ``fresh`` differs from ``committed`` by more than ``tol``: the words and the layout
    exactly (a run of spaces counts as one), every number within the tolerance."""
    shapes = [
        re.sub(r"[ \t]+", " ", NUMBER.sub("#", text)).splitlines() for text in (committed, fresh)
    ]
    for i, (a, b) in enumerate(itertools.zip_longest(*shapes, fillvalue="<no line>")):
        if a != b:
            return [f"line {i + 1} reads {b!r} instead of {a!r}"]
    found = []
    for a, b in zip(NUMBER.findall(committed), NUMBER.findall(fresh), strict=True):
        x, y = (float(s.replace(",", "")) for s in (a, b))
        limit = allowed(a, tol)
        if limit is None:  # both tiny, or the same number (a learning rate such as 3e-3)
            ok = x == y or max(abs(x), abs(y)) < tol.tiny
        else:
            ok = abs(x - y) <= limit * (1 + 1e-9)
        if not ok:
            found.append(f"{a} -> {b}")
    return found


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(
    "chapter",
    [
        pytest.param(c, marks=pytest.mark.slow) if c == "classification" else c
        for c in run_it.CHAPTERS
    ],
)
def test_committed_output_is_what_the_script_prints(chapter, tmp_path):
    if chapter in NOT_COMPARED:
        pytest.skip(NOT_COMPARED[chapter])
    committed = (run_it.OUT / f"{chapter}.md").read_text()
    if "sha256 " in committed and load_corpus().fingerprint[:16] not in committed:
        pytest.skip(
            "the default corpus is this Python's own documentation, and it differs from the "
            "Python's that made the committed output"
        )
    if (
        chapter in ("attention", "flash-attention")
        and fused_softmax.unavailable_reason() is not None
    ):
        pytest.skip("our kernels cannot be built here; the committed output shows them running")
    run_it.write(chapter, tmp_path)
    tol = TOLERANCE.get(chapter, Tolerance())
    found = differences(committed, (tmp_path / f"{chapter}.md").read_text(), tol)
    assert not found, (
        f"the code now prints something else ({tol.reason} is allowed): {found[:5]}; "
        f"regenerate with uv run python book/run_it.py {chapter}"
    )


@pytest.mark.parametrize("chapter", list(run_it.CHAPTERS))
def test_every_output_is_on_its_page(chapter):
    page = (REPO / "docs" / f"{chapter}.md").read_text()
    assert f'--8<-- "docs/assets/run-it/{chapter}.md"' in page


# --- the checker checked ---------------------------------------------------------------------


def moved(number: str, tol: Tolerance, past: bool) -> str:
    """``number`` moved to the edge of its tolerance, or one printed unit past it."""
    x = float(number.replace(",", ""))
    limit = allowed(number, tol)
    if limit is None and abs(x) < tol.tiny:  # a rounding error's size: anywhere below tiny
        return f"{tol.tiny * 10:.1e}" if past else f"{tol.tiny / 2:.1e}"
    if limit is None:  # a setting written in scientific notation, such as 3e-3: exact
        return f"{x * 10:g}" if past else number
    decimals = len(number.partition(".")[2])
    y = x + limit + (10.0**-decimals if past else 0.0)
    if decimals:
        return f"{y:.{decimals}f}"
    return f"{round(y):,}" if "," in number else str(round(y))


@pytest.mark.parametrize("chapter", list(run_it.CHAPTERS))
def test_tolerance_passes_numbers_within_it_and_fails_past_it(chapter):
    committed = (run_it.OUT / f"{chapter}.md").read_text()
    tol = TOLERANCE.get(chapter, Tolerance())
    numbers = list(NUMBER.finditer(committed))
    assert numbers, "a committed output with no numbers checks nothing here"
    within = NUMBER.sub(lambda m: moved(m.group(), tol, past=False), committed)
    assert differences(committed, within, tol) == []
    for m in numbers:  # every number, one at a time, moved past its tolerance is caught
        past = committed[: m.start()] + moved(m.group(), tol, past=True) + committed[m.end() :]
        assert differences(committed, past, tol), f"{m.group()} moved past {tol} was not caught"
    assert differences(committed, committed.replace("\n", "\nextra line\n", 1), tol)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("capability", ["avx2", "default"])
def test_the_training_run_holds_with_other_vector_kernels(capability, tmp_path, monkeypatch):
    """The book's one training snapshot, regenerated with PyTorch's AVX2 or scalar kernels and
    MKL held to AVX2: what a CPU without AVX-512 computes, on this one."""
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", capability)
    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "AVX2")
    run_it.write("classification", tmp_path)
    committed = (run_it.OUT / "classification.md").read_text()
    fresh = (tmp_path / "classification.md").read_text()
    assert differences(committed, fresh, TOLERANCE["classification"]) == []
