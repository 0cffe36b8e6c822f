"""Pretraining: teach a GPT to predict the next token of a corpus, and survive doing it.

``uv run python -m src.train`` trains the default ``cpu-small`` model on the default offline corpus
in a few minutes on a laptop CPU. It writes to ``--out-dir``:

- ``metrics.jsonl``: one JSON object per optimizer step (``step``, ``train_loss``, ``lr``,
  ``tokens_per_sec``, ...), with ``val_loss`` and ``val_perplexity`` on evaluation steps, and a
  row for step 0, the untrained model;
- ``loss.png``: the training and validation curves;
- ``samples.txt``: text the model writes at every evaluation;
- ``checkpoints/``: the latest checkpoint (see ``src/checkpoints.py``), which ``--resume``
  continues and ``python -m src.generate --checkpoint`` samples from.

``train`` reads as the loop it is: prepare a run, then step, evaluate and sample, save. What a run
needs in practice sits in the named parts it calls: the data, the model and optimizer, resuming,
the output files, the processes of a data-parallel run.

**Reproducible data order.** The training split is cut into windows of ``context_length + 1``
tokens, and the batch of optimizer step ``s`` is ``src.data.step_batch(s, ...)``: it depends on
nothing but ``s``, so a resumed run, or a run on more processes, sees exactly the same batches.

**Global batch.** ``--batch-size`` is the number of sequences per optimizer step, whatever the
number of processes: each of ``world_size`` processes runs ``grad_accum`` micro-batches of
``batch_size / (world_size * grad_accum)`` sequences, and DDP averages the gradients.
"""

import contextlib
import functools
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

from src.attention import ATTN_IMPLS
from src.checkpoints import (
    find_checkpoint,
    load_checkpoint_meta,
    load_optimizer,
    load_weights,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from src.cli import (
    MetricsLog,
    Parser,
    RunFolder,
    StopRequest,
    count,
    format_perplexity,
    non_negative,
    plot_losses,
    positive,
    positive_int,
    progress_bar,
    run_command,
)
from src.data import (
    GPTDataset,
    fingerprint_of,
    load_corpus,
    split_tokens,
    step_batch,
    tokenize_cached,
    train_tokenizer_cached,
)
from src.errors import NonFiniteLossError, UserError
from src.files import cache_dir
from src.flops import mfu, peak_matmul_flops, synchronize
from src.generate import generate
from src.model import PRESETS, GPTConfig, GPTModel, count_parameters
from src.tokenizer import get_tokenizer
from src.training import (
    DTYPES,
    OPTIMIZERS,
    Schedule,
    adamw,
    autocast,
    check_finite,
    cross_entropy,
    grad_scaler,
    optimizer_step,
    perplexity,
    resolve_device,
)

# The default run: calibrated to finish well within 10 minutes on a shared 2-core CPU.
DEFAULT_MAX_STEPS = 200


# --8<-- [start:minimal]
def train_minimal(model, train_set: GPTDataset, val_set: GPTDataset, steps: int, batch_size: int,
                  lr: float, weight_decay: float = 0.1, grad_clip: float = 1.0, seed: int = 123,
                  eval_every: int = 10) -> list[float]:  # fmt: skip
    """The whole idea of pretraining in one loop: the trainer below adds to this, and nothing else.

    Returns the training loss of every step; prints the validation loss every ``eval_every``."""
    optimizer = adamw(model, lr, weight_decay)
    losses = []
    for step in range(steps):
        model.train()
        x, y = train_set.batch(step_batch(step, len(train_set), batch_size, seed))  # (B, T) each
        loss = cross_entropy(model(x), y)  # forward: mean -log p(next token)
        loss.backward()  # backward: d loss / d every weight
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)  # no giant steps
        optimizer.step()  # AdamW: move every weight a little downhill
        optimizer.zero_grad(set_to_none=True)  # gradients add up unless cleared
        losses.append(loss.item())
        if (step + 1) % eval_every == 0:
            model.eval()
            with torch.no_grad():
                x, y = val_set.batch(torch.arange(min(batch_size, len(val_set))))
                print(
                    f"step {step + 1}: train {loss.item():.3f}, val {cross_entropy(model(x), y).item():.3f}"
                )
    return losses


# --8<-- [end:minimal]


# --8<-- [start:cli]
def build_parser() -> Parser:
    p = Parser(
        prog="python -m src.train",
        description="Pretrain a GPT on a text corpus. Defaults train a small model on the "
        "built-in corpus in a few minutes on a laptop CPU.",
    )
    a = p.add_argument
    a("--preset", default="cpu-small", help=f"model size: {', '.join(PRESETS)}")
    a("--data", help="a UTF-8 text file or a folder of .txt files to train on, or a built-in "
      "corpus: python-docs (Python's documentation, 0.5 MB, the default) or python-stdlib (the "
      "standard library's source code and tests, 31 MB)")  # fmt: skip
    a("--tokenizer", help="'gpt2', a folder with GPT-2's encoder.json and vocab.bpe, or a saved "
      "tokenizer file; when not given, a BPE tokenizer of --vocab-size tokens is trained on the "
      "corpus and cached")  # fmt: skip
    a("--vocab-size", type=positive_int, help="size of the tokenizer trained on the corpus; the "
      "preset's when not given")  # fmt: skip
    a("--context-length", type=positive_int,
      help="tokens per training sequence, at most the preset's; the preset's when not given")  # fmt: skip
    a("--dropout", type=float, help="dropout rate; the preset's when not given")
    a("--init", default="gpt2", choices=["gpt2", "pytorch"],
      help="initial weights: GPT-2's N(0, 0.02) scheme, or PyTorch's layer defaults (N(0, 1) "
      "embeddings), as the book's chapter 5 experiment uses")  # fmt: skip
    a("--batch-size", type=positive_int, default=8,
      help="sequences per optimizer step, across all processes and accumulation steps")  # fmt: skip
    a("--grad-accum", type=positive_int, default=1, help="micro-batches per optimizer step")
    a("--lr", type=float, default=1e-3, help="peak learning rate")
    a("--min-lr", type=float, help="learning rate at the end; lr / 10 when not given")
    a("--warmup-steps", type=count, default=50, help="steps of linear warmup (0: none)")
    a("--max-steps", type=positive_int,
      help=f"optimizer steps to train for; {DEFAULT_MAX_STEPS} unless --epochs is given")  # fmt: skip
    a("--epochs", type=positive, help="passes over the training split (instead of --max-steps)")
    a("--optimizer", default="adamw", choices=list(OPTIMIZERS),
      help="adamw, or muon: orthogonalised momentum for the blocks' matrices, AdamW for the rest")  # fmt: skip
    a("--weight-decay", type=non_negative, default=0.1, help="decoupled decay on weight matrices")
    a("--grad-clip", type=non_negative, default=1.0, help="clip the gradient norm (0: off)")
    a(
        "--eval-interval",
        type=positive_int,
        default=50,
        help="evaluate every N steps, and at the end",
    )
    a("--eval-iters", type=positive_int, default=5,
      help="batches of --batch-size sequences per split for each evaluation")  # fmt: skip
    a("--save-interval", type=positive_int,
      help="checkpoint every N steps, and always at the end; at every evaluation when not given")  # fmt: skip
    a("--sample-prompt", help="prompt for the samples written at each evaluation ('' starts from "
      "end-of-text); the start of the validation split when not given")  # fmt: skip
    a("--out-dir", default="runs/default", help="where metrics, plot, samples, checkpoints go")
    a("--resume", action="store_true", help="continue the run in --out-dir from its checkpoint")
    a("--overwrite", action="store_true",
      help="start over in an --out-dir that holds a run, deleting its files")  # fmt: skip
    a("--seed", type=int, default=123, help="seed for weights, data order and dropout")
    a("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    a("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
      help="autocast precision (fp16 only on CUDA, with a gradient scaler)")  # fmt: skip
    a("--compile", action="store_true", help="compile the model with torch.compile")
    a("--activation-checkpointing", action="store_true",
      help="keep only each block's input for the backward pass and recompute the rest there: "
      "less memory, about one more forward pass of time")  # fmt: skip
    a(
        "--attn-impl",
        choices=ATTN_IMPLS,
        help="attention core (src/attention.py); eager when not given",
    )
    a("--fused-attention", action="store_true",
      help="our fused softmax kernel (--attn-impl fused), failing if it cannot be built")  # fmt: skip
    a("--flash-attention", action="store_true",
      help="our flash attention kernel (--attn-impl flash), failing if it cannot be built")  # fmt: skip
    return p


# --8<-- [end:cli]


def check_args(args) -> None:
    """Flags that contradict each other or the preset, refused before anything is loaded."""
    pairs = [("max_steps", "epochs"), ("resume", "overwrite"), ("tokenizer", "vocab_size"),
             ("fused_attention", "attn_impl"), ("flash_attention", "attn_impl"),
             ("fused_attention", "flash_attention")]  # fmt: skip
    for a, b in pairs:
        if getattr(args, a) not in (None, False) and getattr(args, b) not in (None, False):
            flags = (f"--{n.replace('_', '-')}" for n in (a, b))
            raise UserError("give {} or {}, not both".format(*flags))
    model_context = GPTConfig.from_preset(args.preset).context_length  # an unknown one: refused
    if args.context_length is not None and args.context_length > model_context:
        raise UserError(
            f"--context-length {args.context_length} is longer than the model's: preset "
            f"{args.preset} has context_length {model_context}"
        )
    world_size = int(os.environ.get("WORLD_SIZE", 1))  # set by torchrun
    if args.batch_size % (world_size * args.grad_accum):
        raise UserError(f"--batch-size {args.batch_size} must be a multiple of processes x "
                        f"--grad-accum = {world_size} x {args.grad_accum}")  # fmt: skip


# --8<-- [start:processes]
@contextlib.contextmanager
def processes(args):
    """The device, this process's rank and the number of processes, for the length of the run.

    Under ``torchrun`` (which sets ``RANK``) every process joins one group: gloo on CPUs, NCCL on
    GPUs, one GPU per process picked by ``LOCAL_RANK``. Alone, the rank is 0 of 1. If one process
    stops with an error, ``torchrun`` stops the others."""
    device = resolve_device(args.device)
    if "RANK" not in os.environ:
        yield device, 0, 1
        return
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        yield device, dist.get_rank(), dist.get_world_size()
    finally:
        dist.destroy_process_group()


def all_agree_to_stop(run: "Run", requested: bool) -> bool:
    """A Ctrl-C reaches one process, or some: all must stop after the same step."""
    stop = torch.tensor(float(requested))
    if run.world_size > 1:
        dist.all_reduce(stop, op=dist.ReduceOp.MAX)
    return bool(stop.item())


# --8<-- [end:processes]


# --8<-- [start:data]
def load_data(args):
    """Corpus -> tokenizer -> token ids, split by position: 90% training, 10% validation."""
    corpus = load_corpus(args.data)
    if args.tokenizer is None:
        vocab_size = args.vocab_size or PRESETS[args.preset].vocab_size
        tokenizer = train_tokenizer_cached(corpus, vocab_size, cache_dir())
        tokenizer_ref = f"BPE, {vocab_size} tokens, trained on {corpus.name}"
    else:
        tokenizer = get_tokenizer(args.tokenizer)
        tokenizer_ref = args.tokenizer
    tokens = tokenize_cached(corpus, tokenizer, cache_dir())
    train_tokens, val_tokens = split_tokens(tokens, val_fraction=0.1)
    return corpus, tokenizer, tokenizer_ref, train_tokens, val_tokens


# --8<-- [end:data]


def check_data(args, context_length: int, train_tokens, val_tokens) -> int:
    """The data must hold at least one batch; returns the number of optimizer steps."""
    n_train, n_val = ((len(t) - 1) // context_length for t in (train_tokens, val_tokens))
    if args.batch_size > n_train:
        raise UserError(
            f"--batch-size {args.batch_size} is larger than the data: the training split "
            f"({len(train_tokens):,} tokens) holds only {n_train} sequences of "
            f"{context_length + 1} tokens"
        )
    if n_val < 1:
        raise UserError(
            f"the validation split ({len(val_tokens):,} tokens) is shorter than one sequence of "
            f"{context_length + 1} tokens; use a smaller --context-length or more data"
        )
    if args.epochs is not None:
        return max(1, round(args.epochs * (n_train // args.batch_size)))
    return args.max_steps if args.max_steps is not None else DEFAULT_MAX_STEPS


def build_config(args, vocab_size: int) -> GPTConfig:
    """The preset, sized to the tokenizer's vocabulary and the training context."""
    overrides = dict(vocab_size=vocab_size, attn_impl=args.attn_impl or "eager")
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


def sample_prompt(args, tokenizer, val_tokens) -> list[int]:
    """The ids the samples start from: ``--sample-prompt``, '' meaning end-of-text as in
    ``src.generate``, or the first ten validation tokens."""
    if args.sample_prompt is None:
        return val_tokens[:10].astype(np.int64).tolist()
    ids = tokenizer.encode(args.sample_prompt, allowed_special="all")
    if not ids and tokenizer.eot_token is None:
        raise UserError("--sample-prompt is empty and the tokenizer has no end-of-text token")
    return ids or [tokenizer.eot_token]


# --8<-- [start:resume]
def check_resumable(meta: dict, args, cfg: GPTConfig, tokenizer, corpus, ckpt: Path) -> None:
    """A checkpoint continues only the same model, on the same tokenizer and data, in the same
    batch order: anything else would break the promise that a resumed run equals an uninterrupted
    one."""
    saved = dict(meta["config"], attn_impl=cfg.attn_impl)  # the attention path may change
    diff = [
        f"{k}={saved.get(k)!r} (now {v!r})" for k, v in cfg.to_dict().items() if saved.get(k) != v
    ]
    if diff:
        raise UserError(f"checkpoint {ckpt} was trained with another config: {', '.join(diff)}")
    if meta["tokenizer"]["fingerprint"] != fingerprint_of(tokenizer):
        raise UserError(
            f"checkpoint {ckpt} was trained with another tokenizer "
            f"({meta['tokenizer']['ref']}); pass the same --tokenizer/--vocab-size/--data"
        )
    before = meta.get("args", {}).get("optimizer", "adamw")  # older checkpoints: AdamW
    if before != args.optimizer:
        raise UserError(f"checkpoint {ckpt} was trained with --optimizer {before}; resume it with "
                        "the same optimizer")  # fmt: skip
    data = meta.get("data")
    if not isinstance(data, dict):
        raise UserError(f"checkpoint {ckpt} was not written by src.train (it has no data record)")
    now = {"corpus": corpus.fingerprint, "seed": args.seed, "batch_size": args.batch_size}
    before = {"corpus": data.get("fingerprint"), "seed": data.get("seed"),
              "batch_size": data.get("batch_size", meta.get("args", {}).get("batch_size"))}  # fmt: skip
    diff = [f"{k} {before[k]!r} (now {now[k]!r})" for k in now if before[k] != now[k]]
    if diff:
        raise UserError(f"checkpoint {ckpt} continues another batch order: {', '.join(diff)}; "
                        "give the same --data, --seed and --batch-size")  # fmt: skip


# --8<-- [end:resume]


@dataclass
class Run:
    """What a run holds: built by ``prepare_run``, used by the loop and the parts it calls."""

    args: object
    device: torch.device
    rank: int
    world_size: int
    cfg: GPTConfig
    model: torch.nn.Module  # what steps: compiled and/or wrapped in DDP
    raw_model: GPTModel  # the plain module: evaluated, sampled, saved
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp: object
    schedule: Schedule
    train_set: GPTDataset
    val_set: GPTDataset
    tokenizer: object
    meta: dict  # what every checkpoint records about the run's inputs
    prompt_ids: list[int]
    step: int
    log: MetricsLog | None  # rank 0 only
    peak_flops: float  # FLOP/s of this device's matmuls in the run's dtype, measured once


# --8<-- [start:prepare]
def prepare_run(args, device, rank: int, world_size: int, folder: RunFolder | None) -> Run:
    """Check every setting, load the data, build the model and optimizer, continue a checkpoint
    (``--resume``), and only then touch the output folder."""
    check_args(args)
    if args.fused_attention:
        args.attn_impl = "fused"
        ensure_fused_available()
    if args.flash_attention:
        args.attn_impl = "flash"
        ensure_flash_available()
    amp = autocast(device, args.dtype)
    if rank == 0:
        print(f"loading data and tokenizer (cache: {cache_dir()}) ...", file=sys.stderr)
    corpus, tokenizer, tokenizer_ref, train_tokens, val_tokens = load_data(args)
    cfg = build_config(args, tokenizer.n_vocab)
    max_steps = check_data(args, cfg.context_length, train_tokens, val_tokens)
    min_lr = args.lr / 10 if args.min_lr is None else args.min_lr
    schedule = Schedule(args.lr, min_lr, args.warmup_steps, max_steps)
    prompt_ids = sample_prompt(args, tokenizer, val_tokens)
    ckpt = find_checkpoint(args.out_dir) if args.resume else None
    if args.resume and ckpt is None:
        raise UserError(f"--resume: no checkpoint in {args.out_dir} to continue from")
    meta = load_checkpoint_meta(ckpt) if ckpt else None
    if meta:
        check_resumable(meta, args, cfg, tokenizer, corpus, ckpt)

    torch.manual_seed(args.seed)  # the same initial weights on every process
    model = GPTModel(cfg)
    if args.init == "pytorch":
        pytorch_default_init(model)
    model = model.to(device)
    optimizer = OPTIMIZERS[args.optimizer](model, args.lr, args.weight_decay)
    step = 0
    if meta:
        load_weights(ckpt, model)
        load_optimizer(ckpt, optimizer)
        step = meta["step"]
    restore_rng(args.seed, rank, world_size, meta)
    if args.activation_checkpointing:
        checkpoint_blocks(model)
    stepping = torch.compile(model) if args.compile else model
    if world_size > 1:
        stepping = DistributedDataParallel(stepping)
    run_meta = {"config": cfg.to_dict(), "args": vars(args),
                "tokenizer": {"ref": tokenizer_ref, "fingerprint": fingerprint_of(tokenizer)},
                "data": {"name": corpus.name, "fingerprint": corpus.fingerprint,
                         "seed": args.seed, "batch_size": args.batch_size}}  # fmt: skip
    run = Run(args, device, rank, world_size, cfg, stepping, model, optimizer,
              grad_scaler(device, args.dtype), amp, schedule,
              GPTDataset(train_tokens, cfg.context_length, stride=cfg.context_length),
              GPTDataset(val_tokens, cfg.context_length, stride=cfg.context_length),
              tokenizer, run_meta, prompt_ids, step, None,
              peak_matmul_flops(device, DTYPES[args.dtype]))  # fmt: skip
    if folder is not None:
        run.log = open_outputs(folder, step if meta else None)
        describe(run, corpus, len(train_tokens), len(val_tokens))
    return run


# --8<-- [end:prepare]


def restore_rng(seed: int, rank: int, world_size: int, meta: dict | None) -> None:
    """Dropout draws differ per process; a resumed run continues each process's own stream."""
    torch.manual_seed(seed + rank)
    if meta and len(meta.get("rng", [])) == world_size:
        set_rng_state(meta["rng"][rank])
    elif meta and rank == 0:
        print(f"note: the checkpoint comes from {len(meta.get('rng', []))} process(es), this run "
              f"has {world_size}; dropout draws start afresh", file=sys.stderr)  # fmt: skip


# --8<-- [start:checkpointing]
def checkpoint_blocks(model: GPTModel) -> None:
    """``--activation-checkpointing``: every block runs under ``torch.utils.checkpoint``, which
    saves only the block's input and recomputes the rest when the backward pass reaches it (with
    the same dropout draws). Each block's own ``forward`` is wrapped, so its parameters keep their
    names and checkpoints are unchanged."""
    for block in model.trf_blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


# --8<-- [end:checkpointing]


def open_outputs(folder: RunFolder, resumed_at: int | None) -> MetricsLog:
    """The metrics file: a fresh one, or (resuming) the rows up to the checkpoint's step."""
    if resumed_at is None:
        folder.clear()  # empty already, unless --overwrite
    return MetricsLog(folder.path / "metrics.jsonl", keep_until=resumed_at)


def describe(run: Run, corpus, n_train: int, n_val: int) -> None:
    steps_per_epoch = len(run.train_set) // run.args.batch_size
    print(
        f"{run.args.preset}: {count_parameters(run.raw_model):,} parameters, context "
        f"{run.cfg.context_length}, attention {run.cfg.attn_impl}, {run.device}, "
        f"{run.args.dtype}, {run.world_size} process(es), {torch.get_num_threads()} thread(s); "
        f"MFU against {run.peak_flops / 1e9:,.0f} GFLOP/s, this device's measured {run.args.dtype} "
        "matmul peak\n"
        f"data: {corpus.name}, {n_train:,} training / {n_val:,} validation tokens, "
        f"{steps_per_epoch} steps per epoch; "
        f"{'resuming at step ' + str(run.step) if run.step else 'starting'} -> step "
        f"{run.schedule.max_steps}",
        file=sys.stderr,
    )


# --8<-- [start:step]
def train_step(run: Run) -> tuple[float, float, float]:
    """Optimizer step ``run.step + 1``: this process's share of the step's global batch, in
    ``--grad-accum`` micro-batches. Returns (loss, gradient norm, learning rate)."""
    args, lr = run.args, run.schedule(run.step)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    batch = step_batch(run.step, len(run.train_set), args.batch_size, args.seed)  # every process
    share = args.batch_size // run.world_size  # the same global batch; each keeps its slice
    micro = share // args.grad_accum
    mine = batch[run.rank * share : (run.rank + 1) * share]
    micro_batches = [run.train_set.batch(mine[i : i + micro]) for i in range(0, share, micro)]

    def loss_fn(xy):
        with run.amp:
            return cross_entropy(run.model(xy[0].to(run.device)), xy[1].to(run.device))

    loss, grad_norm = optimizer_step(run.model, run.optimizer, micro_batches, loss_fn,
                                     run.step + 1, args.grad_clip, run.scaler)  # fmt: skip
    run.step += 1
    return loss, grad_norm, lr


# --8<-- [end:step]


# --8<-- [start:evaluate]
@torch.no_grad()
def evaluate(model, dataset: GPTDataset, n: int, batch_size: int, device, amp) -> float:
    """Mean loss over the first ``n`` windows of a split, in order (the same every time), run
    ``batch_size`` windows at a time."""
    model.eval()
    n = min(n, len(dataset))
    total = 0.0
    for start in range(0, n, batch_size):
        x, y = (
            t.to(device) for t in dataset.batch(torch.arange(start, min(start + batch_size, n)))
        )
        with amp:
            total += cross_entropy(model(x), y).item() * len(x)  # a last batch may be short
    model.train()
    return total / n


def evaluate_and_sample(run: Run, row: dict) -> None:
    """Validation loss, the loss on fixed training windows, a sample, and the plot."""
    args = run.args
    n, batch = args.eval_iters * args.batch_size, args.batch_size // run.world_size
    row["eval_train_loss"] = evaluate(run.raw_model, run.train_set, n, batch, run.device, run.amp)
    row["val_loss"] = evaluate(run.raw_model, run.val_set, n, batch, run.device, run.amp)
    row["val_perplexity"] = perplexity(row["val_loss"])
    check_finite(torch.tensor(row["val_loss"]), row["step"])  # bad weights: stop, keep the last
    run.raw_model.eval()
    out = generate(
        run.raw_model, torch.tensor([run.prompt_ids], device=run.device), 50,
        run.cfg.context_length, temperature=0.8, top_k=50,
        generator=torch.Generator(run.device).manual_seed(args.seed),
    )  # fmt: skip
    run.raw_model.train()
    with open(Path(args.out_dir) / "samples.txt", "a", encoding="utf-8") as f:
        f.write(f"--- step {row['step']} (val loss {row['val_loss']:.3f})\n")
        f.write(run.tokenizer.decode(out[0].tolist()) + "\n\n")
    plot_losses([*run.log.rows, row], Path(args.out_dir) / "loss.png")


# --8<-- [end:evaluate]


# --8<-- [start:save]
def save(run: Run) -> None:
    """A checkpoint of the run at its current step, with every process's random-number state."""
    if not all(torch.isfinite(p).all() for p in run.raw_model.parameters()):
        raise NonFiniteLossError(f"the weights are not finite after step {run.step}; stopping "
                                 "(the last good checkpoint is kept)")  # fmt: skip
    states = [rng_state()]
    if run.world_size > 1:
        states = [None] * run.world_size
        dist.all_gather_object(states, rng_state())
    if run.rank == 0:
        meta = run.meta | {"step": run.step, "world_size": run.world_size, "rng": states}
        save_checkpoint(run.args.out_dir, run.raw_model, run.optimizer, run.tokenizer, meta)


# --8<-- [end:save]


# --8<-- [start:train]
def train(args) -> tuple[dict, int | None]:
    """The whole run. Returns the last metrics row, and the signal that stopped it early, if any."""
    with processes(args) as (device, rank, world_size), output_folder(args, rank) as folder:
        run = prepare_run(args, device, rank, world_size, folder)
        max_steps, save_every = run.schedule.max_steps, args.save_interval or args.eval_interval
        steps_per_epoch = len(run.train_set) // args.batch_size
        if run.step == 0 and run.log:
            first = {"step": 0, "lr": 0.0, "tokens_per_sec": 0.0}
            evaluate_and_sample(run, first)
            run.log.append(first | {"train_loss": first["eval_train_loss"]})  # no step yet
        bar = progress_bar(max_steps, run.step, disable=run.log is None)
        with StopRequest() as stop, bar:
            run.model.train()
            while run.step < max_steps:
                start = time.perf_counter()
                loss, grad_norm, lr = train_step(run)
                row = {"step": run.step, "epoch": run.step / steps_per_epoch, "train_loss": loss,
                       "lr": lr, "grad_norm": grad_norm, **throughput(run, start)}  # fmt: skip
                if run.log and (run.step % args.eval_interval == 0 or run.step == max_steps):
                    evaluate_and_sample(run, row)
                    bar.write(f"step {run.step}: train loss {loss:.3f}, val loss "
                              f"{row['val_loss']:.3f} (perplexity {format_perplexity(row['val_loss'])})")  # fmt: skip
                if run.log:
                    run.log.append(row)
                    bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{row['tokens_per_sec']:,.0f}",
                                    mfu=f"{row['mfu']:.1%}")  # fmt: skip
                    bar.update()
                stopping = all_agree_to_stop(run, stop.requested)
                if run.step % save_every == 0 or run.step == max_steps or stopping:
                    save(run)
                if stopping:
                    break
    last = run.log.rows[-1] if run.log and run.log.rows else {}
    return last, (stop.signal if run.step < max_steps else None)


def output_folder(args, rank: int) -> RunFolder | contextlib.nullcontext:
    """Rank 0 alone writes the run's files, and locks the folder while it does."""
    if rank != 0:
        return contextlib.nullcontext()
    return RunFolder(args.out_dir, args.resume, args.overwrite)


def throughput(run: Run, start: float) -> dict:
    """Tokens per second of the step that began at ``start``, and the model FLOPs utilisation of
    each device (``src/flops.py``)."""
    synchronize(run.device)  # a GPU's kernels are queued, not finished
    tokens_per_sec = run.args.batch_size * run.cfg.context_length / (time.perf_counter() - start)
    return {"tokens_per_sec": tokens_per_sec,
            "mfu": mfu(tokens_per_sec / run.world_size, run.cfg, run.peak_flops)}  # fmt: skip


# --8<-- [end:train]


def ensure_fused_available() -> None:
    """``--fused-attention`` is strict: no silent fallback to the plain path."""
    from src import fused_softmax

    try:
        fused_softmax.ensure_available()
    except RuntimeError as err:
        raise UserError(f"--fused-attention: {err}") from None


def ensure_flash_available() -> None:
    """``--flash-attention`` is strict too: no silent fallback to SDPA."""
    from src import flash_attention

    try:
        flash_attention.ensure_available()
    except RuntimeError as err:
        raise UserError(f"--flash-attention: {err}") from None


def _main(args) -> int:
    last, stopped = train(args)
    if stopped is not None:
        print(f"stopped at step {last.get('step')}; continue with the same command plus --resume",
              file=sys.stderr)  # fmt: skip
        return 128 + stopped
    if last.get("val_loss") is not None:
        utilisation = f", MFU {last['mfu']:.1%}" if last.get("mfu") else ""
        print(f"final validation loss {last['val_loss']:.3f}, perplexity "
              f"{format_perplexity(last['val_loss'])}{utilisation}; outputs in {args.out_dir}",
              file=sys.stderr)  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), _main, argv)


if __name__ == "__main__":
    sys.exit(main())
