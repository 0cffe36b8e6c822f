"""The checker: run the reader's functions on chosen cases and say, precisely, where they go wrong.

Every exercise names a function the reader writes in ``exercises/CHAPTER.py``, a *reference* that
computes the right answer (PyTorch itself, or the project's own code in ``src/``, written and tested
independently of the exercise's answer), and its cases: random ones, and hand-picked ones that catch
the usual mistakes (an off-by-one mask, a biased variance, an overlapping merge). A case passes when
the reader's output equals the reference's, exactly for integers and lists, within a stated tolerance
for floating point. The first failing case of an exercise is printed in full: the inputs (their shapes,
and the values when they are small), what was expected and what came back, the largest difference, and
a hint.
"""

import argparse
import copy
import importlib
import importlib.util
import inspect
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
CHAPTERS = ("tokens", "batches", "attention", "fused-softmax", "flash-attention", "model",
            "pretraining", "compute", "generating", "gpt2-weights", "modern", "classification",
            "instructions", "lora", "scaling-out", "small-and-fast")  # fmt: skip


# --8<-- [start:exercise]
@dataclass(frozen=True)
class Case:
    """One call of the function under test: a label that says what the case is for, and its inputs."""

    label: str
    args: tuple
    kwargs: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Exercise:
    """A function to write, what it must equal, and on which inputs."""

    name: str  # the function's name in exercises/CHAPTER.py
    summary: str  # one line, for --list
    reference: Callable  # computes the right answer
    cases: Callable[[torch.Generator], Sequence[Case]]  # random and hand-picked inputs
    hint: str  # what the usual mistake is, and how to find it
    atol: float = 1e-5  # floating point: |got - expected| <= atol + rtol * |expected|
    rtol: float = 1e-5


# --8<-- [end:exercise]


def solutions(chapter: str):
    """Our answers and the chapter's exercises: ``exercises/solutions/CHAPTER.py``."""
    return importlib.import_module(f"exercises.solutions.{chapter.replace('-', '_')}")


def load_file(path: Path):
    """The reader's module, loaded from its file (so ``--file`` can point anywhere)."""
    spec = importlib.util.spec_from_file_location(f"reader_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --8<-- [start:compare]
def difference(expected, got, atol: float, rtol: float) -> str | None:
    """None when ``got`` equals ``expected``; otherwise what differs, in a few words."""
    if isinstance(expected, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            return f"expected a tensor, got {type(got).__name__}"
        if got.shape != expected.shape:
            return f"expected shape {tuple(expected.shape)}, got {tuple(got.shape)}"
        if expected.is_floating_point() != got.is_floating_point():
            return f"expected dtype {expected.dtype}, got {got.dtype}"
        if not expected.is_floating_point():
            return None if torch.equal(got, expected) else "the values differ"
        e, g = expected.double(), got.double()
        if not torch.equal(torch.isinf(e) & (e < 0), torch.isinf(g) & (g < 0)):
            return "the -inf entries are not where they should be"
        finite = torch.isfinite(e)
        if not torch.isfinite(g[finite]).all():
            return "got NaN or inf where a number was expected"
        gap = (e[finite] - g[finite]).abs()
        worst = gap.max().item() if gap.numel() else 0.0
        allowed = atol + rtol * e[finite].abs()
        if gap.numel() and (gap > allowed).any():
            return (
                f"the largest difference is {worst:.3g} (allowed: {atol:g} + {rtol:g} x |expected|)"
            )
        return None
    if isinstance(expected, (tuple, list)) and not isinstance(got, (tuple, list, torch.Tensor)):
        return f"expected a {type(expected).__name__}, got {type(got).__name__}"
    if isinstance(expected, tuple) and expected and isinstance(expected[0], torch.Tensor):
        if len(got) != len(expected):
            return f"expected {len(expected)} results, got {len(got)}"
        for i, (e, g) in enumerate(zip(expected, got, strict=True)):
            if (why := difference(e, g, atol, rtol)) is not None:
                return f"result {i}: {why}"
        return None
    if isinstance(expected, float) and isinstance(got, (int, float)):
        return None if abs(got - expected) <= atol + rtol * abs(expected) else "the values differ"
    return None if got == expected else "the values differ"


# --8<-- [end:compare]


def show(value) -> str:
    """A value as a reader wants to see it: small tensors in full, large ones by shape."""
    if isinstance(value, torch.Tensor):
        kind = f"tensor of shape {tuple(value.shape)}, {str(value.dtype).removeprefix('torch.')}"
        if value.numel() <= 24:
            return f"{kind}: {_rounded(value.tolist())}"
        return kind
    if isinstance(value, (list, tuple)) and len(value) > 24:
        return f"{type(value).__name__} of {len(value)}: {list(value[:12])} ..."
    if isinstance(value, dict) and len(value) > 8:
        return f"dict of {len(value)} entries: {dict(list(value.items())[:6])} ..."
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return "(" + ", ".join(show(v) for v in value) + ")"
    return repr(value)


# --8<-- [start:check]
def check(exercise: Exercise, function: Callable | None) -> list[str]:
    """Run ``function`` on every case; [] when it passes, else the lines that describe the failure."""
    if function is None:
        return [f"  there is no function {exercise.name}() in the file"]
    generator = torch.Generator().manual_seed(0)
    cases = list(exercise.cases(generator))
    for number, case in enumerate(cases, start=1):
        expected = exercise.reference(*copy.deepcopy(case.args), **copy.deepcopy(case.kwargs))
        names = _parameter_names(function, len(case.args))
        inputs = [f"{n} = {show(a)}" for n, a in zip(names, case.args, strict=True)]
        inputs += [f"{k} = {show(v)}" for k, v in case.kwargs.items()]
        head = [f"  case {number} of {len(cases)}: {case.label}", *(f"    {i}" for i in inputs)]
        try:
            got = function(*copy.deepcopy(case.args), **copy.deepcopy(case.kwargs))
        except NotImplementedError:
            return [f"  not written yet: {exercise.name}() raises NotImplementedError"]
        except Exception as err:  # noqa: BLE001 (the reader's code: any error is worth showing)
            return [*head, f"    raised {type(err).__name__}: {err} ({_where(err, function)})",
                    f"  hint: {exercise.hint}"]  # fmt: skip
        why = difference(expected, got, exercise.atol, exercise.rtol)
        if why is not None:
            return [*head, f"    expected: {show(expected)}", f"    got:      {show(got)}",
                    f"    {why}", f"  hint: {exercise.hint}"]  # fmt: skip
    return []


# --8<-- [end:check]


def _where(err: Exception, function: Callable) -> str:
    """Where an error was raised: the line in the reader's file, or the file and line beyond it."""
    frames = traceback.extract_tb(err.__traceback__)
    mine = inspect.getsourcefile(inspect.unwrap(function))
    last_mine = [f for f in frames if f.filename == mine]
    at = frames[-1]
    if at.filename == mine or not last_mine:
        return f"line {at.lineno}"
    return f"line {last_mine[-1].lineno}, in a call that failed in {Path(at.filename).name} line {at.lineno}"


def _rounded(values):
    """Nested lists of numbers with floats cut to 4 significant digits, for reading."""
    if isinstance(values, list):
        return [_rounded(v) for v in values]
    return float(f"{values:.4g}") if isinstance(values, float) else values


def _parameter_names(function: Callable, n: int) -> list[str]:
    try:
        names = list(inspect.signature(function).parameters)[:n]
    except (TypeError, ValueError):  # a builtin without a signature
        names = []
    return names + [f"argument {i + 1}" for i in range(len(names), n)]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m exercises",
        description="Check your answers to a chapter's exercises (written in exercises/CHAPTER.py).",
    )
    p.add_argument("chapter", nargs="?", choices=CHAPTERS, metavar="CHAPTER",
                   help=f"one of: {', '.join(CHAPTERS)}")  # fmt: skip
    p.add_argument("--file", type=Path, help="check this file instead of exercises/CHAPTER.py")
    p.add_argument("--only", metavar="NAME", help="check only this exercise")
    p.add_argument("--answers", action="store_true", help="check the book's answers instead")
    p.add_argument("--list", action="store_true", help="list the exercises, one line each")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    chapters = [args.chapter] if args.chapter else list(CHAPTERS)
    if args.list:
        for chapter in chapters:
            for ex in solutions(chapter).EXERCISES:
                print(f"{chapter}.{ex.name}: {ex.summary}")
        return 0
    if args.chapter is None:
        print("error: name a chapter (or --list); e.g. python -m exercises tokens", file=sys.stderr)
        return 2
    return run_chapter(args)


def run_chapter(args) -> int:
    """Check one chapter's exercises; exit code 0 only when every one that was checked passes."""
    chapter = args.chapter
    exercises = solutions(chapter).EXERCISES
    if args.only is not None:
        exercises = [ex for ex in exercises if ex.name == args.only]
        if not exercises:
            names = ", ".join(ex.name for ex in solutions(chapter).EXERCISES)
            print(
                f"error: {chapter} has no exercise {args.only!r}; it has {names}", file=sys.stderr
            )
            return 2
    if args.answers and args.file:
        print("error: give --file or --answers, not both", file=sys.stderr)
        return 2
    if args.answers:
        module = solutions(chapter)
    else:
        path = args.file or HERE / f"{chapter.replace('-', '_')}.py"
        if not path.is_file():
            print(f"error: {path}: no such file", file=sys.stderr)
            return 2
        try:
            module = load_file(path)
        except Exception as err:  # noqa: BLE001 (a syntax error in the reader's file, say)
            line = (
                getattr(err, "lineno", None) or traceback.extract_tb(err.__traceback__)[-1].lineno
            )
            print(f"{path} does not load: {type(err).__name__}: {err} (line {line})")
            return 1
    passed = 0
    for ex in exercises:
        lines = check(ex, getattr(module, ex.name, None))
        print(f"{chapter}.{ex.name}: {'FAILED' if lines else 'ok'}")
        for line in lines:
            print(line)
        passed += not lines
    print(f"{chapter}: {passed} of {len(exercises)} exercises pass")
    return 0 if passed == len(exercises) else 1
