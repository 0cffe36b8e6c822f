"""The "Run it" outputs in the book are what ``benchmarks/run_it.py`` prints today.

Each chapter is regenerated into a temporary folder and must equal the committed file, so a change to
the code that changes what a reader would see fails here until the page is regenerated with
``uv run python benchmarks/run_it.py CHAPTER``.
"""

import importlib.util

import pytest
from conftest import REPO

from src import fused_softmax
from src.data import load_corpus

spec = importlib.util.spec_from_file_location("run_it", REPO / "benchmarks" / "run_it.py")
run_it = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run_it)

pytestmark = pytest.mark.usefixtures("one_thread")

NOT_COMPARED = {
    # Slow: three Python processes start (two of them under torchrun), 20-40 s on two cores. The
    # equality its output shows, two processes training as one, is required by
    # tests/test_train.py::test_ddp_two_processes_match_one.
    "scaling-out": "slow (three Python processes); its claim is tested by test_train.py's DDP test",
    # Needs the default run's checkpoint (minutes of training); the streaming it shows is tested by
    # tests/test_generate.py's command-line tests on a small checkpoint they train.
    "generating": "needs runs/default, the default training run's checkpoint",
    # Two finetuning runs on the real instruction data, about 13 minutes; the path it exercises is
    # tested on synthetic data by tests/test_instruct.py.
    "instructions": "about 13 minutes of finetuning on the reference data",
}


@pytest.mark.parametrize("chapter", list(run_it.CHAPTERS))
def test_committed_output_is_what_the_script_prints(chapter, tmp_path):
    if chapter in NOT_COMPARED:
        pytest.skip(NOT_COMPARED[chapter])
    committed = (run_it.OUT / f"{chapter}.md").read_text()
    if "sha256 " in committed and load_corpus().fingerprint[:16] not in committed:
        pytest.skip(
            "the default corpus is this Python's own documentation, and it differs from the "
            "Python's that made the committed output"
        )
    if chapter == "attention" and fused_softmax.unavailable_reason() is not None:
        pytest.skip("the fused kernel cannot be built here; the committed output shows it running")
    run_it.write(chapter, tmp_path)
    assert (tmp_path / f"{chapter}.md").read_text() == committed, (
        f"the code now prints something else: uv run python benchmarks/run_it.py {chapter}"
    )


@pytest.mark.parametrize("chapter", list(run_it.CHAPTERS))
def test_every_output_is_on_its_page(chapter):
    page = (REPO / "docs" / f"{chapter}.md").read_text()
    assert f'--8<-- "docs/assets/run-it/{chapter}.md"' in page
