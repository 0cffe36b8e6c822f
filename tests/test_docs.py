"""The book builds strictly: a renamed function or section breaks this test, not the reader."""

import shutil

from conftest import REPO, build_book


def test_mkdocs_build_strict(built_book):
    attention = (built_book / "attention" / "index.html").read_text()
    assert "MultiHeadAttention" in attention  # the source was embedded
    assert "<math" in attention and "arithmatex" not in attention  # TeX became MathML at build time


def test_missing_snippet_section_fails_the_build(tmp_path):
    # The check above would be worthless if a broken reference still built: prove it does not.
    for folder in ("docs", "src", "csrc", "benchmarks", "experiments", "book"):
        if (REPO / folder).is_dir():
            shutil.copytree(REPO / folder, tmp_path / folder)
    shutil.copy(REPO / "mkdocs.yml", tmp_path / "mkdocs.yml")
    page = tmp_path / "docs" / "attention.md"
    page.write_text(page.read_text().replace("src/attention.py:mha", "src/attention.py:renamed"))
    result = build_book(tmp_path, tmp_path / "site")
    assert result.returncode != 0
    assert "renamed" in result.stdout + result.stderr
