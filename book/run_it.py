"""The book's "Run it" outputs: what each chapter's code prints when you run it.

The library chapters (tokens, batches, attention, the model, the modern LLM, LoRA) have no command
line of their own, so this script holds one short demo per chapter; the page embeds the demo's code
by name and then its output. The chapters with a command (classification, scaling out, generating) get the real
command, run as a subprocess; the page shows the command line and what it printed. Generating needs
the default run's checkpoint (``uv run python -m src.train`` makes it). Either way the output is written to
``docs/assets/run-it/<chapter>.md``, which the page includes unchanged:

    uv run python book/run_it.py                # every chapter, about a minute on a laptop CPU
    uv run python book/run_it.py tokens model   # some

The outputs repeat exactly from run to run: fixed seeds, one thread, and nothing that depends on the
moment or the machine's folders (the commands' timings become "…", temporary folders are dropped from
paths, the home folder is written ``~``). ``tests/test_run_it.py`` regenerates them and requires the
committed files.
"""

import contextlib
import copy
import csv
import io
import json
import math
import os
import random
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere
from src import flash_attention, fused_softmax
from src.attention import KVCache, MultiHeadAttention, causal_mask, causal_softmax
from src.cli import Parser
from src.data import (
    GPTDataset,
    load_corpus,
    split_tokens,
    step_batch,
    tokenize_cached,
    train_tokenizer_cached,
)
from src.files import cache_dir
from src.finetune import set_trainable
from src.generate import generate
from src.llama import config_from_hf, load_llama_state_dict
from src.lora import apply_lora, lora_parameter_count
from src.model import PRESETS, GPTConfig, GPTModel, count_parameters, kv_cache_bytes
from src.tokenizer import BPETokenizer
from src.training import cross_entropy

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "docs" / "assets" / "run-it"


# ---------------------------------------------------------------------------------------------
# Library chapters: a demo each, run in this process; what it prints is the output.


# --8<-- [start:tokens]
def tokens() -> None:
    """Train the BPE of the default run, encode a sentence, and decode it back."""
    corpus = load_corpus()
    print(f"corpus: {corpus.name}, {len(corpus.text):,} characters")
    print(f"corpus sha256 {corpus.fingerprint[:16]}")
    tokenizer = train_tokenizer_cached(corpus, 8192, cache_dir())  # cached after one run
    merges = len(tokenizer.mergeable_ranks) - 256
    print(f"vocabulary: {tokenizer.n_vocab:,} = 256 bytes + {merges:,} merges + 1 special")
    print("first merges:", [tokenizer.decode([rank]) for rank in range(256, 266)])

    text = 'The tokenizer splits "unfathomable" into pieces it knows.'
    ids = tokenizer.encode(text)
    print(f"\n{text}\n\n   id  piece")
    for i in ids:
        print(f"{i:5d}  {tokenizer.decode([i])!r}")
    print("\ndecode(encode(text)) == text:", tokenizer.decode(ids) == text)
    everything = tokenize_cached(corpus, tokenizer, cache_dir())
    ratios = len(text) / len(ids), len(corpus.text) / len(everything)
    print("characters per token: {:.2f} in this sentence, {:.2f} in the corpus".format(*ratios))


# --8<-- [end:tokens]


# --8<-- [start:batches]
def batches() -> None:
    """The default corpus as token ids, split by position, and one batch of inputs and targets."""
    corpus = load_corpus()
    tokenizer = train_tokenizer_cached(corpus, 8192, cache_dir())
    tokens = tokenize_cached(corpus, tokenizer, cache_dir())
    print(f"corpus: {corpus.name}, {len(corpus.text):,} characters")
    print(f"corpus sha256 {corpus.fingerprint[:16]}")
    print(f"tokens: {len(tokens):,} ({tokens.dtype})")
    train, val = split_tokens(tokens, val_fraction=0.1)
    print(f"split by position: {len(train):,} training, then {len(val):,} validation tokens")

    windows = GPTDataset(train, context_length=8, stride=8)
    print(f"windows of 8 tokens: {len(windows):,}, {len(windows) // 2:,} steps of 2 per epoch")
    x, y = windows.batch(step_batch(0, len(windows), batch_size=2, seed=0))  # step 0: (2, 8) each
    print(f"one batch: inputs {tuple(x.shape)}, targets {tuple(y.shape)}")

    def piece(i: int) -> str:
        return f"{i:5d} {tokenizer.decode([i])!r:12}"  # the id and its text

    for row in range(2):
        print(f"\nsequence {row}  input  {tokenizer.decode(x[row].tolist())!r}")
        print(f"            target {tokenizer.decode(y[row].tolist())!r}")
        print("  t  input                target")
        for t in range(8):
            print(f"  {t}  {piece(x[row, t].item())} -> {piece(y[row, t].item())}")


# --8<-- [end:batches]


# --8<-- [start:attention]
def attention() -> None:
    """One attention layer on six tokens: a head's weights, and the three paths side by side."""
    words = ["The", " cat", " sat", " on", " the", " mat"]
    T, d, H = len(words), 16, 2  # tokens, width, heads
    x = torch.randn(1, T, d)  # random stand-ins for the tokens' embeddings  (B, T, d)
    mha = MultiHeadAttention(d, d, context_length=T, n_heads=H, attn_impl="eager")

    # Head 0's weights, computed as attend() computes them.
    with torch.no_grad():
        q = mha.W_query(x).view(1, T, H, d // H).transpose(1, 2)  # (B, H, T, hd)
        k = mha.W_key(x).view(1, T, H, d // H).transpose(1, 2)  # (B, H, T, hd)
        scores = q @ k.transpose(-2, -1)  # (B, H, T, T)
        weights = causal_softmax(scores, (d // H) ** -0.5, causal_mask(T))
    print("head 0's weights (row: a query token; columns: the tokens it sees)")
    print(" " * 7 + "".join(f"{w!r:>8}" for w in words) + "   row sum")
    for t, row in enumerate(weights[0, 0].tolist()):
        cells = "".join(f"{w:8.3f}" if s <= t else " " * 8 for s, w in enumerate(row))
        print(f"{words[t]!r:>7}{cells}{sum(row):10.3f}")

    with torch.no_grad():
        out = mha(x)
        print(f"\noutput: {tuple(out.shape)}, the input's shape (B, T, d)")
        for impl in ("sdpa", "fused"):
            other = MultiHeadAttention(d, d, T, H, attn_impl=impl)
            other.load_state_dict(mha.state_dict())  # the same weights, another path
            difference = (other(x) - out).abs().max().item()
            print(f"max |{impl} - eager| = {difference:.1e}")
    reason = fused_softmax.unavailable_reason()  # None once our kernel is built and loaded
    print("fused path:", f"the eager fallback ({reason})" if reason else "our kernel")


# --8<-- [end:attention]


# --8<-- [start:flash]
def flash() -> None:
    """Flash attention beside the eager path: one call with grouped heads, then a whole model."""
    flash_attention.ensure_available()  # build, or load from the cache, the library of csrc/
    B, H, H_kv, T, D = 1, 4, 2, 200, 32  # four query heads share two key/value heads
    q = torch.randn(B, H, T, D)
    k, v = torch.randn(B, H_kv, T, D), torch.randn(B, H_kv, T, D)
    out, lse = torch.ops.gpt_flash.causal_attention(q, k, v, D**-0.5)
    kr, vr = (t.repeat_interleave(H // H_kv, dim=1) for t in (k, v))  # one k/v head per q head
    eager = causal_softmax(q @ kr.transpose(-2, -1), D**-0.5, causal_mask(T)) @ vr
    print(f"out {tuple(out.shape)} and lse {tuple(lse.shape)}: all the forward keeps")
    print(f"max |flash - eager| = {(out - eager).abs().max().item():.1e}")
    print(
        f"numbers kept for the backward: {out.numel() + lse.numel():,} (the weights: {B * H * T * T:,})"
    )
    print(f"out is (B, T, H, D) in memory, so merging the heads is free: "
          f"{out.transpose(1, 2).is_contiguous()}")  # fmt: skip

    cfg = GPTConfig.from_preset("cpu-tiny")
    models = {
        i: GPTModel(GPTConfig.from_preset("cpu-tiny", attn_impl=i)) for i in ("eager", "flash")
    }
    models["flash"].load_state_dict(models["eager"].state_dict())
    idx = torch.randint(0, cfg.vocab_size, (2, cfg.context_length))
    with torch.no_grad():
        logits = {impl: m(idx) for impl, m in models.items()}
    print(f"\ncpu-tiny logits {tuple(logits['flash'].shape)}: "
          f"max |flash - eager| = {(logits['flash'] - logits['eager']).abs().max().item():.1e}")  # fmt: skip


# --8<-- [end:flash]


# --8<-- [start:model]
def model() -> None:
    """Every preset's size, and an untrained model's loss."""
    line = "{:12}{:>7}{:>8}{:>15}{:>15}{:>9}{:>9}".format
    print(line("preset", "layers", "emb_dim", "parameters", "if tied", "fp32 MB", "if tied"))
    for name, cfg in PRESETS.items():
        with torch.device("meta"):  # shapes without storage: even gpt2-xl builds at once
            models = [GPTModel(GPTConfig.from_preset(name, tie_weights=t)) for t in (False, True)]
        counts = [count_parameters(m) for m in models]
        sizes = [f"{4 * n / 1e6:,.0f}" for n in counts]  # 4 bytes per float32 parameter
        print(line(name, cfg.n_layers, cfg.emb_dim, *(f"{n:,}" for n in counts), *sizes))

    print("\nan untrained model guesses almost uniformly: its loss is near ln(vocab_size)")
    for name in ("cpu-tiny", "cpu-small"):
        cfg = GPTConfig.from_preset(name)
        net = GPTModel(cfg).eval()
        ids = torch.randint(cfg.vocab_size, (4, cfg.context_length))  # (B, T) random tokens
        with torch.no_grad():
            logits = net(ids)  # (B, T, vocab_size)
        loss = cross_entropy(logits[:, :-1], ids[:, 1:]).item()  # next-token targets
        print(f"{name:10} loss {loss:.3f}   ln({cfg.vocab_size}) = {math.log(cfg.vocab_size):.3f}")


# --8<-- [end:model]


# --8<-- [start:lora]
def lora() -> None:
    """What LoRA trains in GPT-2 small, rank by rank, and what it changes at the start: nothing."""
    gpt2_small = GPTConfig.from_preset("gpt2-small", qkv_bias=True, tie_weights=True)
    line = "{:16}{:>13}{:>10}{:>16}{:>12}".format
    print(line("trained", "parameters", "share", "AdamW numbers", "fp32 MB"))
    with torch.device("meta"):  # shapes without storage
        total = count_parameters(GPTModel(gpt2_small))
    print(
        line(
            "everything", f"{total:,}", "100%", f"{2 * total / 1e6:,.0f}M", f"{4 * total / 1e6:.0f}"
        )
    )
    for rank in (4, 8, 16, 64):
        with torch.device("meta"):
            model = GPTModel(gpt2_small)
            set_trainable(model, "lora", lora_rank=rank, lora_alpha=rank)
        n = lora_parameter_count(model)  # AdamW keeps two numbers per trained parameter
        print(line(f"LoRA, rank {rank}", f"{n:,}", f"{100 * n / total:.2f}%", f"{2 * n / 1e6:.1f}M",
                   f"{4 * n / 1e6:.1f}"))  # fmt: skip

    base = GPTModel(GPTConfig.from_preset("cpu-tiny")).eval()
    wrapped = copy.deepcopy(base)
    apply_lora(wrapped, rank=4, alpha=4)
    ids = torch.randint(base.cfg.vocab_size, (2, 16))  # (B, T)
    with torch.no_grad():
        change = (wrapped(ids) - base(ids)).abs().max().item()
    print(f"\ncpu-tiny wrapped at rank 4: largest change in the logits at the start {change:.1e}")


# --8<-- [end:lora]


# --8<-- [start:modern]
def random_hf_models() -> dict[str, torch.nn.Module]:
    """One small random model per family, built by transformers offline: grouped heads and a tied
    head (Llama), one key/value head (Qwen2), a head size of its own (Qwen3)."""
    import transformers as hf

    common = dict(num_hidden_layers=2, vocab_size=101, max_position_embeddings=48, hidden_size=64,
                  num_attention_heads=4, initializer_range=0.2, attn_implementation="eager")  # fmt: skip
    specs = {
        "Llama, 2 key/value heads, tied": hf.LlamaForCausalLM(hf.LlamaConfig(**common,
            intermediate_size=100, num_key_value_heads=2, tie_word_embeddings=True,
            rope_theta=1e4)),
        "Qwen2, 1 key/value head, untied": hf.Qwen2ForCausalLM(hf.Qwen2Config(**common,
            intermediate_size=150, num_key_value_heads=1, tie_word_embeddings=False,
            rope_theta=1e6)),
        "Qwen3, head size 32 on width 64": hf.Qwen3ForCausalLM(hf.Qwen3Config(**common,
            intermediate_size=90, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True,
            rope_theta=1e6)),
    }  # fmt: skip
    with torch.no_grad():  # norms at 1 and biases at 0 would hide a mix-up
        for model in specs.values():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return {name: model.eval() for name, model in specs.items()}


def modern() -> None:
    """Our model against transformers' Llama, Qwen2 and Qwen3 on every attention path, greedy
    decoding with our KV cache against their generate, and what grouped heads save in the cache."""
    print("max |our logits - transformers'|, float32, 3 random sequences of 48 tokens")
    print(f"{'model':34}{'eager':>9}{'fused':>9}{'sdpa':>9}{'largest logit':>15}"
          "  greedy, 30 tokens")  # fmt: skip
    for name, ref in random_hf_models().items():
        idx = torch.randint(0, 101, (3, 48))  # (B, T)
        with torch.no_grad():
            expected = ref(idx).logits  # (B, T, vocab_size)
        diffs = []
        for impl in ("eager", "fused", "sdpa"):
            ours = GPTModel(config_from_hf(ref.config, attn_impl=impl)).eval()
            load_llama_state_dict(ours, ref.state_dict())
            with torch.no_grad():
                diffs.append((ours(idx) - expected).abs().max().item())
        prompt = torch.tensor([[5, 17, 42, 99, 3]])
        eos = ref.generation_config.eos_token_id  # both stop at the model's end-of-text token
        got = generate(ours, prompt, max_new_tokens=30, context_length=48, eos_id=eos)
        want = ref.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=30,
                            do_sample=False, pad_token_id=0)  # fmt: skip
        same = f"all {got.shape[1] - 5} equal" if torch.equal(got, want) else "DIFFERENT"
        print(f"{name:34}" + "".join(f"{d:9.1e}" for d in diffs)
              + f"{expected.abs().max().item():15.1f}  {same}")  # fmt: skip

    print("\nKV cache of one sequence in bf16: grouped (GQA), and with a key/value head per query "
          "head (MHA)")  # fmt: skip
    print(f"{'preset':14}{'layers x heads / kv x size':>28}{'per token':>12}{'if MHA':>12}"
          f"{'context':>9}{'full context':>14}{'if MHA':>13}")  # fmt: skip
    for name in ("gpt2-small", "smollm2-135m", "qwen2.5-0.5b", "qwen3-0.6b", "cpu-llama"):
        cfg, mha = PRESETS[name], replace(PRESETS[name], n_kv_heads=None)
        shape = f"{cfg.n_layers} x {cfg.n_heads} / {cfg.kv_heads} x {cfg.head_size}"
        sizes = [kv_cache_bytes(c, n) for n in (1, cfg.context_length) for c in (cfg, mha)]
        print(f"{name:14}{shape:>28}{sizes[0] / 2**10:>8.1f} KiB{sizes[1] / 2**10:>8.1f} KiB"
              f"{cfg.context_length:>9,}" + "".join(f"{s / 2**20:>10,.1f} MiB" for s in sizes[2:]))  # fmt: skip

    for cfg in (PRESETS["cpu-llama"], replace(PRESETS["cpu-llama"], n_kv_heads=None)):
        model = GPTModel(cfg).eval()
        cache = [KVCache() for _ in model.trf_blocks]
        with torch.no_grad():
            model(torch.zeros(1, cfg.context_length, dtype=torch.long), kv_cache=cache)
        held = sum(c.k.nbytes + c.v.nbytes for c in cache)  # what the cache's tensors really hold
        print(f"cpu-llama, {cfg.kv_heads} key/value heads, float32, after {cfg.context_length} "
              f"tokens: the cache holds {held:,} bytes, the formula says "
              f"{kv_cache_bytes(cfg, cfg.context_length, bytes_per_value=4):,}")  # fmt: skip


# --8<-- [end:modern]


def captured(demo: Callable[[], None]) -> str:
    """What ``demo`` prints, run from the same seed and on one thread every time."""
    torch.manual_seed(0)
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        demo()
    lines = [line.rstrip() for line in buffer.getvalue().splitlines()]  # no trailing blanks
    return "```text\n" + "\n".join(lines) + "\n```\n"


# ---------------------------------------------------------------------------------------------
# Command chapters: the real command line, run as a subprocess.

# --8<-- [start:keyword_data]
WORDS = "red blue green cat dog sun moon tree car road sky sea".split()


def write_keyword_data(folder: Path) -> None:
    """400 short texts of random words; half hold the word "apple", and are labelled yes."""
    rng = random.Random(0)
    rows = []
    for i in range(400):
        words = rng.choices(WORDS, k=rng.randint(4, 9))
        if i % 2:
            words.insert(rng.randrange(len(words) + 1), "apple")
        rows.append((" ".join(words), "yes" if i % 2 else "no"))
    with open(folder / "keyword.csv", "w", newline="") as f:
        csv.writer(f).writerows([("text", "label"), *rows])
    # A tokenizer trained on these texts: GPT-2's would do too, but it needs a download.
    BPETokenizer.train(" ".join(text for text, _ in rows), vocab_size=280).save(
        folder / "tokenizer.json"
    )


# --8<-- [end:keyword_data]


def classification(tmp: Path) -> str:
    write_keyword_data(tmp)
    head = (tmp / "keyword.csv").read_text().splitlines()[:5]
    out = str(tmp / "runs" / "keyword")
    train = [
        "-m", "src.classify", "--data", str(tmp / "keyword.csv"), "--preset", "cpu-tiny",
        "--tokenizer", str(tmp / "tokenizer.json"), "--trainable", "all", "--epochs", "6",
        "--batch-size", "16", "--lr", "3e-3", "--min-lr", "1e-4", "--warmup-steps", "10",
        "--split", "0.7,0.2,0.1", "--device", "cpu",
        "--out-dir", out,
    ]  # fmt: skip
    predict = ["-m", "src.classify", "--out-dir", out, "--device", "cpu"]
    for text in ("sun apple road", "sun moon road", "red car by the sea", "a red car by the sea"):
        predict += ["--predict", text]
    return (
        "```text\n$ head -5 keyword.csv\n"
        + "\n".join(head)
        + "\n"
        + command([sys.executable, *train], tmp)
        + command([sys.executable, *predict], tmp)
        + "```\n"
    )


def scaling_out(tmp: Path) -> str:
    # Train the tokenizer before the processes start: both would otherwise train it at once.
    corpus = load_corpus()
    tokenize_cached(corpus, train_tokenizer_cached(corpus, 1024, cache_dir()), cache_dir())
    flags = [
        "-m", "src.train", "--preset", "cpu-tiny", "--vocab-size", "1024", "--batch-size", "8",
        "--lr", "3e-3", "--warmup-steps", "5", "--max-steps", "30", "--eval-interval", "10",
        "--device", "cpu",
    ]  # fmt: skip
    torchrun = str(Path(sys.executable).parent / "torchrun")
    return (
        "```text\n"
        + command([sys.executable, *flags, "--out-dir", str(tmp / "runs" / "one")], tmp)
        + command(
            [
                torchrun,
                "--standalone",
                "--nproc_per_node",
                "2",
                *flags,
                "--out-dir",
                str(tmp / "runs" / "two"),
            ],
            tmp,
        )  # fmt: skip
        + "```\n"
    )


class Unavailable(Exception):
    """A chapter needs what this machine lacks: a checkpoint, or the reference data."""


def generating(tmp: Path) -> str:
    """The generation command on the default run's checkpoint, which must exist."""
    checkpoint = REPO / "runs" / "default"
    if not (checkpoint / "checkpoints").is_dir():
        raise Unavailable(f"no checkpoint in {checkpoint}: run `uv run python -m src.train` first")
    argv = [sys.executable, "-m", "src.generate", "--checkpoint", "runs/default", "--prompt",
            "The for statement", "--max-new-tokens", "80"]  # fmt: skip
    return "```text\n" + command(argv, tmp) + "```\n"


def small_and_fast(tmp: Path) -> str:
    """Greedy generation from the default run three ways: as trained, with int4 weights, and drafted
    for by the draft run; the first and the last must print the same text."""
    for folder in (REPO / "runs" / "default", REPO / "runs" / "draft"):
        if not (folder / "checkpoints").is_dir():
            raise Unavailable(
                f"no checkpoint in {folder}: benchmarks/inference.py names its command"
            )
    base = [sys.executable, "-m", "src.generate", "--checkpoint", "runs/default", "--prompt",
            "The for statement", "--max-new-tokens", "60", "--temperature", "0"]  # fmt: skip
    ways = [[], ["--quantize", "int4", "--group-size", "64"], ["--draft", "runs/draft"]]
    return "```text\n" + "\n".join(command(base + way, tmp) for way in ways) + "```\n"


def instructions(tmp: Path) -> str:
    """Instruction finetuning of a small model from scratch on the real data, with and without the
    prompt masked, then two of the test answers; needs the reference data (about 13 minutes)."""
    data = os.environ.get("GPT_REFERENCE_DATA")
    if not data or not (Path(data) / "instruction-data.json").is_file():
        raise Unavailable("needs GPT_REFERENCE_DATA (the instruction data and GPT-2's files)")
    text = "```text\n"
    for mask in ([], ["--mask-prompt"]):
        out = tmp / ("instruct-masked" if mask else "instruct-small")
        argv = [
            sys.executable, "-m", "src.instruct", "--data", f"{data}/instruction-data.json",
            "--tokenizer", f"{data}/gpt2", "--preset", "cpu-small", "--epochs", "3",
            "--batch-size", "8", "--lr", "1e-3", "--min-lr", "1e-4", "--warmup-steps", "20",
            "--max-new-tokens", "100", "--device", "cpu", *mask, "--out-dir", str(out),
        ]  # fmt: skip
        text += command(argv, tmp).replace(data, "$GPT_REFERENCE_DATA") + "\n"
    for entry in json.loads((tmp / "instruct-small" / "responses.json").read_text())[:2]:
        text += f"### Instruction: {entry['instruction']} {entry['input']}".rstrip() + "\n"
        text += f"reference:  {entry['output']}\nmodel:      {entry['model_response']}\n"
        text += f"token F1:   {entry['token_f1']:.2f}\n\n"
    return text.rstrip("\n") + "\n```\n"


# tqdm's bar: "37%|███▋      | 40/108 [00:01<00:02, 31.5step/s, loss=0.693]", redrawn after "\r",
# perhaps after a label ("responses: ").
PROGRESS_BAR = re.compile(r"^\s*(?:\w+:\s*)?\d+%\|[^|]*\|[^\[]*\[[^\]]*\]")
# Timings, which change from run to run: a finetuning command's and the generator's, and the
# trainer's measured peak matmul rate and utilisation of it.
TIMINGS = [
    (re.compile(r"\bseconds [\d.]+"), "seconds …"),
    (re.compile(r"in [\d.]+ s, [\d.]+ tokens/s"), "in … s, … tokens/s"),
    (re.compile(r"MFU against [\d,]+ GFLOP/s"), "MFU against … GFLOP/s"),
    (re.compile(r"MFU [\d.]+%"), "MFU …%"),
]


def command(argv: list[str], tmp: Path) -> str:
    """Run ``argv`` from the repository root on one thread; return the command line as a reader
    types it and everything it printed, without progress bars, timings or machine-specific paths."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    result = subprocess.run(
        argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600
    )  # bytes, not text=True, which would turn every "\r" into a line break
    output = result.stdout.decode()
    if result.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} failed:\n{output}")
    lines = []
    for line in output.split("\n"):
        # A line the bar drew on holds its redraws, and any message printed while it was shown.
        pieces = [PROGRESS_BAR.sub("", piece).rstrip() for piece in line.split("\r")]
        for piece in pieces:
            if piece.strip() or "\r" not in line:
                for pattern, replacement in TIMINGS:
                    piece = pattern.sub(replacement, piece)
                lines.append(piece)
    program = "python" if argv[0] == sys.executable else Path(argv[0]).name
    typed = wrap(["OMP_NUM_THREADS=1", "uv", "run", program, *argv[1:]])
    return readable(f"$ {typed}\n" + "\n".join(lines).strip("\n") + "\n", tmp)


def wrap(words: list[str], width: int = 92) -> str:
    """A shell command on lines of about ``width`` characters, each flag beside its value."""
    units: list[str] = []
    for word in map(shlex.quote, words):
        if units and units[-1].startswith("-") and " " not in units[-1] and word[0] != "-":
            units[-1] += " " + word  # the flag's value
        else:
            units.append(word)
    lines = [units[0]]
    for unit in units[1:]:
        if len(lines[-1]) + 1 + len(unit) > width:
            lines.append("   ")
        lines[-1] += " " + unit
    return " \\\n".join(lines)


def readable(text: str, tmp: Path) -> str:
    return text.replace(f"{tmp}/", "").replace(str(Path.home()), "~")


def in_a_temporary_folder(chapter: Callable[[Path], str]) -> Callable[[], str]:
    def run() -> str:
        with tempfile.TemporaryDirectory() as tmp:
            return chapter(Path(tmp).resolve())

    return run


CHAPTERS: dict[str, Callable[[], str]] = {
    "tokens": lambda: captured(tokens),
    "batches": lambda: captured(batches),
    "attention": lambda: captured(attention),
    "flash-attention": lambda: captured(flash),
    "model": lambda: captured(model),
    "modern": lambda: captured(modern),
    "classification": in_a_temporary_folder(classification),
    "scaling-out": in_a_temporary_folder(scaling_out),
    "lora": lambda: captured(lora),
    "generating": in_a_temporary_folder(generating),
    "instructions": in_a_temporary_folder(instructions),
    "small-and-fast": in_a_temporary_folder(small_and_fast),
}


def write(name: str, out: Path) -> str:
    """Run one chapter and write its output, with the command that made it, to ``out/name.md``."""
    text = CHAPTERS[name]() + f"\n*Made by `uv run python book/run_it.py {name}`.*\n"
    (out / f"{name}.md").write_text(text)
    return text


def main() -> None:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "chapters",
        nargs="*",
        choices=[[], *CHAPTERS],
        metavar="CHAPTER",
        help=f"chapters to run (default: all of {', '.join(CHAPTERS)})",
    )
    parser.add_argument("--out", type=Path, default=OUT, help="output folder")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the same numbers on every run, and kind to a shared machine
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.chapters or CHAPTERS:
        start = time.perf_counter()
        try:
            text = write(name, args.out)
        except Unavailable as why:
            if args.chapters:  # asked for by name: an error
                sys.exit(f"error: {name}: {why}")
            print(f"--- {name}: skipped, {why}")
            continue
        print(f"--- {name} ({time.perf_counter() - start:.0f} s)\n{text}")


if __name__ == "__main__":
    main()
