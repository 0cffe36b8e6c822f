"""Pretrained weights from disk: a folder as ``save_pretrained`` writes it, or a bare safetensors file.

The folder is written by ``transformers`` itself from a small random config (no download), so the
files have exactly the layout of the published checkpoints, and our logits must equal HF's.
"""

import shutil
import subprocess
import sys

import pytest
import torch
from conftest import REPO
from transformers import GPT2Config, GPT2LMHeadModel

from src import generate, gpt2
from src.errors import UserError
from src.gpt2 import download_gpt2, load_pretrained
from src.tokenizer import BPETokenizer


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    torch.manual_seed(0)
    # n_embd / n_head = 64, GPT-2's head size, so the bare-file test can infer the heads.
    config = GPT2Config(
        n_layer=2, n_head=2, n_embd=128, n_positions=24, vocab_size=300, attn_implementation="eager"
    )
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # biases and norms start at 0/1: perturb them so a mix-up shows
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("hf-gpt2")
    model.save_pretrained(folder)
    return folder, model


def logits_of(model, idx):
    with torch.no_grad():
        out = model(idx)
    return getattr(out, "logits", out)


def test_folder_from_save_pretrained_gives_hf_logits(hf_folder):
    folder, ref = hf_folder
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    ours = load_pretrained(folder)
    assert not ours.training
    assert ours.cfg.n_layers == 2 and ours.cfg.n_heads == 2 and ours.cfg.tie_weights
    idx = torch.randint(0, 300, (2, 24))
    torch.testing.assert_close(logits_of(ours, idx), logits_of(ref, idx), atol=1e-5, rtol=0)


def test_bare_safetensors_file_infers_its_config(hf_folder, tmp_path):
    folder, ref = hf_folder
    lone = tmp_path / "weights.safetensors"
    shutil.copy(folder / "model.safetensors", lone)
    ours = load_pretrained(lone, drop_rate=0.0)
    assert (ours.cfg.vocab_size, ours.cfg.context_length) == (300, 24)
    assert (ours.cfg.emb_dim, ours.cfg.n_heads, ours.cfg.n_layers) == (128, 2, 2)
    idx = torch.randint(0, 300, (1, 24))
    torch.testing.assert_close(logits_of(ours, idx), logits_of(ref, idx), atol=1e-5, rtol=0)


def test_missing_path_says_what_is_expected(tmp_path):
    with pytest.raises(UserError, match="no such file or folder; expected one of gpt2"):
        load_pretrained(tmp_path / "nowhere")


def test_folder_without_weights_is_reported(tmp_path):
    with pytest.raises(UserError, match="holds no model.safetensors"):
        load_pretrained(tmp_path)


def test_unknown_name_lists_the_four_sizes():
    with pytest.raises(ValueError, match="gpt2, gpt2-medium, gpt2-large, gpt2-xl"):
        download_gpt2("gpt3")


def test_offline_and_not_cached_says_what_to_do(tmp_path, monkeypatch):
    import huggingface_hub.constants

    # The same path a machine without network takes, without waiting for DNS and retries.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError) as err:
        download_gpt2("gpt2", cache_dir=tmp_path)
    message = str(err.value)
    assert "https://huggingface.co/openai-community/gpt2" in message
    assert "--weights" in message and "model.safetensors" in message


def test_offline_load_by_name_raises_the_same_error(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(gpt2, "download_gpt2", lambda name: download_gpt2(name, tmp_path))
    with pytest.raises(UserError, match="could not download gpt2-medium"):
        load_pretrained("gpt2-medium")


def test_generate_cli_with_local_weights_writes_what_hf_writes(hf_folder, tmp_path, capsys):
    folder, ref = hf_folder
    text = "the cat sat on the mat and the dog sat on the log " * 20
    tokenizer = BPETokenizer.train(text, vocab_size=300)
    tokenizer.save(tmp_path / "tok.json")
    prompt = "the dog sat"
    code = generate.main([
        "--weights", str(folder), "--tokenizer", str(tmp_path / "tok.json"), "--prompt", prompt,
        "--temperature", "0", "--max-new-tokens", "8",
    ])  # fmt: skip
    assert code == 0
    ids = tokenizer.encode(prompt)
    expected = ref.generate(
        torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        max_new_tokens=8, do_sample=False, pad_token_id=0,
    )[0, len(ids):].tolist()  # fmt: skip
    if tokenizer.eot_token in expected:
        expected = expected[: expected.index(tokenizer.eot_token)]
    assert len(expected) >= 4, expected  # a real continuation, not an immediate end-of-text
    assert capsys.readouterr().out.rstrip("\n") == prompt + tokenizer.decode(expected)


def test_generate_cli_offline_is_one_line(tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(gpt2, "download_gpt2", lambda name: download_gpt2(name, tmp_path))
    assert generate.main(["--pretrained", "gpt2-xl", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: could not download gpt2-xl")


HUB_RETRIES = """
import logging, sys
import huggingface_hub
from src import generate

def failing_download(repo, filename, cache_dir=None):  # warns as huggingface_hub does, then fails
    logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5].")
    raise ConnectionError("Name or service not known")

huggingface_hub.hf_hub_download = failing_download
level = logging.getLogger("huggingface_hub").level
code = generate.main(["--pretrained", "gpt2", "--prompt", "hi"])
assert logging.getLogger("huggingface_hub").level == level  # restored afterwards
sys.exit(code)
"""


def test_hub_retry_warnings_do_not_bury_the_one_line():
    # Without a network, huggingface_hub logs a warning on every retry before it gives up; with no
    # logging configured, Python prints those above our line. In a process of its own, as a user runs
    # it (pytest's own log handlers would swallow the warnings).
    out = subprocess.run([sys.executable, "-c", HUB_RETRIES], cwd=REPO, capture_output=True,
                         text=True, timeout=120, check=False)  # fmt: skip
    assert out.returncode == 2, out.stderr
    err = out.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: could not download gpt2 "), err
