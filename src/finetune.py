"""What the two finetuning commands share: the base model, what trains, and the training loop.

Classification (``src.classify``) and instruction finetuning (``src.instruct``) differ in their data
and their loss, and in nothing else. Both start from a model someone trained before (OpenAI's GPT-2,
a local safetensors file, a checkpoint of ``src.train``, or, for experiments, a fresh small model),
choose which of its parameters to update, and run a few epochs of the project's one optimizer step
(``src.training.optimizer_step``) over the project's one batching rule (``src.data.step_batch``),
with a progress bar and an atomic checkpoint after every epoch. This module holds those shared steps,
so each command reads as: load and check the data, define the loss, call ``finetune``.
"""

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from src.attention import ATTN_IMPLS
from src.checkpoints import save_checkpoint
from src.cli import (
    MetricsLog,
    RunFolder,
    add_model_source,
    count,
    load_model_source,
    non_negative,
    positive_int,
    progress_bar,
)
from src.data import fingerprint_of, step_batch
from src.errors import UserError
from src.lora import apply_lora, check_rank, lora_parameter_count, merged_model
from src.model import GPTModel
from src.training import Schedule, adamw, autocast, grad_scaler, optimizer_step, resolve_device


# --8<-- [start:arguments]
def add_finetune_arguments(
    p: argparse.ArgumentParser,
    trainable: tuple[str, ...],
    default_trainable: str,
    default_lr: float,
) -> None:
    """The flags every finetuning command has: where the base model comes from, what trains, how."""
    add_model_source(p, required=False, preset=True)
    p.add_argument("--attn-impl", choices=ATTN_IMPLS, default="sdpa", help="attention path")
    p.add_argument("--drop-rate", type=float, default=0.0, help="dropout while finetuning")
    t = p.add_argument_group("training").add_argument
    t("--trainable", choices=trainable, default=default_trainable,
      help="which parameters train; see the book's chapter for what each costs")  # fmt: skip
    t("--lora-rank", type=int, default=16, help="rank of the LoRA update with --trainable lora")
    t("--lora-alpha", type=float, default=16.0,
      help="LoRA scale alpha; the update is scaled by alpha/rank")  # fmt: skip
    t("--epochs", type=positive_int, default=2, help="passes over the training split")
    t("--batch-size", type=positive_int, default=8, help="examples per optimizer step")
    t("--lr", type=float, default=default_lr, help="peak learning rate")
    t("--min-lr", type=float, help="learning rate reached at the end by cosine decay; --lr (a "
      "constant rate) when not given")  # fmt: skip
    t("--warmup-steps", type=count, default=0, help="steps of linear warmup")
    t("--weight-decay", type=non_negative, default=0.1, help="AdamW weight decay on matrices")
    t("--grad-clip", type=non_negative, default=1.0, help="clip the gradient norm to this (0: off)")
    t("--too-long", choices=("error", "truncate"), default="error",
      help="an example longer than the context: stop with an error, or cut it and warn")  # fmt: skip
    t("--seed", type=int, default=123, help="seed for initialisation, shuffling and splits")
    t("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    t("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="autocast precision")
    t("--out-dir", help="where the model, metrics and results go (required to train)")
    t("--overwrite", action="store_true",
      help="replace the run that --out-dir already holds")  # fmt: skip
    t("--quiet", action="store_true", help="no progress bar")


def claim_out_dir(args: argparse.Namespace) -> RunFolder:
    """The locked output folder, checked before any data is read: never the base model's own."""
    if args.out_dir is None:
        raise UserError("--out-dir is required: it receives the finetuned model and its metrics")
    out = Path(args.out_dir).resolve()
    if args.checkpoint and out in (
        Path(args.checkpoint).resolve(),
        *Path(args.checkpoint).resolve().parents,
    ):
        raise UserError(f"--out-dir {args.out_dir} holds the base checkpoint {args.checkpoint}; "
                        "finetuning there would replace it: choose another --out-dir")  # fmt: skip
    autocast(resolve_device(args.device), args.dtype)  # refuses fp16 off CUDA now, not mid-run
    if args.trainable == "lora":
        check_rank(args.lora_rank)
    return RunFolder(args.out_dir, overwrite=args.overwrite)


# --8<-- [end:arguments]


# --8<-- [start:fit]
def fit_to_context(ids: list[int], limit: int, too_long: str, where: str) -> list[int]:
    """``ids`` if it has at most ``limit`` tokens; otherwise an error, or its first ``limit`` tokens
    with a warning (``too_long`` is ``"error"`` or ``"truncate"``)."""
    if len(ids) <= limit:
        return ids
    if too_long == "error":
        raise UserError(
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
    model, tokenizer, ref = load_model_source(
        args, device, drop_rate=args.drop_rate, attn_impl=args.attn_impl
    )
    meta = {"tokenizer": {"ref": ref, "fingerprint": fingerprint_of(tokenizer)}}
    return model.train(), tokenizer, meta


# --8<-- [end:base_model]


# --8<-- [start:trainable]
# The Linear layers of a transformer block, by the names they have in src/model.py.
BLOCK_LINEARS = ("W_query", "W_key", "W_value", "out_proj", "ff.fc", "ff.proj")


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
def plan(args: argparse.Namespace, n_train: int) -> Schedule:
    """The learning rate of every step, checked as soon as the data's size is known, before any
    model is loaded: ``--epochs`` passes over ``n_train`` examples in batches of ``--batch-size``
    (an epoch's last partial batch is dropped, as in ``step_batch``)."""
    steps_per_epoch = n_train // args.batch_size
    if steps_per_epoch < 1:
        raise UserError(
            f"--batch-size {args.batch_size} is larger than the {n_train} training examples"
        )
    min_lr = args.lr if args.min_lr is None else args.min_lr
    return Schedule(args.lr, min_lr, args.warmup_steps, args.epochs * steps_per_epoch)


def in_order(examples: Sequence, batch_size: int):
    """Consecutive groups of ``batch_size`` examples, the last perhaps smaller: for evaluation,
    which must see every example, in the same order each time."""
    for i in range(0, len(examples), batch_size):
        yield examples[i : i + batch_size]


def finetune(
    model: GPTModel,
    tokenizer,
    args: argparse.Namespace,
    folder: RunFolder,
    schedule: Schedule,
    train_examples: Sequence,
    collate: Callable[[list], object],
    loss_fn: Callable[[object], torch.Tensor],
    evaluate: Callable[[], dict],
    meta: dict,
) -> dict:
    """Train along ``schedule`` (from ``plan``); evaluate before and after each epoch; save after each.

    The batch of step ``s`` is ``collate`` of the examples ``step_batch`` picks, ``loss_fn(batch)``
    its mean loss, ``evaluate()`` a dict of numbers. Every evaluation is appended to
    ``metrics.jsonl``; after each epoch the model, with any LoRA update merged in, is saved as a
    checkpoint, with the tokenizer and ``meta`` beside it. Returns the first and last evaluation.
    """
    folder.clear()  # an earlier run's files, with --overwrite; nothing otherwise
    log = MetricsLog(folder.path / "metrics.jsonl")
    print(describe_trainable(model), file=sys.stderr)
    optimizer = adamw(model, args.lr, args.weight_decay)
    scaler = grad_scaler(model.tok_emb.weight.device, args.dtype)  # a no-op unless fp16
    n = len(train_examples)
    steps_per_epoch = n // args.batch_size
    start = time.perf_counter()
    first = record(log, {"epoch": 0, "step": 0} | evaluate())
    last = first
    with progress_bar(schedule.max_steps, disable=args.quiet) as bar:
        model.train()
        for step in range(schedule.max_steps):
            for group in optimizer.param_groups:
                group["lr"] = schedule(step)
            batch = collate(
                [train_examples[i] for i in step_batch(step, n, args.batch_size, args.seed)]
            )
            loss, _ = optimizer_step(
                model, optimizer, [batch], loss_fn, step + 1, args.grad_clip, scaler
            )
            bar.update()
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{schedule(step):.2e}")
            if (step + 1) % steps_per_epoch == 0:
                epoch = (step + 1) // steps_per_epoch
                seconds = {"seconds": round(time.perf_counter() - start, 1)}
                last = record(log, {"epoch": epoch, "step": step + 1} | evaluate() | seconds)
                state = meta | {"step": step + 1, "epoch": epoch, "metrics": last,
                                "config": model.cfg.to_dict()}  # fmt: skip
                save_checkpoint(folder.path, merged_model(model), optimizer, tokenizer, state)
                model.train()
    return {"before": first, "after": last}


def record(log: MetricsLog, entry: dict) -> dict:
    """Append an evaluation to the metrics file and print it: ``epoch 1  step 18  val_loss 0.93``."""
    log.append(entry)
    printable = {k: v for k, v in entry.items() if not isinstance(v, (list, dict))}
    print("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                    for k, v in printable.items()), file=sys.stderr)  # fmt: skip
    return entry


# --8<-- [end:finetune]
