"""The benchmarks' shared harness, and their refusals: a flag out of range is one line, exit 2,
and nothing written."""

import subprocess
import sys

import pytest
from conftest import REPO

from benchmarks.harness import markdown_table, median_times


def test_median_times_interleaves_rounds_and_drops_the_warmup():
    calls = []
    times = median_times(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
        repeats=3,
        warmup=2,
        before_round=lambda: calls.append("|"),
    )
    assert calls == ["|", "a", "b"] * 5  # every round calls each candidate once, in turn
    assert set(times) == {"a", "b"} and all(t >= 0 for t in times.values())


def test_markdown_table():
    table = markdown_table(["", "tokens/s"], [["cached", 507], ["none", ""]], align="lr")
    assert table == "| | tokens/s |\n| --- | ---: |\n| cached | 507 |\n| none | |"
    with pytest.raises(ValueError, match="2 columns"):
        markdown_table(["a", "b"], [["only one"]])


BAD_FLAGS = [
    ("generate.py", ["--repeats", "0"], "--repeats"),
    ("generate.py", ["--new-tokens", "-1"], "--new-tokens"),
    ("train.py", ["--repeats", "0"], "--repeats"),
    ("tokenizer.py", ["--repeats", "0"], "--repeats"),
    ("attention.py", ["--repeats", "0"], "--repeats"),
    ("attention.py", ["--threads", "0"], "--threads"),
    ("inference.py", ["--repeats", "0"], "--repeats"),
]


@pytest.mark.parametrize(("script", "flags", "named"), BAD_FLAGS)
def test_a_flag_out_of_range_is_one_line_exit_2_and_nothing_written(script, flags, named, tmp_path):
    out = tmp_path / "result.json"
    result = subprocess.run(
        [sys.executable, f"benchmarks/{script}", *flags, "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: argument ") and named in line
    assert list(tmp_path.iterdir()) == []
