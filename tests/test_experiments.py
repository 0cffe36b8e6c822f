"""The "Break it" experiments: every one named, on its page beside its breaking lines, and runnable.

The experiments themselves take about ten minutes; these checks take seconds. They hold the layout
the book relies on (one table per experiment, included by its chapter next to the code that breaks
the model, with a "Modify it" prompt and its command), the command line's refusals, and a cheap
experiment run end to end against its committed table.
"""

import re
import subprocess
import sys

import pytest
from conftest import REPO
from test_run_it import Tolerance, differences

from experiments.__main__ import CHAPTERS, OUT, all_experiments

RUN = [sys.executable, "-m", "experiments"]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*RUN, *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_every_experiment_has_a_table_and_every_table_an_experiment():
    assert sorted(p.stem for p in OUT.glob("*.md")) == sorted(all_experiments())


def test_list_names_every_experiment_with_its_chapter():
    listed = run("--list")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert [line.split()[:2] for line in lines] == [
        [n, c] for n, (c, _) in all_experiments().items()
    ]


def test_the_chapters_are_the_books_pages():
    for chapter in CHAPTERS:
        assert (REPO / "docs" / f"{chapter}.md").is_file(), chapter
        assert (REPO / "experiments" / f"{chapter.replace('-', '_')}.py").is_file(), chapter


@pytest.mark.parametrize("name", list(all_experiments()))
def test_each_page_shows_the_table_the_breaking_lines_and_modify_it(name):
    chapter = all_experiments()[name][0]
    module = f"experiments/{chapter.replace('-', '_')}.py"
    source = (REPO / module).read_text()
    section = re.search(rf"# --8<-- \[start:{name}\]\n(.*?)# --8<-- \[end:{name}\]", source, re.S)
    assert section, f"{module} has no snippet section {name!r}"
    assert len(section[1].strip().splitlines()) <= 20, "the breaking lines must fit beside a table"
    page = (REPO / "docs" / f"{chapter}.md").read_text()
    table = page.index(f'--8<-- "docs/assets/break-it/{name}.md"')
    code = page.index(f'--8<-- "{module}:{name}"')
    modify = page.index("**Modify it.**", code)
    command = page.index(f"uv run python -m experiments {name}\n", modify)
    heading = re.compile(r"\n##+ ").search(page, code)  # all four within one subsection
    assert table < code < modify < command < (heading.start() if heading else len(page))


def test_an_unknown_experiment_is_one_line_and_exit_2(tmp_path):
    result = run("no-such-thing", "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: unknown experiment 'no-such-thing'; see python -m experiments --list"
    ]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("threads", ["0", "-1", "two"])
def test_threads_must_be_a_positive_integer(threads, tmp_path):
    result = run("no-scale", "--threads", threads, "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "--threads" in result.stderr and "positive integer" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["no-scale", "narrow-accumulator"])
def test_a_cheap_experiment_writes_its_committed_table(name, tmp_path):
    result = run(name, "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    fresh = (tmp_path / f"{name}.md").read_text()
    assert fresh.endswith(f"\n\n*Made by `uv run python -m experiments {name}`.*\n")
    committed = (OUT / f"{name}.md").read_text()
    assert differences(committed, fresh, Tolerance()) == []


@pytest.mark.parametrize("flag", ["--steps", "--seeds", "--jobs", "--repeats"])
def test_the_ablation_refuses_a_count_that_is_not_positive_in_one_line(flag, tmp_path):
    result = subprocess.run([sys.executable, "experiments/ablation.py", flag, "0", "--out",
                             str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert flag in result.stderr and "positive integer" in result.stderr
    assert not (tmp_path / "out").exists()
