"""CI's definitions: the GitHub workflow is valid and runs the README's test command on three systems.

The workflow cannot run here. It is checked against the GitHub-workflow schema that
``check-jsonschema`` ships (offline), and against what the README and ``.python-version`` promise.
"""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted((REPO / ".github" / "workflows").glob("*.yml"))
TESTS = REPO / ".github" / "workflows" / "tests.yml"

needs_linter = pytest.mark.skipif(
    importlib.util.find_spec("check_jsonschema") is None,
    reason="check-jsonschema is not installed (the dev dependency group has it)",
)


def lint(*paths: Path) -> subprocess.CompletedProcess:
    """``check-jsonschema`` against its built-in (vendored, offline) GitHub-workflow schema."""
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.github-workflows"]
        + [str(p) for p in paths],
        capture_output=True,
        text=True,
        timeout=120,
    )


@needs_linter
def test_workflows_match_githubs_schema():
    assert WORKFLOWS, "no workflow in .github/workflows"
    out = lint(*WORKFLOWS)
    assert out.returncode == 0, out.stdout + out.stderr


@needs_linter
def test_the_linter_catches_a_broken_workflow(tmp_path):
    broken = tmp_path / "broken.yml"
    broken.write_text("on: push\njobs:\n  test:\n    steps:\n      - run: uv run pytest\n")
    out = lint(broken)
    assert out.returncode != 0 and "'runs-on' is a required property" in out.stdout


def test_the_workflow_runs_the_readme_command_on_linux_macos_and_windows():
    job = yaml.safe_load(TESTS.read_text())["jobs"]["pytest"]
    systems = {entry["os"].split("-")[0]: entry for entry in job["strategy"]["matrix"]["include"]}
    assert sorted(systems) == ["macos", "ubuntu", "windows"]
    # The locked torch has macOS wheels for Apple silicon only, and runners from macos-14 on are.
    assert int(systems["macos"]["os"].split("-")[1]) >= 14
    # Linux proves the fused kernel; elsewhere its tests may skip, saying why.
    assert systems["ubuntu"]["require-fused"] == "1"
    commands = [step["run"] for step in job["steps"] if "run" in step]
    assert commands == ["uv run pytest"]
    assert "uv run pytest " in (REPO / "README.md").read_text()


def test_ci_requires_the_fused_kernel_and_the_books_python_is_pinned():
    assert "export GPT_REQUIRE_FUSED=1" in (REPO / ".ci" / "run").read_text()
    version = (REPO / ".python-version").read_text().strip()
    assert version.count(".") == 2  # a patch release: the default corpus is its documentation
    assert f"Python {version}" in (REPO / "README.md").read_text()
