"""The exercises: every stub fails with a clear message, every answer passes, and every typical
wrong answer (``tests/mistakes/CHAPTER.py``) is caught by the checker."""

import pytest
from conftest import REPO

from exercises.checker import CHAPTERS, main, solutions

WRITTEN = [
    c
    for c in CHAPTERS
    if (REPO / "exercises" / "solutions" / f"{c.replace('-', '_')}.py").is_file()
]
REQUIRED = {"tokens": {"merge"}, "attention": {"causal_attention"}, "model": {"layer_norm", "gelu"},
            "pretraining": {"cross_entropy"}, "generating": {"top_p_filter"},
            "fused-softmax": {"online_softmax"}, "flash-attention": {"flash_forward"}}  # fmt: skip


def run(capsys, *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(list(argv))
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err
    return code, out.out + out.err


def test_every_chapter_has_at_least_three_exercises():
    assert WRITTEN == list(CHAPTERS), f"chapters without exercises: {set(CHAPTERS) - set(WRITTEN)}"
    for chapter in CHAPTERS:
        names = {ex.name for ex in solutions(chapter).EXERCISES}
        assert len(names) >= 3 and REQUIRED.get(chapter, set()) <= names, (chapter, names)


@pytest.mark.parametrize("chapter", WRITTEN)
def test_the_answers_pass(capsys, chapter):
    code, out = run(capsys, chapter, "--answers")
    assert code == 0, out


@pytest.mark.parametrize("chapter", WRITTEN)
def test_the_stubs_fail_clearly(capsys, chapter):
    code, out = run(capsys, chapter)
    n = len(solutions(chapter).EXERCISES)
    assert code == 1 and out.count("not written yet") == n and f"0 of {n} exercises pass" in out


@pytest.mark.parametrize("chapter", WRITTEN)
def test_every_typical_mistake_is_caught(capsys, chapter):
    path = REPO / "tests" / "mistakes" / f"{chapter.replace('-', '_')}.py"
    code, out = run(capsys, chapter, "--file", str(path))
    n = len(solutions(chapter).EXERCISES)
    assert code == 1 and out.count("FAILED") == n and "not written yet" not in out, out
    assert out.count("hint:") == n and out.count("expected:") + out.count("raised") >= n


def test_list_only_and_bad_input(capsys, tmp_path):
    code, out = run(capsys, "--list")
    assert code == 0 and "tokens.merge: " in out
    code, out = run(capsys, "tokens", "--answers", "--only", "merge")
    assert code == 0 and "1 of 1 exercises pass" in out
    code, out = run(capsys, "tokens", "--only", "nope")
    assert code == 2 and "has no exercise 'nope'" in out
    (tmp_path / "broken.py").write_text("def merge(:\n")
    code, out = run(capsys, "tokens", "--file", str(tmp_path / "broken.py"))
    assert code == 1 and "does not load: SyntaxError" in out
