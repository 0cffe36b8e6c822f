"""Instruction finetuning: the prompt format, the collate function, bad input, a short real run."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO

from src.errors import UserError
from src.instruct import (
    collate,
    encode_example,
    exact_match,
    format_prompt,
    load_instructions,
    main,
    split_instructions,
    token_f1,
)
from src.tokenizer import BPETokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


PAD = 99
X = -100


def test_prompt_format_with_and_without_input():
    with_input = format_prompt(
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
    )
    assert with_input == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3"
        "\n\n### Response:\n"
    )
    without = format_prompt({"instruction": "Say hi.", "input": "", "output": "Hi."})
    assert "### Input" not in without and without.endswith("Say hi.\n\n### Response:\n")


# Two hand-made examples: (ids ending in end-of-text 99, prompt length).
#   a: prompt 1 2 3, response 4 5, eot        -> 6 ids
#   b: prompt 6 7,   response 8, eot          -> 4 ids
BATCH = [([1, 2, 3, 4, 5, PAD], 3), ([6, 7, 8, PAD], 2)]


def test_collate_pads_and_keeps_the_first_end_of_text_target():
    inputs, targets = collate(BATCH, pad_id=PAD, mask_prompt=False)
    assert torch.equal(inputs, torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, PAD, PAD]]))
    assert torch.equal(targets, torch.tensor([[2, 3, 4, 5, PAD], [7, 8, PAD, X, X]]))


def test_collate_masks_the_prompt_when_asked():
    inputs, targets = collate(BATCH, pad_id=PAD, mask_prompt=True)
    assert torch.equal(inputs, torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, PAD, PAD]]))
    # a: targets 2, 3 predict prompt tokens; 4 (first response token) is the first one kept.
    # b: target 7 predicts a prompt token; 8 is kept.
    assert torch.equal(targets, torch.tensor([[X, X, 4, 5, PAD], [X, 8, PAD, X, X]]))


def test_masked_targets_add_nothing_to_the_loss():
    # -100 is what F.cross_entropy ignores: the loss equals the mean over the kept targets alone.
    _, targets = collate(BATCH, pad_id=PAD, mask_prompt=True)
    logits = torch.randn(2, 5, 100)
    kept = targets != X
    expected = torch.nn.functional.cross_entropy(logits[kept], targets[kept])
    got = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    torch.testing.assert_close(got, expected)


class Chars:
    """A character-level tokenizer: one id per character, 0 = end-of-text."""

    eot_token = 0
    n_vocab = 128

    def encode(self, text, disallowed_special=()):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def test_encode_example_appends_end_of_text_and_counts_the_prompt():
    entry = {"instruction": "I", "input": "", "output": "ok"}
    ids, prompt_length = encode_example(
        entry, Chars(), max_tokens=1000, too_long="error", where="x"
    )
    assert prompt_length == len(format_prompt(entry))
    assert ids == Chars().encode(format_prompt(entry) + "ok") + [0]


def test_too_long_example_errors_or_is_truncated_by_flag(capsys):
    entry = {"instruction": "I", "input": "", "output": "a long answer"}
    with pytest.raises(
        UserError, match="train example 3 has .* tokens, more than the 50 .*--too-long truncate"
    ):
        encode_example(entry, Chars(), max_tokens=50, too_long="error", where="train example 3")
    ids, _ = encode_example(
        entry, Chars(), max_tokens=50, too_long="truncate", where="train example 3"
    )
    assert len(ids) == 50
    assert "warning: train example 3" in capsys.readouterr().err


def test_scores():
    assert exact_match("The answer is 4.", "the answer is 4") == 1.0
    assert exact_match("4", "The answer is 4.") == 0.0
    # response words: a b c; reference: a b d d -> 2 shared, precision 2/3, recall 2/4
    assert token_f1("a b c", "a b d d") == pytest.approx(2 * (2 / 3) * (2 / 4) / (2 / 3 + 2 / 4))
    assert token_f1("x", "y") == 0.0 and token_f1("same words", "Same words!") == 1.0


@pytest.mark.parametrize(
    "content, message",
    [
        ('[{"instruction": "a", ', "not valid JSON"),
        ('{"instruction": "a"}', "expected a non-empty JSON list"),
        ('[{"instruction": "a", "input": ""}]', "entry 0 has no output"),
        ('[{"instruction": "a", "input": "", "output": 3}]', "'output' must be a string"),
    ],
)
def test_bad_json_is_reported(tmp_path, content, message):
    path = tmp_path / "data.json"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        load_instructions(path)


def test_bad_json_from_the_command_line_is_one_line_and_writes_nothing(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[{"instruction": "a", "input": ""}]')
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "src.instruct", "--data", str(path), "--out-dir", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {path}: entry 0 has no output (each entry needs instruction, input, output)"
    )
    assert not out.exists()


def test_real_instruction_data_loads_formats_and_splits_935_55_110(reference_data):
    data = load_instructions(reference_data / "instruction-data.json")
    assert len(data) == 1100
    train, val, test = split_instructions(data)
    assert (len(train), len(val), len(test)) == (935, 55, 110)
    assert train[0] == data[0] and test[0] == data[935] and val[0] == data[1045]
    prompt = format_prompt(data[0])
    assert data[0]["instruction"] in prompt and prompt.endswith("### Response:\n")


def synthetic_instructions(n: int) -> list[dict]:
    """Learnable: the response is the input word spelled backwards."""
    words = ["cat", "dog", "sun", "map", "pen", "cup", "hat", "box", "red", "top", "bus", "net"]
    return [
        {"instruction": "Reverse the word.", "input": w, "output": w[::-1]}
        for w in (words[i % len(words)] for i in range(n))
    ]


def test_short_run_lowers_the_loss_and_writes_scored_responses(tmp_path):
    data = synthetic_instructions(60)
    (tmp_path / "data.json").write_text(json.dumps(data))
    text = "\n".join(p for e in data for p in (json.dumps(e), format_prompt(e)))
    BPETokenizer.train(text, vocab_size=600).save(tmp_path / "tok.json")
    out = tmp_path / "run"
    code = main([
        "--data", str(tmp_path / "data.json"), "--preset", "cpu-tiny", "--tokenizer", str(tmp_path / "tok.json"),
        "--epochs", "4", "--batch-size", "8", "--lr", "3e-3", "--out-dir", str(out), "--quiet",
        "--device", "cpu", "--max-new-tokens", "8", "--mask-prompt",
    ])  # fmt: skip
    assert code == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [0, 1, 2, 3, 4]
    assert metrics[-1]["train_loss"] < 0.5 * metrics[0]["train_loss"]
    assert metrics[-1]["val_loss"] < 0.5 * metrics[0]["val_loss"]
    responses = json.loads((out / "responses.json").read_text())
    assert len(responses) == 6 and all("model_response" in r for r in responses)
    results = json.loads((out / "results.json").read_text())
    assert 0.0 <= results["test"]["token_f1"] <= 1.0
    assert (out / "checkpoints" / "latest").is_file()
