"""The trainer: the library pieces against independent references, and the CLI end to end.

The CLI runs train a tiny model (``cpu-tiny``, context 32) for a few steps on a slice of Python's
documentation with a 300-token BPE tokenizer, in a private cache folder.
"""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from src import train as train_cli
from src.checkpoints import (
    find_checkpoint,
    load_model,
    load_optimizer,
    load_weights,
    save_checkpoint,
)
from src.cli import read_jsonl
from src.data import GPTDataset
from src.errors import NonFiniteLossError, UserError
from src.model import GPTConfig, GPTModel
from src.training import Schedule, adamw, check_finite, cross_entropy, perplexity

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster
TINY = ["--preset", "cpu-tiny", "--vocab-size", "300", "--context-length", "32",
        "--batch-size", "4", "--eval-iters", "2", "--warmup-steps", "2", "--lr", "3e-3"]  # fmt: skip


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """~40 KB of real English and code: the start of Python's documentation topics."""
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    text = "\n\n".join(topics[k] for k in sorted(topics))[:40_000]
    path = tmp_path_factory.mktemp("corpus") / "docs.txt"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    """Subprocess environment: a private cache, one thread per process (deterministic, and kind
    to a shared machine)."""
    cache = tmp_path_factory.mktemp("cache")
    return dict(os.environ, GPT_CACHE_DIR=str(cache), OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


def run_cli(args: list[str], env: dict, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "src.train", *args], cwd=REPO, env=env,
        capture_output=True, text=True, timeout=300, **kw,
    )  # fmt: skip


def metrics(out_dir: Path) -> list[dict]:
    return read_jsonl(out_dir / "metrics.jsonl")


def losses_by_step(out_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train_loss"] for r in metrics(out_dir) if r["step"] > 0}


# --- the library ---------------------------------------------------------------------------


def test_cross_entropy_and_perplexity_match_their_definitions():
    logits = torch.randn(2, 5, 11, dtype=torch.float64)
    targets = torch.randint(0, 11, (2, 5))
    log_probs = torch.log_softmax(logits, dim=-1)
    expected = -log_probs.gather(-1, targets[..., None]).mean()
    torch.testing.assert_close(cross_entropy(logits, targets).double(), expected)
    # A uniform guess over V tokens has loss log V and perplexity V.
    uniform = cross_entropy(torch.zeros(1, 3, 50), torch.zeros(1, 3, dtype=torch.long))
    assert perplexity(uniform.item()) == pytest.approx(50, rel=1e-5)


def test_schedule_warmup_cosine_and_constant():
    lr, min_lr, warmup, total = 1e-3, 1e-4, 10, 110
    schedule = Schedule(lr, min_lr, warmup, total)
    got = [schedule(s) for s in range(total + 5)]
    assert got[:warmup] == pytest.approx([lr * (s + 1) / warmup for s in range(warmup)])
    assert got[warmup] == pytest.approx(lr)  # the peak, right after warmup
    assert got[warmup + 50] == pytest.approx((lr + min_lr) / 2)  # halfway down the cosine
    assert got[total:] == pytest.approx([min_lr] * 5)
    assert all(a >= b for a, b in zip(got[warmup:], got[warmup + 1 :], strict=False))
    # Independent reference: PyTorch's own cosine annealing over the post-warmup steps.
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total - warmup, eta_min=min_lr)
    ref = []
    for _ in range(total - warmup):
        ref.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert got[warmup:total] == pytest.approx(ref, rel=1e-6)
    assert {Schedule(4e-4, 4e-4, 0, 90)(s) for s in range(90)} == {4e-4}  # constant


def test_adamw_decays_matrices_only():
    model = GPTModel(GPTConfig.from_preset("cpu-tiny"))
    opt = adamw(model, lr=1e-3, weight_decay=0.1)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert no_decay_names and all(n.endswith(("bias", "scale", "shift")) for n in no_decay_names)
    assert {"tok_emb.weight", "pos_emb.weight", "out_head.weight"} <= decay_names
    assert len(no_decay_names) + len(decay_names) == len(list(model.parameters()))


def test_check_finite_names_the_step():
    check_finite(torch.tensor(1.5), 3)
    with pytest.raises(NonFiniteLossError, match="at step 7"):
        check_finite(torch.tensor(float("nan")), 7)


def _model_and_optimizer():
    model = GPTModel(GPTConfig.from_preset("cpu-tiny", vocab_size=64, context_length=16))
    opt = adamw(model, 1e-3, 0.1)
    model(torch.randint(0, 64, (2, 16))).sum().backward()
    opt.step()
    return model, opt


def test_checkpoint_round_trip(tmp_path):
    model, opt = _model_and_optimizer()
    meta = {"step": 5, "config": model.cfg.to_dict(), "tokenizer": {"ref": "x", "fingerprint": "y"}}
    save_checkpoint(tmp_path, model, opt, None, meta)
    ckpt = find_checkpoint(tmp_path)
    assert ckpt.name == "step_0000005"
    fresh, fresh_opt = _model_and_optimizer()
    load_weights(ckpt, fresh)
    load_optimizer(ckpt, fresh_opt)
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    exp_avg = [s["exp_avg"] for s in opt.state_dict()["state"].values()]
    fresh_avg = [s["exp_avg"] for s in fresh_opt.state_dict()["state"].values()]
    for a, b in zip(exp_avg, fresh_avg, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_checkpoint_with_the_old_feedforward_names_still_loads(tmp_path):
    """FeedForward's layers were once ``ff.layers.0`` and ``ff.layers.2``; such weights load into
    ``ff.fc`` and ``ff.proj`` unchanged."""
    from safetensors.torch import load_file, save_file

    model, opt = _model_and_optimizer()
    save_checkpoint(tmp_path, model, opt, None, {"step": 1, "config": model.cfg.to_dict()})
    path = find_checkpoint(tmp_path) / "model.safetensors"
    old = {k.replace(".ff.fc.", ".ff.layers.0.").replace(".ff.proj.", ".ff.layers.2."): v
           for k, v in load_file(path).items()}  # fmt: skip
    assert "trf_blocks.0.ff.layers.2.weight" in old
    save_file(old, path)
    fresh, _ = _model_and_optimizer()
    load_weights(find_checkpoint(tmp_path), fresh)
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_checkpoint_write_killed_midway_keeps_last_good(tmp_path, monkeypatch):
    model, opt = _model_and_optimizer()
    meta = {"step": 1, "config": model.cfg.to_dict()}
    save_checkpoint(tmp_path, model, opt, None, meta)
    good = {k: v.clone() for k, v in model.state_dict().items()}

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # as if the process died while writing the optimizer state

    monkeypatch.setattr(torch, "save", killed)
    with torch.no_grad():
        model.tok_emb.weight.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, model, opt, None, dict(meta, step=2))
    ckpt = find_checkpoint(tmp_path)
    assert ckpt.name == "step_0000001"
    restored, _ = _model_and_optimizer()
    load_weights(ckpt, restored)
    torch.testing.assert_close(restored.tok_emb.weight, good["tok_emb.weight"], rtol=0, atol=0)


def test_optimizer_state_is_loaded_without_pickle_code(tmp_path):
    model, opt = _model_and_optimizer()
    save_checkpoint(tmp_path, model, opt, None, {"step": 1, "config": model.cfg.to_dict()})
    ckpt = find_checkpoint(tmp_path)
    # A file that would run code when unpickled: weights_only loading refuses it.
    torch.save({"state": {}, "param_groups": [], "payload": Path("/")}, ckpt / "optimizer.pt")
    with pytest.raises(
        UserError, match="not an optimizer state this project wrote.*never unpickled"
    ):
        load_optimizer(ckpt, opt)


# --- the CLI -------------------------------------------------------------------------------


def test_cli_end_to_end(tmp_path, corpus, capsys, private_cache):
    out = tmp_path / "run"
    code = train_cli.main([*TINY, "--data", str(corpus), "--max-steps", "30", "--eval-interval",
                           "10", "--out-dir", str(out)])  # fmt: skip
    assert code == 0
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(31))
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 10, 20, 30]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.0  # it learns
    assert evals[-1]["val_perplexity"] == pytest.approx(math.exp(evals[-1]["val_loss"]))
    assert all(r["tokens_per_sec"] > 0 and r["lr"] > 0 for r in rows[1:])
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "samples.txt").read_text().count("--- step") == 4
    model, tokenizer, meta = load_model(out, torch.device("cpu"))
    assert meta["step"] == 30 and tokenizer.n_vocab == 300 == model.cfg.vocab_size
    assert "final validation loss" in capsys.readouterr().err


def test_the_llama_style_preset_trains_resumes_and_writes(tmp_path, corpus, capsys, private_cache):
    from src import generate

    out = tmp_path / "llama"
    args = ["--preset", "cpu-llama", *TINY[2:], "--data", str(corpus), "--eval-interval", "4",
            "--eval-iters", "1", "--out-dir", str(out)]  # fmt: skip
    assert train_cli.main([*args, "--max-steps", "4"]) == 0
    assert train_cli.main([*args, "--max-steps", "6", "--resume"]) == 0
    model, _, meta = load_model(out, torch.device("cpu"))
    assert meta["step"] == 6 and model.pos_emb is None and model.cfg.kv_heads == 2
    assert "pos_emb.weight" not in model.state_dict()  # rotary positions: no table to save
    capsys.readouterr()
    assert (
        generate.main(["--checkpoint", str(out), "--prompt", "The", "--max-new-tokens", "5"]) == 0
    )
    assert capsys.readouterr().out.startswith("The")


def _interrupt(out: Path, args: list[str], env: dict, sig: int, after_step: int) -> int:
    """Start a run, send ``sig`` once it has logged ``after_step``; its exit code."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "src.train", *args], cwd=REPO, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        path = out / "metrics.jsonl"
        if path.exists() and any(r["step"] >= after_step for r in metrics(out)):
            break
        time.sleep(0.05)
    proc.send_signal(sig)
    return proc.wait(timeout=120)


def resume_args(corpus: Path) -> list[str]:
    # Dropout on, so the resumed run must also restore the random-number state.
    return [*TINY, "--data", str(corpus), "--dropout", "0.1", "--max-steps", "24",
            "--eval-interval", "4"]  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, corpus, env) -> dict[int, float]:
    out = tmp_path_factory.mktemp("full")
    assert run_cli([*resume_args(corpus), "--out-dir", str(out)], env).returncode == 0
    return losses_by_step(out)


# Windows has no SIGKILL; there Popen's SIGTERM is the hard kill (TerminateProcess). Nor can it
# send a child Ctrl-C, so that case runs on POSIX only.
CTRL_C = pytest.param(
    signal.SIGINT,
    id="ctrl-c",
    marks=pytest.mark.skipif(sys.platform == "win32", reason="Windows cannot send a child Ctrl-C"),
)
KILL_9 = pytest.param(getattr(signal, "SIGKILL", signal.SIGTERM), id="kill-9")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [CTRL_C, KILL_9])
def test_resume_reproduces_uninterrupted_losses(tmp_path, corpus, env, uninterrupted, sig):
    args = [*resume_args(corpus), "--out-dir", str(tmp_path)]
    code = _interrupt(tmp_path, args, env, sig, after_step=5)
    # Ctrl-C saves and exits 130, so that a script can tell a stopped run from a finished one.
    assert code == 130 or sig != signal.SIGINT
    stopped_at = json.loads((find_checkpoint(tmp_path) / "checkpoint.json").read_text())["step"]
    assert 4 <= stopped_at < 24  # it really was interrupted mid-run
    res = run_cli([*args, "--resume"], env)
    assert res.returncode == 0, res.stderr
    assert f"resuming at step {stopped_at}" in res.stderr
    assert losses_by_step(tmp_path) == uninterrupted  # exactly, step by step
    assert [r["step"] for r in metrics(tmp_path)] == list(range(25))


@pytest.mark.slow
def test_eager_and_fused_training_losses_match(tmp_path, corpus, capsys, env, monkeypatch):
    from src import fused_softmax

    reason = fused_softmax.unavailable_reason()  # built, or found built, in the usual cache
    if reason is not None:
        pytest.skip(f"fused softmax extension unavailable: {reason}")
    monkeypatch.setenv("GPT_CACHE_DIR", env["GPT_CACHE_DIR"])  # the data in this module's cache
    args = [*TINY, "--data", str(corpus), "--max-steps", "8", "--eval-interval", "8"]
    eager, fused = tmp_path / "eager", tmp_path / "fused"
    assert train_cli.main([*args, "--attn-impl", "eager", "--out-dir", str(eager)]) == 0
    assert train_cli.main([*args, "--fused-attention", "--out-dir", str(fused)]) == 0
    assert "attention fused" in capsys.readouterr().err
    a, b = losses_by_step(eager), losses_by_step(fused)
    assert a.keys() == b.keys()
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_ddp_two_processes_match_one(tmp_path, corpus, env):
    args = [*TINY, "--data", str(corpus), "--max-steps", "6", "--eval-interval", "6",
            "--device", "cpu"]  # fmt: skip
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    assert run_cli([*args, "--out-dir", str(single)], env).returncode == 0
    res = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "src.train", *args, "--grad-accum", "2", "--out-dir", str(ddp)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "2 process(es)" in res.stderr
    a, b = losses_by_step(single), losses_by_step(ddp)
    assert a.keys() == b.keys() == set(range(1, 7))
    # Same global batch of 4: two processes x two micro-batches of one sequence each, against
    # one process with one batch of four. The averaged gradients differ only by rounding.
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5)
    val = [[r["val_loss"] for r in metrics(d) if "val_loss" in r] for d in (single, ddp)]
    assert val[1] == pytest.approx(val[0], rel=1e-5)  # evaluation sees the same windows too
    assert len(list((ddp / "checkpoints").glob("step_*"))) == 1  # rank 0 alone writes


# --- guard rails: one clear line and a non-zero exit ---------------------------------------


def _error(capsys, argv: list[str]) -> tuple[int, str]:
    code = train_cli.main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return code, lines[0]


@pytest.fixture
def private_cache(env, monkeypatch):
    monkeypatch.setenv("GPT_CACHE_DIR", env["GPT_CACHE_DIR"])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--preset", "gpt5"], "unknown preset 'gpt5'; valid presets: gpt2-small, "),
        (["--context-length", "65"], "longer than the model's: preset cpu-tiny has context_length 64"),
        (["--batch-size", "4000"], "larger than the data"),
        (["--batch-size", "6", "--grad-accum", "4"], "multiple of processes x --grad-accum"),
    ],
    ids=["unknown-preset", "context-too-long", "batch-larger-than-data", "batch-not-divisible"],
)  # fmt: skip
def test_impossible_settings_fail_before_work(
    tmp_path, corpus, capsys, private_cache, extra, message
):
    code, line = _error(capsys, [*TINY, "--data", str(corpus), "--out-dir", str(tmp_path), *extra])
    assert code != 0 and message in line
    assert not (tmp_path / "metrics.jsonl").exists()


def test_cuda_requested_but_absent(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    code, line = _error(capsys, [*TINY, "--device", "cuda", "--out-dir", str(tmp_path)])
    assert code != 0 and "no CUDA device" in line


def test_resume_with_another_config_or_tokenizer(tmp_path, corpus, capsys, private_cache):
    base = [*TINY, "--data", str(corpus), "--max-steps", "2", "--out-dir", str(tmp_path)]
    assert train_cli.main(base) == 0
    capsys.readouterr()
    code, line = _error(capsys, [*base, "--resume", "--dropout", "0.2"])
    assert code != 0 and "another config: drop_rate=0.0 (now 0.2)" in line
    code, line = _error(capsys, [*base, "--resume", "--vocab-size", "290"])
    assert code != 0 and "another config: vocab_size=300 (now 290)" in line
    # Same size, different merges: a tokenizer trained on other text.
    other = tmp_path / "other.txt"
    other.write_text(corpus.read_text()[::-1])
    code, line = _error(capsys, [*base, "--resume", "--data", str(other)])
    assert code != 0 and "another tokenizer" in line
    code, line = _error(capsys, [*base[:-1], str(tmp_path / "nothing"), "--resume"])
    assert code != 0 and "no checkpoint" in line


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_last_good(tmp_path, corpus, capsys, private_cache):
    # A huge learning rate blows the weights up within a few steps (step 5 here).
    args = [*TINY, "--data", str(corpus), "--max-steps", "50", "--save-interval", "1",
            "--warmup-steps", "0", "--grad-clip", "0", "--lr", "1e4", "--out-dir", str(tmp_path)]  # fmt: skip
    code, line = _error(capsys, args)
    assert code != 0 and re.search(r"loss is (nan|inf) at step \d+", line)
    bad_step = int(line.split("at step ")[1].split(";")[0])
    ckpt = find_checkpoint(tmp_path)
    good_step = json.loads((ckpt / "checkpoint.json").read_text())["step"]
    assert good_step == bad_step - 1  # every step before the bad one was saved (interval 1)
    model, _, _ = load_model(tmp_path, torch.device("cpu"))
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.slow
def test_the_trainer_takes_the_minimal_loops_steps(tmp_path, corpus, capsys, private_cache):
    """The production trainer is the chapter's 28-line loop plus what a run needs: with a constant
    rate, no accumulation and no dropout it must take exactly the same steps."""
    flags = [*TINY, "--data", str(corpus), "--max-steps", "30", "--eval-interval", "30",
             "--min-lr", "3e-3", "--warmup-steps", "0", "--out-dir", str(tmp_path)]  # fmt: skip
    assert train_cli.main(flags) == 0
    args = train_cli.build_parser().parse_args(flags)
    _, tokenizer, _, train_tokens, val_tokens = train_cli.load_data(args)
    cfg = train_cli.build_config(args, tokenizer.n_vocab)
    torch.manual_seed(args.seed)
    model = GPTModel(cfg)
    train_set, val_set = (GPTDataset(t, cfg.context_length, cfg.context_length)
                          for t in (train_tokens, val_tokens))  # fmt: skip
    losses = train_cli.train_minimal(model, train_set, val_set, 30, 4, lr=3e-3, seed=args.seed)
    trainer = losses_by_step(tmp_path)
    # The trainer sums the gradient norm over the optimizer's parameter groups, the loop over the
    # model's parameters: another order, so the clipping factor, and then the losses, differ in the
    # sixth digit after a few dozen steps. A different step would differ in the first.
    assert losses == pytest.approx([trainer[s] for s in range(1, 31)], rel=1e-5)
    assert losses[-1] < losses[0] - 1.0  # and it learns


def test_help_explains_every_flag():
    parser = train_cli.build_parser()
    for action in parser._actions:
        assert action.help, action.option_strings
    res = subprocess.run([sys.executable, "-m", "src.train", "--help"], cwd=REPO,
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))  # fmt: skip
    assert res.returncode == 0 and "--fused-attention" in res.stdout and "default" in res.stdout
