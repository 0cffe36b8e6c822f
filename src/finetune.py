"""What the two finetuning commands share: the base model, what trains, and the training loop.

Classification (``src.classify``) and instruction finetuning (``src.instruct``) differ in their data
and their loss, and in nothing else. Both start from a model someone trained before (OpenAI's GPT-2,
a local safetensors file, a checkpoint of ``src.train``, or, for experiments, a fresh small model),
choose which of its parameters to update, and run a few epochs of AdamW with the schedule, progress
display and atomic checkpoints of ``src.training``. This module holds those shared steps, so each
command reads as: load and check the data, define the loss, call ``finetune``.
"""

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from src.attention import ATTN_IMPLS
from src.data import DataError, fingerprint_of
from src.gpt2 import GPT2_REPOS, WeightsNotFound, load_pretrained
from src.lora import apply_lora, lora_parameter_count, merged_model
from src.model import PRESETS, GPTConfig, GPTModel
from src.tokenizer import TokenizerNotFound, get_tokenizer
from src.training import (
    ConfigError,
    NonFiniteLossError,
    adamw,
    autocast,
    check_finite,
    grad_scaler,
    load_model,
    lr_at,
    progress_bar,
    resolve_device,
    save_checkpoint,
)


# --8<-- [start:arguments]
def add_common_arguments(
    p: argparse.ArgumentParser,
    trainable: tuple[str, ...],
    default_trainable: str,
    default_lr: float,
) -> None:
    """The flags every finetuning command has: where the base model comes from, what trains, how."""
    base = p.add_argument_group("base model (one of; default: --pretrained gpt2)")
    source = base.add_mutually_exclusive_group()
    source.add_argument(
        "--pretrained",
        choices=list(GPT2_REPOS),
        help="OpenAI GPT-2 weights, downloaded once and cached",
    )
    source.add_argument(
        "--weights",
        help="a local GPT-2 .safetensors file, or a folder with model.safetensors and config.json",
    )
    source.add_argument(
        "--base-checkpoint", help="a run folder or checkpoint written by python -m src.train"
    )
    source.add_argument(
        "--preset",
        choices=list(PRESETS),
        help="a freshly initialised model of this size (for experiments)",
    )
    base.add_argument(
        "--tokenizer", default=None,
        help="'gpt2', a folder with GPT-2's encoder.json and vocab.bpe, or a saved BPE tokenizer file "
        "(default: the base checkpoint's tokenizer, else gpt2)",
    )  # fmt: skip
    base.add_argument(
        "--attn-impl", choices=ATTN_IMPLS, default="sdpa", help="attention path (default: sdpa)"
    )
    base.add_argument(
        "--drop-rate", type=float, default=0.0, help="dropout while finetuning (default: 0.0)"
    )

    train = p.add_argument_group("training")
    train.add_argument(
        "--trainable", choices=trainable, default=default_trainable,
        help=f"which parameters train: {', '.join(trainable)} (default: {default_trainable}); "
        "see the book's chapter for what each costs",
    )  # fmt: skip
    train.add_argument(
        "--lora-rank",
        type=int,
        default=16,
        help="rank of the LoRA update with --trainable lora (default: 16)",
    )
    train.add_argument(
        "--lora-alpha",
        type=float,
        default=16.0,
        help="LoRA scale alpha; the update is scaled by alpha/rank (default: 16)",
    )
    train.add_argument(
        "--epochs", type=int, default=2, help="passes over the training split (default: 2)"
    )
    train.add_argument(
        "--batch-size", type=int, default=8, help="examples per optimizer step (default: 8)"
    )
    train.add_argument(
        "--lr", type=float, default=default_lr, help=f"peak learning rate (default: {default_lr:g})"
    )
    train.add_argument(
        "--min-lr",
        type=float,
        default=None,
        help="learning rate reached at the end by cosine decay (default: --lr, a constant rate)",
    )
    train.add_argument(
        "--warmup-steps", type=int, default=0, help="steps of linear warmup (default: 0)"
    )
    train.add_argument(
        "--weight-decay",
        type=float,
        default=0.1,
        help="AdamW weight decay on matrices (default: 0.1)",
    )
    train.add_argument(
        "--grad-clip",
        type=float,
        default=1.0,
        help="clip the gradient norm to this (0: off; default: 1.0)",
    )
    train.add_argument(
        "--too-long", choices=("error", "truncate"), default="error",
        help="an example longer than the context: stop with an error, or cut it and warn (default: error)",
    )  # fmt: skip
    train.add_argument(
        "--seed",
        type=int,
        default=123,
        help="seed for initialisation, shuffling and splits (default: 123)",
    )
    train.add_argument(
        "--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)"
    )
    train.add_argument(
        "--dtype",
        choices=("fp32", "bf16", "fp16"),
        default="fp32",
        help="autocast precision (default: fp32)",
    )
    train.add_argument(
        "--out-dir",
        default=None,
        help="where the model, metrics and results go (required to train)",
    )
    train.add_argument("--quiet", action="store_true", help="no progress bar")


# --8<-- [end:arguments]


# --8<-- [start:run_command]
def run_command(parser: argparse.ArgumentParser, argv: list[str] | None, body: Callable) -> int:
    """Parse the flags and run ``body(args)``; bad input ends in one line on stderr and exit code 2,
    Ctrl-C in a note that the last checkpoint (saved after each epoch) is kept."""
    args = parser.parse_args(argv)
    try:
        body(args)
    except (ConfigError, DataError, WeightsNotFound, TokenizerNotFound, NonFiniteLossError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: the checkpoint of the last finished epoch is kept", file=sys.stderr)
        return 130
    return 0


def check_training_arguments(args: argparse.Namespace) -> None:
    """Catch settings that cannot work before any data is read or any file is written."""
    if args.out_dir is None:
        raise ConfigError("--out-dir is required: it receives the finetuned model and its metrics")
    for flag in ("epochs", "batch_size"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.trainable == "lora" and args.lora_rank <= 0:
        raise ConfigError(f"--lora-rank must be a positive integer, got {args.lora_rank}")
    if not 0.0 <= args.drop_rate < 1.0:
        raise ConfigError(f"--drop-rate must be in [0, 1), got {args.drop_rate}")
    autocast(resolve_device(args.device), args.dtype)  # refuses fp16 off CUDA now, not mid-run


# --8<-- [end:run_command]


# --8<-- [start:fit]
def fit_to_context(ids: list[int], limit: int, too_long: str, where: str) -> list[int]:
    """``ids`` if it has at most ``limit`` tokens; otherwise an error, or its first ``limit`` tokens
    with a warning (``too_long`` is ``"error"`` or ``"truncate"``)."""
    if len(ids) <= limit:
        return ids
    if too_long == "error":
        raise DataError(
            f"{where} has {len(ids)} tokens, more than the {limit} the model's context allows; "
            "shorten it, or pass --too-long truncate to cut such examples"
        )
    print(f"warning: {where} has {len(ids)} tokens; cut to {limit}", file=sys.stderr)
    return ids[:limit]


# --8<-- [end:fit]


# --8<-- [start:base_model]
def load_base_model(args: argparse.Namespace) -> tuple[GPTModel, object, dict]:
    """The model to finetune (on the chosen device), its tokenizer, and what to record about them."""
    torch.manual_seed(args.seed)
    device = resolve_device(args.device)
    fields = dict(drop_rate=args.drop_rate, attn_impl=args.attn_impl)
    if args.base_checkpoint:
        trained, tokenizer, meta = load_model(Path(args.base_checkpoint), device)
        model = GPTModel(GPTConfig(**(trained.cfg.to_dict() | fields)))
        model.load_state_dict(trained.state_dict())
        tokenizer_ref = args.tokenizer or meta["tokenizer"]["ref"]
        if args.tokenizer:
            tokenizer = get_tokenizer(args.tokenizer)
    else:
        tokenizer_ref = args.tokenizer or "gpt2"
        tokenizer = get_tokenizer(tokenizer_ref)
        if args.preset:
            cfg = GPTConfig.from_preset(args.preset, vocab_size=tokenizer.n_vocab, **fields)
            model = GPTModel(cfg)
        else:
            model = load_pretrained(args.weights or args.pretrained or "gpt2", **fields)
    if tokenizer.n_vocab > model.cfg.vocab_size:
        raise ConfigError(
            f"the tokenizer has {tokenizer.n_vocab} tokens but the model only {model.cfg.vocab_size}; "
            "use the tokenizer the model was trained with"
        )
    meta = {"tokenizer": {"ref": tokenizer_ref, "fingerprint": fingerprint_of(tokenizer)}}
    return model.to(device).train(), tokenizer, meta


# --8<-- [end:base_model]


# --8<-- [start:trainable]
# The Linear layers of a transformer block, by the names they have in src/model.py.
BLOCK_LINEARS = ("W_query", "W_key", "W_value", "out_proj", "ff.layers.0", "ff.layers.2")


def set_trainable(model: GPTModel, what: str, lora_rank: int, lora_alpha: float) -> dict | None:
    """Choose the parameters that train; return the LoRA settings, if any, for the record.

    - ``all``: every parameter. Most adaptable; AdamW keeps two extra copies of each.
    - ``last-block``: the last transformer block, the final norm and the output head. The lower
      blocks hold general features of language that the task can reuse as they are.
    - ``lora``: low-rank updates of every Linear layer in the blocks (``src/lora.py``); the output
      head trains fully when it is new (a classifier's), and stays frozen otherwise.
    """
    if what == "all":
        model.requires_grad_(True)
        return None
    if what == "last-block":
        model.requires_grad_(False)
        for module in (model.trf_blocks[-1], model.final_norm, model.out_head):
            module.requires_grad_(True)
        return None
    apply_lora(model, lora_rank, lora_alpha, targets=BLOCK_LINEARS)
    new_head = model.out_head.weight.shape[0] != model.cfg.vocab_size
    model.out_head.requires_grad_(new_head)
    return {"rank": lora_rank, "alpha": lora_alpha, "targets": list(BLOCK_LINEARS)}


def describe_trainable(model: nn.Module) -> str:
    total = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lora = lora_parameter_count(model)
    text = f"training {trained:,} of {total:,} parameters ({100 * trained / total:.2f}%)"
    return text + (f", of which {lora:,} in LoRA matrices" if lora else "")


# --8<-- [end:trainable]


# --8<-- [start:finetune]
def minibatches(examples: list, batch_size: int, generator: torch.Generator | None = None):
    """Consecutive groups of ``batch_size`` examples (the last may be smaller), in a random order
    drawn from ``generator`` when one is given, else in order. Each command collates a group into
    tensors its own way."""
    order = list(range(len(examples)))
    if generator is not None:
        order = torch.randperm(len(examples), generator=generator).tolist()
    for i in range(0, len(order), batch_size):
        yield [examples[j] for j in order[i : i + batch_size]]


def finetune(
    model: GPTModel,
    tokenizer,
    args: argparse.Namespace,
    batches: Callable[..., Iterable],
    loss_fn: Callable[[object], torch.Tensor],
    evaluate: Callable[[], dict],
    n_train: int,
    meta: dict,
) -> dict:
    """Train for ``args.epochs`` epochs; evaluate before and after each; save after each.

    ``batches("train", generator)`` yields training batches in a random order, ``loss_fn(batch)``
    returns their mean loss, ``evaluate()`` a dict of numbers. Every evaluation is appended to
    ``out_dir/metrics.jsonl``; after each epoch the model, with any LoRA update merged in, is saved
    as a checkpoint of ``src.training``, with the tokenizer and ``meta`` beside it. Returns the
    first and the last evaluation.
    """
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = out_dir / "metrics.jsonl"
    log.write_text("")  # this run's metrics only
    print(describe_trainable(model), file=sys.stderr)
    optimizer = adamw(model, args.lr, args.weight_decay)
    scaler = grad_scaler(model.tok_emb.weight.device, args.dtype)  # a no-op unless fp16
    steps_per_epoch = -(-n_train // args.batch_size)
    max_steps = args.epochs * steps_per_epoch
    min_lr = args.lr if args.min_lr is None else args.min_lr
    generator = torch.Generator().manual_seed(args.seed)

    def record(entry: dict) -> dict:
        with open(log, "a") as f:  # appended as we go: an interrupted run keeps what it logged
            f.write(json.dumps(entry) + "\n")
        print(
            "  ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in entry.items()
            ),
            file=sys.stderr,
        )
        return entry

    start = time.perf_counter()
    first = record({"epoch": 0, "step": 0} | evaluate())
    step, last = 0, first
    bar = progress_bar(max_steps, disable=args.quiet)
    try:
        for epoch in range(1, args.epochs + 1):
            model.train()
            for batch in batches("train", generator):
                lr = lr_at(step, args.lr, min_lr, args.warmup_steps, max_steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss = loss_fn(batch)
                check_finite(loss, step)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if args.grad_clip > 0:
                    scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
                    nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                step += 1
                bar.update()
                bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}", lr=f"{lr:.2e}")
            last = record(
                {"epoch": epoch, "step": step}
                | evaluate()
                | {"seconds": round(time.perf_counter() - start, 1)}
            )
            state = meta | {
                "step": step,
                "epoch": epoch,
                "metrics": last,
                "config": model.cfg.to_dict(),
            }
            save_checkpoint(out_dir, merged_model(model), optimizer, tokenizer, state)
    finally:
        bar.close()
    return {"before": first, "after": last}


# --8<-- [end:finetune]
