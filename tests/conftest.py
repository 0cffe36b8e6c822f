"""Shared test fixtures: where the reference data lives, and deterministic seeds."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread and lose much when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def reference_data() -> Path:
    """The folder of real reference data (GPT-2 vocabulary, the story, instruction data).

    ``.ci/run`` points ``GPT_REFERENCE_DATA`` at the reference data folder beside the checkout; on a fresh clone without it the
    tests that need it are skipped, saying why.
    """
    path = os.environ.get("GPT_REFERENCE_DATA")
    if not path:
        pytest.skip("GPT_REFERENCE_DATA is not set (reference data is outside the repository)")
    if not Path(path).is_dir():
        pytest.skip(f"GPT_REFERENCE_DATA={path} is not a directory")
    return Path(path)


@pytest.fixture(scope="session")
def built_book(tmp_path_factory) -> Path:
    """The book, built once per test run (strictly) for every test that reads it."""
    site = tmp_path_factory.mktemp("book") / "site"
    result = build_book(REPO, site)
    assert result.returncode == 0, result.stdout + result.stderr
    return site


def build_book(root: Path, site: Path) -> subprocess.CompletedProcess:
    """``mkdocs build --strict`` of the book at ``root`` into ``site``."""
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )


def pytest_terminal_summary(terminalreporter):
    screenshots = REPO / ".cache" / "book-screenshots"
    if screenshots.is_dir() and any(screenshots.iterdir()):
        terminalreporter.write_line(f"book screenshots (one per page): {screenshots}")
