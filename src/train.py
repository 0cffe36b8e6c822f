"""Pretraining: teach a GPT to predict the next token of a corpus, and survive doing it.

``uv run python -m src.train`` trains the default ``cpu-small`` model on the default offline corpus
in a few minutes on a laptop CPU. It writes to ``--out-dir``:

- ``metrics.jsonl``: one JSON object per optimizer step (``step``, ``train_loss``, ``lr``,
  ``tokens_per_sec``, ...), with ``val_loss`` and ``val_perplexity`` on evaluation steps;
- ``loss.png``: the training and validation curves;
- ``samples.txt``: text the model writes at every evaluation;
- ``checkpoints/``: the latest checkpoint (see ``src/training.py``), which ``--resume`` continues
  and ``python -m src.generate --checkpoint`` samples from.

The loop is the book's loop, plus what a run needs in practice: gradient accumulation, gradient
clipping, a warmup + cosine schedule, mixed precision, a guard against non-finite losses, and
data-parallel training with ``torchrun``.

**Reproducible data order.** The training split is cut into windows of ``context_length + 1``
tokens. Each epoch visits them in a permutation drawn from ``(seed, epoch)`` alone, and optimizer
step ``s`` takes the ``s``-th slice of ``batch_size`` windows. So the data a step sees depends only
on ``s``: a resumed run, or a run on more processes, sees exactly the same batches.

**Global batch.** ``--batch-size`` is the number of sequences per optimizer step, whatever the
number of processes: each of ``world_size`` processes runs ``grad_accum`` micro-batches of
``batch_size / (world_size * grad_accum)`` sequences, and DDP averages the gradients.
"""

import argparse
import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from src.attention import ATTN_IMPLS
from src.data import (
    DataError,
    GPTDataset,
    default_cache_dir,
    fingerprint_of,
    load_corpus,
    split_tokens,
    tokenize_cached,
    train_tokenizer_cached,
)
from src.generate import generate
from src.model import PRESETS, GPTConfig, GPTModel, count_parameters
from src.tokenizer import TokenizerNotFound, get_tokenizer
from src.training import (
    ConfigError,
    HelpFormatter,
    NonFiniteLossError,
    StopRequest,
    adamw,
    autocast,
    check_finite,
    cross_entropy,
    find_checkpoint,
    grad_scaler,
    load_checkpoint_meta,
    load_optimizer,
    load_weights,
    lr_at,
    perplexity,
    plot_losses,
    progress_bar,
    read_jsonl,
    resolve_device,
    rng_state,
    save_checkpoint,
    set_rng_state,
)

# The default run: calibrated to finish well within 10 minutes on a shared 2-core CPU.
DEFAULT_MAX_STEPS = 200


# --8<-- [start:cli]
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m src.train",
        description="Pretrain a GPT on a text corpus. Defaults train a small model on the "
        "built-in corpus in a few minutes on a laptop CPU.",
        formatter_class=HelpFormatter,
    )
    a = p.add_argument
    a("--preset", default="cpu-small", help=f"model size: {', '.join(PRESETS)}")
    a("--data", default=None, help="a UTF-8 text file to train on (default: the built-in corpus)")
    a(
        "--tokenizer",
        default=None,
        help="'gpt2', a folder with GPT-2's encoder.json and vocab.bpe, or a saved tokenizer file "
        "(default: train a BPE tokenizer of --vocab-size tokens on the corpus, cached)",
    )
    a(
        "--vocab-size",
        type=int,
        default=None,
        help="vocabulary of the trained tokenizer (default: the preset's)",
    )
    a(
        "--context-length",
        type=int,
        default=None,
        help="tokens per training sequence, at most the preset's (default: the preset's)",
    )
    a("--dropout", type=float, default=None, help="dropout rate (default: the preset's)")
    a(
        "--init",
        default="gpt2",
        choices=["gpt2", "pytorch"],
        help="initial weights: GPT-2's N(0, 0.02) scheme, or PyTorch's layer defaults "
        "(N(0, 1) embeddings), as the book's chapter 5 experiment uses",
    )
    a(
        "--batch-size",
        type=int,
        default=8,
        help="sequences per optimizer step, across all processes and accumulation steps",
    )
    a("--grad-accum", type=int, default=1, help="micro-batches accumulated per optimizer step")
    a("--lr", type=float, default=1e-3, help="peak learning rate")
    a("--min-lr", type=float, default=None, help="learning rate at the end (default: lr / 10)")
    a("--warmup-steps", type=int, default=50, help="steps of linear warmup (0: none)")
    a(
        "--max-steps",
        type=int,
        default=None,
        help=f"optimizer steps to train for (default: {DEFAULT_MAX_STEPS}, unless --epochs)",
    )
    a(
        "--epochs",
        type=float,
        default=None,
        help="passes over the training split (instead of --max-steps)",
    )
    a("--weight-decay", type=float, default=0.1, help="AdamW decay on weight matrices")
    a("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this (0: off)")
    a("--eval-interval", type=int, default=50, help="evaluate every N steps (and at the end)")
    a(
        "--eval-iters",
        type=int,
        default=5,
        help="batches of --batch-size sequences per split for each evaluation",
    )
    a(
        "--save-interval",
        type=int,
        default=None,
        help="checkpoint every N steps (default: at every evaluation); always at the end",
    )
    a(
        "--sample-prompt",
        default=None,
        help="prompt for the samples written at each evaluation (default: the start of the "
        "validation split)",
    )
    a("--out-dir", default="runs/default", help="where metrics, plot, samples, checkpoints go")
    a("--resume", action="store_true", help="continue the run in --out-dir from its checkpoint")
    a("--seed", type=int, default=123, help="seed for weights, data order and dropout")
    a("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    a(
        "--dtype",
        default="fp32",
        choices=["fp32", "bf16", "fp16"],
        help="autocast precision (fp16 only on CUDA, with a gradient scaler)",
    )
    a("--compile", action="store_true", help="compile the model with torch.compile")
    a("--attn-impl", default="eager", choices=ATTN_IMPLS, help="attention core (src/attention.py)")
    a(
        "--fused-attention",
        action="store_true",
        help="shorthand for --attn-impl fused, and fail if the kernel cannot be built",
    )
    return p  # fmt: skip


# --8<-- [end:cli]


# --8<-- [start:data]
def load_data(args):
    """Corpus -> tokenizer -> token ids, split by position: 90% training, 10% validation."""
    corpus = load_corpus(args.data)
    if args.tokenizer is None:
        vocab_size = args.vocab_size or PRESETS[args.preset].vocab_size
        tokenizer = train_tokenizer_cached(corpus, vocab_size, default_cache_dir())
        tokenizer_ref = f"BPE, {vocab_size} tokens, trained on {corpus.name}"
    else:
        tokenizer = get_tokenizer(args.tokenizer)
        tokenizer_ref = args.tokenizer
    tokens = tokenize_cached(corpus, tokenizer, default_cache_dir())
    train_tokens, val_tokens = split_tokens(tokens, val_fraction=0.1)
    return corpus, tokenizer, tokenizer_ref, train_tokens, val_tokens


# --8<-- [end:data]


# --8<-- [start:batches]
def stack(dataset: GPTDataset, which: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets (B, T) of the windows numbered ``which``."""
    inputs, targets = zip(*(dataset[i] for i in which.tolist()), strict=True)
    return torch.stack(inputs), torch.stack(targets)


def step_windows(step: int, n: int, batch_size: int, seed: int) -> torch.Tensor:
    """The global batch of optimizer step ``step``: a slice of that epoch's permutation of the
    ``n`` training windows, drawn from ``(seed, epoch)`` alone."""
    steps_per_epoch = n // batch_size  # the last partial batch of an epoch is dropped
    epoch, k = divmod(step, steps_per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return order[k * batch_size : (k + 1) * batch_size]


# --8<-- [end:batches]


# --8<-- [start:evaluate]
@torch.no_grad()
def evaluate(model, dataset: GPTDataset, n: int, batch_size: int, device, amp) -> float:
    """Mean loss over the first ``n`` windows of a split, in order (the same every time), run
    ``batch_size`` windows at a time."""
    model.eval()
    n = min(n, len(dataset))
    total = 0.0
    for start in range(0, n, batch_size):
        which = torch.arange(start, min(start + batch_size, n))
        x, y = (t.to(device) for t in stack(dataset, which))
        with amp:
            total += cross_entropy(model(x), y).item() * len(which)  # a last batch may be short
    model.train()
    return total / n


# --8<-- [end:evaluate]


def check_args(args, world_size: int) -> None:
    """Settings that cannot work, caught before any data is loaded."""
    if args.preset not in PRESETS:
        raise ConfigError(f"unknown preset {args.preset!r}; valid presets: {', '.join(PRESETS)}")
    model_context = PRESETS[args.preset].context_length
    if args.context_length is not None and not 1 <= args.context_length <= model_context:
        raise ConfigError(
            f"--context-length {args.context_length} is longer than the model's: preset "
            f"{args.preset} has context_length {model_context}"
        )
    per_step = world_size * args.grad_accum
    if args.batch_size < 1 or args.grad_accum < 1 or args.batch_size % per_step:
        raise ConfigError(
            f"--batch-size {args.batch_size} must be a positive multiple of "
            f"processes x --grad-accum = {world_size} x {args.grad_accum}"
        )
    if args.max_steps is not None and args.epochs is not None:
        raise ConfigError("give --max-steps or --epochs, not both")
    if args.dropout is not None and not 0.0 <= args.dropout < 1.0:
        raise ConfigError(f"--dropout must be in [0, 1), got {args.dropout}")
    if min(args.eval_interval, args.eval_iters, args.save_interval or 1) < 1:
        raise ConfigError("--eval-interval, --eval-iters and --save-interval must be positive")


def check_data(args, context_length: int, train_tokens, val_tokens) -> int:
    """The data must hold at least one batch; returns the number of optimizer steps."""
    n_train, n_val = ((len(t) - 1) // context_length for t in (train_tokens, val_tokens))
    if args.batch_size > n_train:
        raise ConfigError(
            f"--batch-size {args.batch_size} is larger than the data: the training split "
            f"({len(train_tokens):,} tokens) holds only {n_train} sequences of "
            f"{context_length + 1} tokens"
        )
    if n_val < 1:
        raise ConfigError(
            f"the validation split ({len(val_tokens):,} tokens) is shorter than one sequence of "
            f"{context_length + 1} tokens; use a smaller --context-length or more data"
        )
    if args.epochs is not None:
        return max(1, round(args.epochs * (n_train // args.batch_size)))
    return args.max_steps if args.max_steps is not None else DEFAULT_MAX_STEPS


def build_config(args, vocab_size: int) -> GPTConfig:
    """The preset, sized to the tokenizer's vocabulary and the training context."""
    overrides = dict(vocab_size=vocab_size, attn_impl=args.attn_impl)
    if args.context_length is not None:
        overrides["context_length"] = args.context_length
    if args.dropout is not None:
        overrides["drop_rate"] = args.dropout
    return GPTConfig.from_preset(args.preset, **overrides)


def pytorch_default_init(model: GPTModel) -> None:
    """Re-draw every linear and embedding layer with PyTorch's own defaults: Kaiming-uniform
    linears (std about 1 / sqrt(3 fan_in)) and N(0, 1) embeddings, fifty times GPT-2's 0.02.
    Large embeddings dominate the residual stream at first, which makes a small corpus quick
    to memorise."""
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            module.reset_parameters()


def check_resumable(meta: dict, cfg: GPTConfig, tokenizer_fp: str, ckpt: Path) -> None:
    """A checkpoint continues only the same model on the same tokenizer."""
    saved = dict(meta["config"], attn_impl=cfg.attn_impl)  # the attention path may change
    diff = [
        f"{k}={saved.get(k)!r} (now {v!r})" for k, v in cfg.to_dict().items() if saved.get(k) != v
    ]
    if diff:
        raise ConfigError(f"checkpoint {ckpt} was trained with another config: {', '.join(diff)}")
    if meta["tokenizer"]["fingerprint"] != tokenizer_fp:
        raise ConfigError(
            f"checkpoint {ckpt} was trained with another tokenizer "
            f"({meta['tokenizer']['ref']}); pass the same --tokenizer/--vocab-size/--data"
        )


# --8<-- [start:step]
def train_step(model, optimizer, scaler, micro_batches, amp, grad_clip, step, device):
    """One optimizer step: accumulate gradients over this process's micro-batches, average them
    across processes (DDP), check the loss, clip, update. Returns (mean loss, gradient norm)."""
    distributed = isinstance(model, DistributedDataParallel)
    loss_sum = torch.zeros((), device=device)
    for i, (x, y) in enumerate(micro_batches):
        # DDP all-reduces gradients during the last micro-batch's backward only.
        last = i == len(micro_batches) - 1
        with contextlib.nullcontext() if last or not distributed else model.no_sync():
            with amp:
                loss = cross_entropy(model(x.to(device)), y.to(device))
            scaler.scale(loss / len(micro_batches)).backward()  # the mean over micro-batches
        loss_sum += loss.detach()
    loss = loss_sum / len(micro_batches)
    if distributed:
        dist.all_reduce(loss)  # summed over processes (gloo has no average)
        loss /= dist.get_world_size()  # the logged loss of the global batch
    check_finite(loss, step)  # before the update, so the weights stay good
    scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss.item(), grad_norm.item()


# --8<-- [end:step]


# --8<-- [start:train]
def train(args) -> dict:
    """The whole run; returns the last metrics row."""
    # --- processes: one, or one per torchrun worker ---
    distributed = "RANK" in os.environ
    device = resolve_device(args.device)
    if distributed:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    main_process = rank == 0
    out_dir = Path(args.out_dir)

    # --- settings, checked before any work ---
    check_args(args, world_size)
    if args.fused_attention:
        args.attn_impl = "fused"
        ensure_fused_available()
    amp = autocast(device, args.dtype)
    if main_process:
        print(f"loading data and tokenizer (cache: {default_cache_dir()}) ...", file=sys.stderr)
    corpus, tokenizer, tokenizer_ref, train_tokens, val_tokens = load_data(args)
    cfg = build_config(args, tokenizer.n_vocab)
    max_steps = check_data(args, cfg.context_length, train_tokens, val_tokens)
    min_lr = args.lr / 10 if args.min_lr is None else args.min_lr
    train_set = GPTDataset(train_tokens, cfg.context_length, stride=cfg.context_length)
    val_set = GPTDataset(val_tokens, cfg.context_length, stride=cfg.context_length)
    n_train = len(train_set)
    micro_batch = args.batch_size // (world_size * args.grad_accum)
    tokenizer_meta = {"ref": tokenizer_ref, "fingerprint": fingerprint_of(tokenizer)}
    ckpt = find_checkpoint(out_dir) if args.resume else None
    if args.resume and ckpt is None:
        raise ConfigError(f"--resume: no checkpoint in {out_dir} to continue from")
    meta = load_checkpoint_meta(ckpt) if ckpt else None
    if meta:
        check_resumable(meta, cfg, tokenizer_meta["fingerprint"], ckpt)

    # --- model and optimizer: the same initial weights on every process ---
    torch.manual_seed(args.seed)
    model = GPTModel(cfg)
    if args.init == "pytorch":
        pytorch_default_init(model)
    model = model.to(device)
    optimizer = adamw(model, args.lr, args.weight_decay)
    scaler = grad_scaler(device, args.dtype)
    step = 0
    if meta:
        load_weights(ckpt, model)
        load_optimizer(ckpt, optimizer)
        step = meta["step"]
    # Dropout draws differ per process; a resumed run continues each process's own stream.
    torch.manual_seed(args.seed + rank)
    if meta and len(meta["rng"]) == world_size:
        set_rng_state(meta["rng"][rank])
    elif meta and main_process:
        print(f"note: the checkpoint comes from {len(meta['rng'])} process(es), this run has "
              f"{world_size}; dropout draws start afresh", file=sys.stderr)  # fmt: skip
    raw_model = model
    if args.compile:
        model = torch.compile(model)
    if distributed:
        model = DistributedDataParallel(model)

    # --- outputs: metrics so far (a resumed run drops rows after its checkpoint) ---
    metrics_path = out_dir / "metrics.jsonl"
    rows: list[dict] = []
    if main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        if meta and metrics_path.exists():
            rows = [r for r in read_jsonl(metrics_path) if r["step"] <= step]
        elif not meta:
            for stale in ("metrics.jsonl", "samples.txt", "loss.png"):
                (out_dir / stale).unlink(missing_ok=True)
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(
            f"{args.preset}: {count_parameters(raw_model):,} parameters, context "
            f"{cfg.context_length}, attention {cfg.attn_impl}, {device}, {args.dtype}, "
            f"{world_size} process(es), {torch.get_num_threads()} thread(s)\n"
            f"data: {corpus.name}, {len(train_tokens):,} training / {len(val_tokens):,} "
            f"validation tokens, {n_train // args.batch_size} steps per epoch; "
            f"{'resuming at step ' + str(step) if meta else 'starting'} -> step {max_steps}",
            file=sys.stderr,
        )
    prompt_ids = (
        tokenizer.encode(args.sample_prompt)
        if args.sample_prompt is not None
        else val_tokens[:10].astype(np.int64).tolist()
    )

    def log(row: dict) -> None:
        rows.append(row)
        with open(metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def run_eval(row: dict) -> None:
        """Validation loss, a loss measured on training batches, a sample, and the plot."""
        # --eval-iters global batches, whatever the number of processes and micro-batches.
        args_eval = (args.eval_iters * args.batch_size, micro_batch, device, amp)
        row["eval_train_loss"] = evaluate(raw_model, train_set, *args_eval)
        row["val_loss"] = evaluate(raw_model, val_set, *args_eval)
        row["val_perplexity"] = perplexity(row["val_loss"])
        check_finite(torch.tensor(row["val_loss"]), row["step"])  # bad weights: stop, keep the last
        raw_model.eval()
        out = generate(
            raw_model, torch.tensor([prompt_ids], device=device), 50, cfg.context_length,
            temperature=0.8, top_k=50, generator=torch.Generator(device).manual_seed(args.seed),
        )  # fmt: skip
        raw_model.train()
        with open(out_dir / "samples.txt", "a") as f:
            f.write(f"--- step {row['step']} (val loss {row['val_loss']:.3f})\n")
            f.write(tokenizer.decode(out[0].tolist()) + "\n\n")

    def checkpoint() -> None:
        if not all(torch.isfinite(p).all() for p in raw_model.parameters()):
            raise NonFiniteLossError(f"the weights are not finite after step {step}; stopping "
                                     "(the last good checkpoint is kept)")  # fmt: skip
        states = [None] * world_size
        if distributed:
            dist.all_gather_object(states, rng_state())
        else:
            states = [rng_state()]
        if main_process:
            save_checkpoint(out_dir, raw_model, optimizer, tokenizer, {
                "step": step, "config": cfg.to_dict(), "tokenizer": tokenizer_meta,
                "data": {"name": corpus.name, "fingerprint": corpus.fingerprint,
                         "next_step": step, "seed": args.seed},  # the batch order's position
                "world_size": world_size, "rng": states, "args": vars(args),
            })  # fmt: skip

    if main_process and not meta:
        first = {"step": 0, "lr": 0.0, "tokens_per_sec": 0.0}
        run_eval(first)
        first["train_loss"] = first["eval_train_loss"]  # no training step yet
        log(first)
        plot_losses(rows, out_dir / "loss.png")

    # --- the loop ---
    save_interval = args.save_interval or args.eval_interval
    bar = progress_bar(max_steps, step, disable=not main_process)
    with StopRequest() as stop, bar:
        model.train()
        while step < max_steps:
            t0 = time.perf_counter()
            lr = lr_at(step, args.lr, min_lr, args.warmup_steps, max_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = step_windows(step, n_train, args.batch_size, args.seed)  # same on every process
            mine = batch[
                rank * micro_batch * args.grad_accum : (rank + 1) * micro_batch * args.grad_accum
            ]
            micro_batches = [
                stack(train_set, mine[i * micro_batch : (i + 1) * micro_batch])
                for i in range(args.grad_accum)
            ]
            loss, grad_norm = train_step(
                model, optimizer, scaler, micro_batches, amp, args.grad_clip, step + 1, device
            )
            step += 1

            if device.type == "cuda":
                torch.cuda.synchronize()
            tokens_per_sec = args.batch_size * cfg.context_length / (time.perf_counter() - t0)
            stop_now = torch.tensor(float(stop.requested))
            if distributed:  # every process must agree to stop at the same step
                dist.all_reduce(stop_now, op=dist.ReduceOp.MAX)
            if main_process:
                row = {
                    "step": step, "epoch": step / (n_train // args.batch_size),
                    "train_loss": loss, "lr": lr, "grad_norm": grad_norm,
                    "tokens_per_sec": tokens_per_sec,
                }  # fmt: skip
                if step % args.eval_interval == 0 or step == max_steps:
                    run_eval(row)
                    plot_losses(rows + [row], out_dir / "loss.png")
                    bar.write(
                        f"step {step}: train loss {row['train_loss']:.3f}, val loss "
                        f"{row['val_loss']:.3f} (perplexity {row['val_perplexity']:.1f})"
                    )
                log(row)
                bar.set_postfix(loss=f"{row['train_loss']:.3f}", tok_s=f"{tokens_per_sec:,.0f}")
                bar.update()
            if step % save_interval == 0 or step == max_steps or stop_now.item():
                checkpoint()
            if stop_now.item():
                break
    if distributed:
        dist.destroy_process_group()
    if main_process and stop.requested and step < max_steps:
        print(f"stopped at step {step}; continue with the same command plus --resume",
              file=sys.stderr)  # fmt: skip
    return rows[-1] if rows else {}


# --8<-- [end:train]


def ensure_fused_available() -> None:
    """``--fused-attention`` is strict: no silent fallback to the plain path."""
    try:
        from src import fused_softmax
    except ImportError as err:
        raise ConfigError(f"--fused-attention: the fused kernel is not available ({err})") from None
    try:
        fused_softmax.ensure_available()
    except RuntimeError as err:
        raise ConfigError(f"--fused-attention: {err}") from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        last = train(args)
    except (ConfigError, DataError, TokenizerNotFound) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if last.get("val_loss") is not None:
        print(
            f"final validation loss {last['val_loss']:.3f}, perplexity "
            f"{last['val_perplexity']:.1f}; outputs in {args.out_dir}",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
