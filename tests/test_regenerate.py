"""``book/regenerate.py`` is the one command behind every generated file the book includes, and
``book/curves.py``, one of its steps, refuses a run it cannot draw without writing anything."""

import importlib.util
import re
import subprocess
import sys

import pytest
from conftest import REPO

spec = importlib.util.spec_from_file_location("regenerate", REPO / "book" / "regenerate.py")
regenerate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(regenerate)


def expand(pattern: str) -> list[str]:
    """``a.{json,md}`` -> ``a.json``, ``a.md``: the brace form the steps use to name their outputs."""
    braces = re.search(r"\{([^}]*)\}", pattern)
    if braces is None:
        return [pattern]
    return [pattern[: braces.start()] + option + pattern[braces.end() :]
            for option in braces[1].split(",")]  # fmt: skip


def test_every_asset_of_the_book_is_written_by_a_step():
    assets = REPO / "docs" / "assets"
    made = {p for step in regenerate.STEPS for pattern in expand(step.writes)
            for p in assets.glob(pattern)}  # fmt: skip
    orphans = sorted(str(p.relative_to(assets)) for p in assets.rglob("*") if p.is_file())
    orphans = [name for name in orphans if assets / name not in made]
    assert not orphans, f"no step of book/regenerate.py writes these: {orphans}"


def test_list_names_every_step_and_unknown_steps_are_refused():
    run = [sys.executable, "book/regenerate.py"]
    listed = subprocess.run([*run, "--list"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    for step in regenerate.STEPS:
        assert f"{step.name} (about" in listed.stdout
    wrong = subprocess.run([*run, "nope"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert wrong.returncode == 2 and "unknown step 'nope'" in wrong.stderr


@pytest.mark.parametrize("metrics", [None, "", '{"step": 0, "train_loss": 9.1}\n'])
def test_curves_of_a_run_without_evaluations_is_one_line_and_draws_nothing(metrics, tmp_path):
    run = tmp_path / "no-evaluations-here"  # a name no committed figure has
    if metrics is not None:  # None: the folder does not exist at all
        run.mkdir()
        (run / "metrics.jsonl").write_text(metrics)
    result = subprocess.run([sys.executable, "book/curves.py", str(run)], cwd=REPO,
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {run} ") and "train a run there first" in line
    assert not list((REPO / "docs" / "assets").glob(f"{run.name}-curve.*"))
