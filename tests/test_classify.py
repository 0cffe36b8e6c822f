"""Classification finetuning: data checks, last-token pooling, and a tiny model that learns a rule."""

import csv
import hashlib
import io
import json
import random
import zipfile

import pytest
import torch
from safetensors.torch import load_file

from src.checkpoints import find_checkpoint, load_checkpoint_meta, save_checkpoint
from src.classify import (
    balance,
    check_labels,
    collate,
    last_token_logits,
    load_sms_spam,
    main,
    make_classifier,
    read_table,
    split_rows,
)
from src.errors import UserError
from src.model import GPTConfig, GPTModel
from src.tokenizer import BPETokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def write_csv(path, rows, header=("text", "label"), delimiter=","):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_read_table_csv_and_tsv(tmp_path):
    rows = [("hello, world", "a"), ('say "hi"', "b")]
    assert read_table(write_csv(tmp_path / "d.csv", rows), "text", "label") == rows
    tsv = write_csv(tmp_path / "d.tsv", rows, header=("msg", "y"), delimiter="\t")
    assert read_table(tsv, "msg", "y") == rows


def test_missing_column_names_the_column_and_the_columns_present(tmp_path):
    path = write_csv(tmp_path / "d.csv", [("x", "a")], header=("message", "label"))
    with pytest.raises(
        UserError, match=r"has no column 'text' \(its columns: message, label\).*--text-column"
    ):
        read_table(path, "text", "label")


def test_label_outside_the_label_set_is_reported_with_its_row():
    rows = [("x", "ham"), ("y", "spam"), ("z", "spma")]
    with pytest.raises(
        UserError, match=r"d.csv row 3: label 'spma' is not in the label set \(ham, spam\)"
    ):
        check_labels(rows, ["ham", "spam"], "d.csv")
    assert check_labels(rows[:2], None, "d.csv") == ["ham", "spam"]
    with pytest.raises(UserError, match="at least two labels"):
        check_labels([("x", "a")], None, "d.csv")


def test_balance_undersamples_to_the_smallest_class_and_split_partitions():
    rows = [(f"h{i}", "ham") for i in range(40)] + [(f"s{i}", "spam") for i in range(10)]
    kept = balance(rows, seed=0)
    assert sorted(label for _, label in kept).count("ham") == 10 and len(kept) == 20
    assert set(kept) <= set(rows)
    train, val, test = split_rows(kept, (0.7, 0.1, 0.2), seed=0)
    assert (len(train), len(val), len(test)) == (14, 2, 4)
    assert sorted(train + val + test) == sorted(kept)


def test_collate_and_last_token_pooling_against_a_manual_computation():
    cfg = GPTConfig.from_preset("cpu-tiny", vocab_size=50, context_length=16)
    model = make_classifier(GPTModel(cfg).eval(), num_classes=3)
    texts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    ids, lengths, labels = collate([(t, i) for i, t in enumerate(texts)], pad_id=0)
    assert ids.tolist() == [[5, 6, 7, 8, 9], [10, 11, 0, 0, 0], [12, 13, 14, 0, 0]]
    assert lengths.tolist() == [5, 2, 3] and labels.tolist() == [0, 1, 2]
    with torch.no_grad():
        pooled = last_token_logits(model(ids), lengths)
        # Manual: run each text alone, unpadded, and take its final position's logits.
        expected = torch.stack([model(torch.tensor([t]))[0, -1] for t in texts])
    assert pooled.shape == (3, 3)
    torch.testing.assert_close(pooled, expected, atol=1e-5, rtol=1e-5)


def sms_archive(lines: list[str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("SMSSpamCollection", "\n".join(lines) + "\n")
        zf.writestr("readme", "about the data")
    return buffer.getvalue()


def test_sms_spam_downloads_validates_and_caches(tmp_path):
    archive = tmp_path / "sms.zip"
    archive.write_bytes(sms_archive(["ham\tSee you at 5", "spam\tWIN a prize now!!", "ham\tok"]))
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    rows = load_sms_spam(tmp_path / "cache", url=archive.as_uri(), sha256=digest)
    assert rows == [("See you at 5", "ham"), ("WIN a prize now!!", "spam"), ("ok", "ham")]
    archive.unlink()  # the second call must not need the source again
    assert load_sms_spam(tmp_path / "cache", url=archive.as_uri(), sha256=digest) == rows


def test_sms_spam_with_another_checksum_is_refused_and_not_cached(tmp_path):
    archive = tmp_path / "sms.zip"
    archive.write_bytes(sms_archive(["ham\tSee you at 5", "spam\tWIN a prize now!!"]))
    with pytest.raises(UserError, match="checksum mismatch .* expected sha256 1587ea43"):
        load_sms_spam(tmp_path / "cache", url=archive.as_uri())  # the published archive's hash
    assert not (tmp_path / "cache" / "downloads").exists()


def test_sms_spam_with_the_wrong_structure_is_refused(tmp_path):
    archive = tmp_path / "sms.zip"
    archive.write_bytes(sms_archive(["ham\tfine", "label,text"]))
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    with pytest.raises(UserError, match="line 2: expected 'ham' or 'spam', a tab, and a message"):
        load_sms_spam(tmp_path / "cache", url=archive.as_uri(), sha256=digest)


def test_sms_spam_offline_says_what_to_do(tmp_path):
    with pytest.raises(UserError, match="could not get the SMS Spam Collection.*--data"):
        load_sms_spam(tmp_path / "cache", url="http://127.0.0.1:9/sms.zip")  # nothing listens there


WORDS = "red blue green cat dog sun moon tree car road sky sea".split()


def keyword_rows(n: int, seed: int) -> list[tuple[str, str]]:
    """Learnable: the label says whether the word 'apple' occurs anywhere in the text."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = rng.choices(WORDS, k=rng.randint(4, 9))
        if i % 2:
            words.insert(rng.randrange(len(words) + 1), "apple")
        rows.append((" ".join(words), "yes" if i % 2 else "no"))
    return rows


def test_tiny_model_learns_a_keyword_rule_and_predicts(tmp_path, capsys):
    rows = keyword_rows(400, seed=0)
    data = write_csv(tmp_path / "keyword.csv", rows)
    BPETokenizer.train(" ".join(t for t, _ in rows), vocab_size=280).save(tmp_path / "tok.json")
    out = tmp_path / "run"
    code = main([
        "--data", str(data), "--preset", "cpu-tiny", "--tokenizer", str(tmp_path / "tok.json"),
        "--trainable", "all", "--epochs", "6", "--batch-size", "16", "--lr", "3e-3",
        "--min-lr", "1e-4", "--warmup-steps", "10", "--split", "0.7,0.2,0.1",
        "--out-dir", str(out), "--quiet", "--device", "cpu",
    ])  # fmt: skip
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["before"]["val_accuracy"] < 0.75  # it had to learn the rule
    assert results["final"]["val_accuracy"] >= 0.90
    assert sum(map(sum, results["final"]["val_confusion"])) == 80
    capsys.readouterr()
    assert (
        main(
            [
                "--predict",
                "sun apple road",
                "--predict",
                "sun moon road",
                "--out-dir",
                str(out),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == ["yes", "no"]


def test_bad_split_and_missing_classifier_are_one_line_errors(tmp_path, capsys):
    data = write_csv(tmp_path / "d.csv", keyword_rows(20, seed=1))
    assert (
        main(["--data", str(data), "--split", "0.7,0.7,0.1", "--out-dir", str(tmp_path / "x")]) == 2
    )
    assert "--split must be three fractions summing to 1" in capsys.readouterr().err
    assert main(["--predict", "hi", "--out-dir", str(tmp_path / "none"), "--device", "cpu"]) == 2
    assert "no classifier in" in capsys.readouterr().err
    assert (
        main(
            [
                "--data",
                str(data),
                "--dtype",
                "fp16",
                "--device",
                "cpu",
                "--out-dir",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    assert "fp16 needs a CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_lora_rank_must_be_positive_on_the_command_line(tmp_path, capsys):
    data = write_csv(tmp_path / "d.csv", keyword_rows(20, seed=1))
    code = main(
        [
            "--data",
            str(data),
            "--trainable",
            "lora",
            "--lora-rank",
            "0",
            "--out-dir",
            str(tmp_path / "x"),
        ]
    )
    assert code == 2
    assert "LoRA rank must be a positive integer, got 0" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def base_checkpoint(tmp_path):
    """A small model saved as src.train saves one, and a CSV of keyword data."""
    rows = keyword_rows(60, seed=2)
    data = write_csv(tmp_path / "d.csv", rows)
    tokenizer = BPETokenizer.train(" ".join(t for t, _ in rows), vocab_size=280)
    base = GPTModel(GPTConfig.from_preset("cpu-tiny", vocab_size=tokenizer.n_vocab))
    meta = {
        "step": 0,
        "config": base.cfg.to_dict(),
        "tokenizer": {"ref": str(tmp_path / "tok.json"), "fingerprint": tokenizer.fingerprint},
    }
    save_checkpoint(tmp_path / "base", base, torch.optim.AdamW(base.parameters()), tokenizer, meta)
    return data, base


def test_last_block_from_a_base_checkpoint_leaves_the_lower_blocks_untouched(tmp_path):
    data, base = base_checkpoint(tmp_path)
    out = tmp_path / "run"
    code = main([
        "--data", str(data), "--checkpoint", str(tmp_path / "base"), "--trainable", "last-block",
        "--epochs", "1", "--lr", "1e-2", "--out-dir", str(out), "--quiet", "--device", "cpu",
    ])  # fmt: skip
    assert code == 0
    before = base.state_dict()
    after = load_file(find_checkpoint(out) / "model.safetensors")
    for name in (
        "tok_emb.weight",
        "trf_blocks.0.att.W_query.weight",
        "trf_blocks.0.ff.fc.weight",
    ):
        assert torch.equal(after[name], before[name]), name
    assert not torch.equal(
        after["trf_blocks.1.att.W_query.weight"], before["trf_blocks.1.att.W_query.weight"]
    )
    assert not torch.equal(after["final_norm.scale"], before["final_norm.scale"])
    assert after["out_head.weight"].shape == (2, base.cfg.emb_dim)


def test_lora_run_saves_a_plain_model_with_the_update_merged(tmp_path):
    data, base = base_checkpoint(tmp_path)
    out = tmp_path / "run"
    code = main([
        "--data", str(data), "--checkpoint", str(tmp_path / "base"), "--trainable", "lora",
        "--lora-rank", "4", "--epochs", "1", "--lr", "1e-2", "--out-dir", str(out), "--quiet",
        "--device", "cpu",
    ])  # fmt: skip
    assert code == 0
    before = base.state_dict()
    after = load_file(find_checkpoint(out) / "model.safetensors")
    assert not [k for k in after if "lora" in k or ".base." in k]  # plain names only
    # Frozen: embeddings and norms. Changed through merged LoRA updates: every block's Linear weights.
    for name in ("tok_emb.weight", "trf_blocks.0.norm1.scale"):
        assert torch.equal(after[name], before[name]), name
    for name in ("trf_blocks.0.att.W_query.weight", "trf_blocks.1.ff.proj.weight"):
        assert not torch.equal(after[name], before[name]), name
    assert load_checkpoint_meta(find_checkpoint(out))["lora"]["rank"] == 4
