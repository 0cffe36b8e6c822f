"""Hostile but realistic input: every mistake a user can make is one line and a non-zero exit.

Each case runs a command in this process and requires: an exit code other than 0, exactly one line
of output starting with ``error:``, no traceback, and, where the mistake used to cost data, that the
data is still there. The cases are the classes a user meets: flags out of range or contradicting
each other, damaged checkpoints and caches, run folders used twice, text that spells a special
token, files that are not what they claim to be, and a full disk.
"""

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch

from src import classify, generate, instruct, train
from src.checkpoints import find_checkpoint, save_checkpoint
from src.cli import MetricsLog, RunFolder, format_perplexity, read_jsonl
from src.tokenizer import BPETokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--preset", "cpu-tiny", "--vocab-size", "300", "--context-length", "32",
        "--batch-size", "4", "--eval-iters", "1", "--eval-interval", "2", "--warmup-steps", "1",
        "--lr", "3e-3", "--max-steps", "2", "--device", "cpu"]  # fmt: skip
COMMANDS = {"train": train.main, "generate": generate.main, "classify": classify.main,
            "instruct": instruct.main}  # fmt: skip


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A private cache, a corpus, a trained tiny run, a classification CSV and instruction data."""
    import pydoc_data.topics

    root = tmp_path_factory.mktemp("bad-input")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GPT_CACHE_DIR", str(root / "cache"))
        topics = pydoc_data.topics.topics
        (root / "docs.txt").write_text("\n\n".join(topics[k] for k in sorted(topics))[:30_000])
        assert (
            train.main([*TINY, "--data", str(root / "docs.txt"), "--out-dir", str(root / "run")])
            == 0
        )
        rows = [("red apple sea", "yes"), ("blue sky", "no")] * 20
        (root / "d.csv").write_text("text,label\n" + "".join(f"{t},{lbl}\n" for t, lbl in rows))
        BPETokenizer.train(" ".join(t for t, _ in rows), 280).save(root / "tok.json")
        entries = [{"instruction": f"Say {i}.", "input": "", "output": f"{i}"} for i in range(40)]
        (root / "inst.json").write_text(json.dumps(entries))
        yield root


def refused(capsys, command: str, argv: list[str]) -> str:
    """Run ``command`` with ``argv``; it must fail in exactly one line. Returns that line."""
    capsys.readouterr()
    code = COMMANDS[command](argv)
    out = capsys.readouterr()
    errors = [line for line in out.err.splitlines() if line.startswith("error:")]
    assert code not in (0, None) and len(errors) == 1 and "Traceback" not in out.err, out.err
    return errors[0]


def run_copy(world: Path, tmp_path: Path) -> Path:
    """A copy of the trained run, to damage."""
    shutil.copytree(world / "run", tmp_path / "run")
    return tmp_path / "run"


def train_args(world: Path, out: Path, *extra: str) -> list[str]:
    return [*TINY, "--data", str(world / "docs.txt"), "--out-dir", str(out), *extra]


# --- flags ------------------------------------------------------------------------------------

TRAIN_FLAGS = [
    (["--min-lr", "-1e-3"], "min_lr must be between 0 and lr"),  # was: gradient ascent
    (["--min-lr", "2e-2"], "min_lr must be between 0 and lr"),
    (["--weight-decay", "-1"], "--weight-decay: must be a number >= 0"),
    (["--epochs", "0"], "--epochs: must be a positive number"),  # was: one step
    (["--epochs", "-1"], "--epochs: must be a positive number"),
    (["--epochs", "nan"], "--epochs: must be a positive number"),
    (["--epochs", "inf"], "--epochs: must be a positive number"),
    (["--max-steps", "0"], "--max-steps: must be a positive integer"),  # was: no checkpoint
    (["--max-steps", "-5"], "--max-steps: must be a positive integer"),
    (["--warmup-steps", "-1"], "--warmup-steps: must be an integer >= 0"),
    (["--grad-clip", "-1"], "--grad-clip: must be a number >= 0"),  # was: clipping off
    (["--grad-clip", "nan"], "--grad-clip: must be a number >= 0"),
    (["--lr", "0"], "the learning rate must be a positive number"),
    (["--lr", "-1"], "the learning rate must be a positive number"),
    (["--lr", "nan"], "the learning rate must be a positive number"),
    (["--lr", "inf"], "the learning rate must be a positive number"),
    (["--vocab-size", "10"], "vocab_size=10 is too small"),
    (["--device", "tpu"], "--device tpu: use auto, cpu, cuda, cuda:N or mps"),
    (["--device", "foo:bar"], "--device foo:bar: use auto, cpu, cuda, cuda:N or mps"),
    (["--context-length", "0"], "--context-length: must be a positive integer"),
    (["--dropout", "1.5"], "drop_rate must be in [0, 1)"),
    (["--dropout", "nan"], "drop_rate must be in [0, 1)"),
    (["--fused-attention", "--attn-impl", "sdpa"], "give --fused-attention or --attn-impl"),
    (["--tokenizer", "gpt2", "--vocab-size", "500"], "give --tokenizer or --vocab-size"),
    (["--max-steps", "3", "--epochs", "1"], "give --max-steps or --epochs"),
    (["--resume", "--overwrite"], "give --resume or --overwrite"),
    (["--eval-interval", "0"], "--eval-interval: must be a positive integer"),
    (["--batch-size", "x"], "--batch-size: must be a positive integer, got 'x'"),
]


@pytest.mark.parametrize("flags, message", TRAIN_FLAGS, ids=[" ".join(f) for f, _ in TRAIN_FLAGS])
def test_train_refuses_flags_that_cannot_work(world, tmp_path, capsys, flags, message):
    line = refused(capsys, "train", train_args(world, tmp_path / "out", *flags))
    assert message in line
    assert not (tmp_path / "out").exists()  # nothing written, not even an empty folder


GENERATE_FLAGS = [
    (["--max-new-tokens", "-5"], "--max-new-tokens: must be an integer >= 0"),
    (["--temperature", "inf"], "temperature must be a number >= 0"),
    (["--temperature", "nan"], "temperature must be a number >= 0"),
    (["--temperature", "-1"], "temperature must be a number >= 0"),
    (["--top-k", "0"], "--top-k: must be a positive integer"),
    (["--top-p", "0"], "top_p must be in (0, 1]"),
    (["--top-p", "nan"], "top_p must be in (0, 1]"),
    (["--tokenizer", "gpt2"], "a checkpoint brings its own tokenizer"),
]


@pytest.mark.parametrize(
    "flags, message", GENERATE_FLAGS, ids=[" ".join(f) for f, _ in GENERATE_FLAGS]
)
def test_generate_refuses_flags_that_cannot_work(world, capsys, flags, message):
    line = refused(capsys, "generate", ["--checkpoint", str(world / "run"), *flags])
    assert message in line


FINETUNE_FLAGS = [
    (["--lr", "-1"], "the learning rate must be a positive number"),
    (["--lr", "nan"], "the learning rate must be a positive number"),
    (["--min-lr", "1"], "min_lr must be between 0 and lr"),
    (["--epochs", "0"], "--epochs: must be a positive integer"),
    (["--batch-size", "1000"], "--batch-size 1000 is larger than the"),
    (["--drop-rate", "2"], "drop_rate must be in [0, 1)"),
    (["--trainable", "lora", "--lora-rank", "-2"], "LoRA rank must be a positive integer"),
]


@pytest.mark.parametrize("command", ["classify", "instruct"])
@pytest.mark.parametrize(
    "flags, message", FINETUNE_FLAGS, ids=[" ".join(f) for f, _ in FINETUNE_FLAGS]
)
def test_finetuning_refuses_flags_that_cannot_work(
    world, tmp_path, capsys, command, flags, message
):
    data = world / ("d.csv" if command == "classify" else "inst.json")
    argv = ["--data", str(data), "--preset", "cpu-tiny", "--tokenizer", str(world / "tok.json"),
            "--device", "cpu", "--quiet", "--out-dir", str(tmp_path / "out"), *flags]  # fmt: skip
    assert message in refused(capsys, command, argv)
    assert not (tmp_path / "out" / "checkpoints").exists()


@pytest.mark.parametrize(
    "split", ["nan,nan,nan", "0.7,0.7,0.1", "1,0,x", "0.5,0.5", "inf,-inf,1", "-0.1,0.6,0.5"]
)
def test_classify_refuses_a_bad_split(world, tmp_path, capsys, split):
    argv = ["--data", str(world / "d.csv"), f"--split={split}", "--out-dir", str(tmp_path / "o")]
    assert "--split must be three fractions summing to 1" in refused(capsys, "classify", argv)


def test_instruct_refuses_limit_test_0_before_training(world, tmp_path, capsys):
    argv = [
        "--data",
        str(world / "inst.json"),
        "--limit-test",
        "0",
        "--out-dir",
        str(tmp_path / "o"),
    ]
    assert "--limit-test: must be a positive integer" in refused(capsys, "instruct", argv)
    assert not (tmp_path / "o").exists()


# --- run folders --------------------------------------------------------------------------------


def test_a_run_folder_is_never_overwritten_by_mistake(world, tmp_path, capsys):
    run = run_copy(world, tmp_path)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    line = refused(capsys, "train", train_args(world, run))
    assert "already holds a run (checkpoint step_0000002)" in line and "--resume" in line
    assert "--overwrite" in line
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    assert find_checkpoint(run).name == "step_0000002"
    assert train.main(train_args(world, run, "--overwrite", "--max-steps", "1")) == 0  # on request
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [0, 1]


def test_a_run_folder_in_use_is_refused(world, tmp_path, capsys):
    with RunFolder(tmp_path / "busy"):  # as if another trainer were running there
        line = refused(capsys, "train", train_args(world, tmp_path / "busy"))
    assert "is in use by another run" in line
    assert not (tmp_path / "busy" / "metrics.jsonl").exists()


def test_an_out_dir_that_is_a_file_is_refused(world, tmp_path, capsys):
    (tmp_path / "f").write_text("keep me")
    assert "is a file, not a folder" in refused(capsys, "train", train_args(world, tmp_path / "f"))
    assert (tmp_path / "f").read_text() == "keep me"


def test_finetuning_into_the_base_checkpoint_folder_is_refused(world, tmp_path, capsys):
    run = run_copy(world, tmp_path)
    argv = ["--data", str(world / "d.csv"), "--checkpoint", str(run), "--out-dir", str(run),
            "--overwrite", "--device", "cpu"]  # fmt: skip
    assert "holds the base checkpoint" in refused(capsys, "classify", argv)
    assert find_checkpoint(run).name == "step_0000002"


def test_resume_rewrites_the_metrics_atomically(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "train_loss": 1.0}) + "\n" for s in range(5)))
    monkeypatch.setattr("os.replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):  # killed in the middle of the rewrite
        MetricsLog(path, keep_until=2)
    assert [r["step"] for r in read_jsonl(path)] == [0, 1, 2, 3, 4]  # the history survives
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # and no temporary file


def test_metrics_hold_only_json(tmp_path):
    log = MetricsLog(tmp_path / "m.jsonl")
    log.append({"step": 1, "train_loss": float("nan"), "grad_norm": float("inf")})
    text = (tmp_path / "m.jsonl").read_text()
    assert json.loads(text, parse_constant=pytest.fail) == {"step": 1, "train_loss": None,
                                                           "grad_norm": None}  # fmt: skip
    assert format_perplexity(614.0) == "4.5e+266"  # not 267 digits
    assert format_perplexity(800.0) == "inf" and format_perplexity(5.26) == "192.5"


# --- checkpoints ----------------------------------------------------------------------------------


def _header(path: Path) -> tuple[int, dict]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return n, json.loads(data[8 : 8 + n])


def _with_header(path: Path, header: dict) -> None:
    """Rewrite a safetensors header in place, padded to its old length (the offsets stay valid)."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= n
    path.write_bytes(data[:8] + text.ljust(n) + data[8 + n :])


def _patch_first_matrix(path: Path, change) -> None:
    n, header = _header(path)
    name = next(k for k, v in header.items() if k != "__metadata__" and len(v["shape"]) == 2)
    change(header, name)
    _with_header(path, header)


def _overlap(header: dict, name: str) -> None:
    other = next(k for k in header if k not in ("__metadata__", name))
    header[name]["data_offsets"] = header[other]["data_offsets"]


DAMAGE = {
    "model.safetensors": {
        "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
        "empty": lambda p: p.write_bytes(b""),
        "huge header": lambda p: p.write_bytes(struct.pack("<Q", 10**15) + p.read_bytes()[8:]),
        "garbage header": lambda p: p.write_bytes(p.read_bytes()[:8] + b"\x00garbage" * 40),
        "F32 patched to I32": lambda p: p.write_bytes(
            p.read_bytes().replace(b'"F32"', b'"I32"', 1)
        ),
        "swapped shape": lambda p: _patch_first_matrix(
            p, lambda h, k: h[k].update(shape=h[k]["shape"][::-1])
        ),
        "overlapping offsets": lambda p: _patch_first_matrix(p, _overlap),
        "missing": lambda p: p.unlink(),
    },
    "checkpoint.json": {
        "{}": lambda p: p.write_text("{}"),
        "invalid JSON": lambda p: p.write_text(p.read_text()[:-20]),
        "mistyped step": lambda p: p.write_text(
            json.dumps(json.loads(p.read_text()) | {"step": "ten"})
        ),
        "negative step": lambda p: p.write_text(
            json.dumps(json.loads(p.read_text()) | {"step": -100})
        ),
        "config of another kind": lambda p: p.write_text(
            json.dumps(json.loads(p.read_text()) | {"config": {"emb_dim": "wide"}})
        ),
        "not an object": lambda p: p.write_text("[1, 2]"),
    },
    "tokenizer.json": {
        "another corpus's tokenizer of the same size": lambda p: BPETokenizer.train(
            p.read_text()[::-1] * 3, 300
        ).save(p),
        "garbage": lambda p: p.write_text("not json"),
    },
    "latest": {
        "absolute path": lambda p: p.write_text("/etc"),
        "parent folder": lambda p: p.write_text("../../.."),
        "dangling": lambda p: p.write_text("step_0000099"),
    },
}
CASES = [(f, name) for f, cases in DAMAGE.items() for name in cases]


def _damage(run: Path, file: str, name: str) -> None:
    ckpt = find_checkpoint(run)
    DAMAGE[file][name](run / "checkpoints" / "latest" if file == "latest" else ckpt / file)


@pytest.mark.parametrize("file, damage", CASES, ids=[f"{f}: {d}" for f, d in CASES])
def test_a_damaged_checkpoint_is_one_line_naming_the_file(world, tmp_path, capsys, file, damage):
    run = run_copy(world, tmp_path)
    _damage(run, file, damage)
    line = refused(capsys, "generate", ["--checkpoint", str(run), "--max-new-tokens", "3"])
    named = "latest" if file == "latest" else file
    assert named in line, line
    if file == "tokenizer.json":
        return  # a resumed run uses the tokenizer of its flags, and checks its fingerprint
    history = (run / "metrics.jsonl").read_bytes()
    line = refused(capsys, "train", train_args(world, run, "--resume", "--max-steps", "4"))
    assert named in line, line
    assert (run / "metrics.jsonl").read_bytes() == history  # a refused resume keeps the history


@pytest.mark.parametrize(
    "damage", ["missing", "empty", "truncated", "garbage", "a pickle with code"]
)
def test_a_damaged_optimizer_state_is_one_line(world, tmp_path, capsys, damage):
    run = run_copy(world, tmp_path)
    path = find_checkpoint(run) / "optimizer.pt"
    if damage == "missing":
        path.unlink()
    elif damage == "a pickle with code":
        torch.save({"state": {}, "param_groups": [], "payload": Path("/")}, path)
    else:
        path.write_bytes(
            {"empty": b"", "truncated": path.read_bytes()[:200], "garbage": b"\x80x" * 50}[damage]
        )
    line = refused(capsys, "train", train_args(world, run, "--resume", "--max-steps", "4"))
    assert "optimizer.pt" in line
    if damage == "a pickle with code":
        assert "not an optimizer state this project wrote" in line and "weights_only" not in line


@pytest.mark.parametrize(
    "flags, saved, now",
    [(["--seed", "7"], "seed 123", "7"), (["--batch-size", "8"], "batch_size 4", "8")],
    ids=["another seed", "another batch size"],
)
def test_resume_refuses_another_batch_order(world, tmp_path, capsys, flags, saved, now):
    run = run_copy(world, tmp_path)
    line = refused(capsys, "train", train_args(world, run, "--resume", "--max-steps", "4", *flags))
    assert "continues another batch order" in line and f"{saved} (now {now})" in line


def test_resume_refuses_another_corpus_with_the_same_tokenizer(world, tmp_path, capsys):
    tokenizer = tmp_path / "tok.json"
    BPETokenizer.train((world / "docs.txt").read_text(), 300).save(tokenizer)
    base = ["--tokenizer", str(tokenizer), "--out-dir", str(tmp_path / "r")]
    flags = [f for f in TINY if f not in ("--vocab-size", "300")]
    assert train.main([*flags, "--data", str(world / "docs.txt"), *base]) == 0
    (tmp_path / "other.txt").write_text((world / "docs.txt").read_text()[::-1])
    line = refused(
        capsys, "train", [*flags, "--data", str(tmp_path / "other.txt"), *base, "--resume"]
    )
    assert "continues another batch order: corpus" in line


# --- text that spells a special token -----------------------------------------------------------


def test_text_with_end_of_text_is_text(world, tmp_path, capsys):
    spam = "text,label\n" + "".join(
        f"a <|endoftext|> b {i},{'yes' if i % 2 else 'no'}\n" for i in range(40)
    )
    (tmp_path / "eot.csv").write_text(spam)
    base = ["--preset", "cpu-tiny", "--tokenizer", str(world / "tok.json"), "--device", "cpu",
            "--quiet", "--epochs", "1", "--too-long", "truncate"]  # fmt: skip
    out = tmp_path / "c"
    assert classify.main(["--data", str(tmp_path / "eot.csv"), *base, "--out-dir", str(out)]) == 0
    assert classify.main(["--predict", "<|endoftext|>", "--out-dir", str(out)]) == 0
    entries = [
        {"instruction": "Say <|endoftext|>.", "input": "<|endoftext|>", "output": "<|endoftext|>"}
    ] * 40
    (tmp_path / "eot.json").write_text(json.dumps(entries))
    argv = ["--data", str(tmp_path / "eot.json"), *base, "--max-new-tokens", "2", "--out-dir",
            str(tmp_path / "i")]  # fmt: skip
    assert instruct.main(argv) == 0
    for prompt in ("<|endoftext|>", ""):  # '' starts from end-of-text, as in src.generate
        out = tmp_path / f"t{len(prompt)}"
        assert train.main(train_args(world, out, "--sample-prompt", prompt)) == 0
        assert (out / "samples.txt").read_text().count("--- step") == 2
    capsys.readouterr()


# --- files that are not what they claim ----------------------------------------------------------

BAD_TABLES = {
    "ragged": (b"text,label\nhello,yes\nworld\n", "line 3 has 1 fields, the header 2"),
    "latin-1": ("text,label\ncaf\xe9,yes\n".encode("latin-1"), "is not UTF-8 text"),
    "binary": (bytes(range(256)) * 4, "is not UTF-8 text"),
    "empty label": (b"text,label\nhello,yes\nworld,\n", "row 2: the label is empty"),
    "header only": (b"text,label\n", "has a header but no rows"),
}


@pytest.mark.parametrize("kind", list(BAD_TABLES))
def test_classify_refuses_a_table_that_is_not_one(world, tmp_path, capsys, kind):
    data, message = BAD_TABLES[kind]
    (tmp_path / "t.csv").write_bytes(data)
    argv = ["--data", str(tmp_path / "t.csv"), "--out-dir", str(tmp_path / "o")]
    assert message in refused(capsys, "classify", argv)
    assert not (tmp_path / "o").exists()


def test_a_folder_as_data_is_refused(world, tmp_path, capsys):
    for command in ("classify", "instruct"):
        argv = ["--data", str(tmp_path), "--out-dir", str(tmp_path / "o")]
        assert str(tmp_path) in refused(capsys, command, argv)


def test_a_byte_order_mark_is_allowed(world, tmp_path):
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbf" + (world / "d.csv").read_bytes())
    assert classify.read_table(tmp_path / "bom.csv", "text", "label")[0] == ("red apple sea", "yes")


@pytest.mark.parametrize("data", [b"\xff\xfe binary", "caf\xe9".encode("latin-1"), b"[1, 2"])
def test_instruct_refuses_a_file_that_is_not_json_text(world, tmp_path, capsys, data):
    (tmp_path / "i.json").write_bytes(data)
    argv = ["--data", str(tmp_path / "i.json"), "--out-dir", str(tmp_path / "o")]
    assert "i.json" in refused(capsys, "instruct", argv)


def test_a_corrupt_tokenizer_file_is_one_line(world, tmp_path, capsys):
    (tmp_path / "tok.json").write_text('{"format": "byte-level-bpe", "tokens": [1, 2]}')
    flags = [f for f in TINY if f not in ("--vocab-size", "300")]
    argv = [*flags, "--data", str(world / "docs.txt"), "--tokenizer", str(tmp_path / "tok.json"),
            "--out-dir", str(tmp_path / "o")]  # fmt: skip
    assert "cannot read a tokenizer from" in refused(capsys, "train", argv)


# --- a full disk -----------------------------------------------------------------------------------


def test_a_full_disk_is_one_line_and_keeps_the_last_good_checkpoint(world, tmp_path, monkeypatch):
    from src.model import GPTConfig, GPTModel

    model = GPTModel(GPTConfig.from_preset("cpu-tiny", vocab_size=64, context_length=16))
    optimizer = torch.optim.AdamW(model.parameters())
    meta = {"step": 1, "config": model.cfg.to_dict()}
    save_checkpoint(tmp_path, model, optimizer, None, meta)
    real_open = open

    def full(path, mode="r", *args, **kwargs):
        if "w" in mode and "optimizer" in str(path):
            raise OSError(28, "No space left on device")  # ENOSPC, as the kernel says it
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", full)
    from src.errors import UserError

    with pytest.raises(UserError, match="no space left on the device while writing"):
        save_checkpoint(tmp_path, model, optimizer, None, dict(meta, step=2))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "latest",
        "step_0000001",
    ]


def test_a_second_ctrl_c_during_a_save_is_one_line(world, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # the second Ctrl-C, while the checkpoint is written

    monkeypatch.setattr(train, "save_checkpoint", interrupted)
    capsys.readouterr()
    assert train.main(train_args(world, tmp_path / "r")) == 130
    err = capsys.readouterr().err
    assert "interrupted; the last complete checkpoint is kept" in err and "Traceback" not in err
