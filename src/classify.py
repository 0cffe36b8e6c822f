"""Classification finetuning: turn a GPT into a classifier of text, such as spam or not spam.

A pretrained GPT already turns text into rich vectors; what it lacks is a way to answer with one of a
few labels. We give it one by replacing its output head, ``emb_dim -> vocab_size``, with a small new
head, ``emb_dim -> num_classes``, and finetuning on labelled examples.

**Why the last token.** The model produces one vector per token, but a label belongs to the whole
text. Causal attention lets each position see only the tokens up to itself, so the *last* token is
the only one whose vector has seen the entire text: its logits are the ones we train and read. With
right-padded batches the last token of each text sits at a different position, so we take the
logits at position ``length - 1`` of each row, and the padding after it, which that position never
sees, changes nothing.

**Which layers to train** (``--trainable``). The new head must train. Beyond it:

- ``last-block``: the last transformer block and the final LayerNorm too. Lower blocks hold general
  features of language that transfer as they are; training only the top is fast and needs little
  memory, and in the book's experiments it is about as accurate as training everything.
- ``all``: every parameter; the most adaptable and the most expensive (AdamW keeps two more numbers
  per parameter).
- ``lora``: low-rank updates of all the blocks' Linear layers (``src/lora.py``), plus the head.

The data is a CSV or TSV file with a text column and a label column, or the built-in SMS Spam
Collection (Almeida and Hidalgo, 2011), downloaded once and checked for its structure. Options
balance the classes by undersampling and split the examples into train, validation and test sets.
The run reports accuracy and a confusion matrix per split and saves the classifier; ``--predict``
classifies new text with it.
"""

import argparse
import csv
import io
import json
import math
import random
import sys
import zipfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from src.checkpoints import load_model
from src.cli import Parser, run_command
from src.errors import UserError
from src.files import cache_dir, download, write_atomically
from src.finetune import (
    add_finetune_arguments,
    claim_out_dir,
    finetune,
    fit_to_context,
    in_order,
    load_base_model,
    plan,
    set_trainable,
)
from src.model import GPTModel
from src.training import autocast, resolve_device

# --8<-- [start:sms_spam]
SMS_SPAM = "sms-spam"
SMS_SPAM_URL = "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip"
SMS_SPAM_LABELS = ("ham", "spam")
# The archive's published sha256 (203,415 bytes; 5,574 messages, 747 of them spam).
SMS_SPAM_SHA256 = "1587ea43e58e82b14ff1f5425c88e17f8496bfcdb67a583dbff9eefaf9963ce3"


def load_sms_spam(
    cache: Path | None = None, url: str = SMS_SPAM_URL, sha256: str = SMS_SPAM_SHA256
) -> list[tuple[str, str]]:
    """The SMS Spam Collection as (text, label) pairs, downloaded once into the cache.

    The archive holds ``SMSSpamCollection``: one message per line, ``label<TAB>text``, the label
    ``ham`` or ``spam``. The archive must have the published checksum, and its structure is checked.
    """
    path = Path(cache or cache_dir()) / "downloads" / f"{sha256}.zip"
    try:
        archive = download(url, sha256, path)
    except UserError as err:
        raise UserError(
            f"could not get the SMS Spam Collection ({err}); on a machine with network, download "
            f"{url} and put it at {path}, or pass your own CSV/TSV with --data"
        ) from None
    return _parse_sms_spam(_sms_spam_text(archive, url), url)


def _sms_spam_text(archive: bytes, source: str) -> str:
    try:
        with zipfile.ZipFile(io.BytesIO(archive)) as zf:
            return zf.read("SMSSpamCollection").decode("utf-8")
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError) as err:
        raise UserError(f"{source} is not the SMS Spam Collection archive ({err})") from None


def _parse_sms_spam(text: str, source) -> list[tuple[str, str]]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        label, tab, message = line.partition("\t")
        if not tab or label not in SMS_SPAM_LABELS or not message:
            raise UserError(
                f"{source} line {number}: expected 'ham' or 'spam', a tab, and a message"
            )
        rows.append((message, label))
    if {label for _, label in rows} != set(SMS_SPAM_LABELS):
        raise UserError(f"{source}: expected both ham and spam messages")
    return rows


# --8<-- [end:sms_spam]


# --8<-- [start:table]
def read_table(path: str | Path, text_column: str, label_column: str) -> list[tuple[str, str]]:
    """(text, label) pairs from a CSV file, or a TSV file (``.tsv``/``.tab``), with a header row,
    in UTF-8 (a byte-order mark, as spreadsheet programs write, is allowed)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file (expected a CSV/TSV file or {SMS_SPAM!r})")
    delimiter = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    try:
        text = path.read_bytes().decode("utf-8-sig")
        records = list(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter))
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not UTF-8 text (invalid byte at offset {err.start}); "
                        "save it as UTF-8, e.g. with iconv -t UTF-8") from None  # fmt: skip
    except csv.Error as err:
        raise UserError(f"{path} is not a readable CSV/TSV file ({err})") from None
    columns = records[0] if records else []
    missing = [c for c in (text_column, label_column) if c not in columns]
    if missing:
        raise UserError(
            f"{path} has no column {missing[0]!r} (its columns: {', '.join(columns) or 'none'}); "
            "name the columns with --text-column and --label-column"
        )
    rows = []
    for number, record in enumerate(records[1:], start=2):
        if len(record) != len(columns):
            raise UserError(f"{path} line {number} has {len(record)} fields, the header "
                            f"{len(columns)}")  # fmt: skip
        row = dict(zip(columns, record, strict=True))
        rows.append((row[text_column], row[label_column]))
    if not rows:
        raise UserError(f"{path} has a header but no rows")
    return rows


def check_labels(
    rows: Sequence[tuple[str, str]], labels: Sequence[str] | None, source
) -> list[str]:
    """The label set: ``labels`` if given (every row's label must be in it), else the sorted
    distinct labels of the data. A classifier needs at least two."""
    for number, (_, label) in enumerate(rows, start=1):
        if not label.strip():
            raise UserError(f"{source} row {number}: the label is empty")
        if labels and label not in labels:
            raise UserError(
                f"{source} row {number}: label {label!r} is not in the label set ({', '.join(labels)})"
            )
    labels = list(labels) if labels else sorted({label for _, label in rows})
    if len(labels) < 2:
        raise UserError(f"{source}: a classifier needs at least two labels, found {labels}")
    return labels


def balance(rows: Sequence[tuple[str, str]], seed: int) -> list[tuple[str, str]]:
    """Undersample: keep a random subset of every class as large as the smallest class.

    With 87% ham, a model that always says "ham" scores 87%; on balanced data it scores 50%, so
    accuracy means what it says. The price is the discarded examples."""
    by_label: dict[str, list] = {}
    for row in rows:
        by_label.setdefault(row[1], []).append(row)
    smallest = min(len(group) for group in by_label.values())
    rng = random.Random(seed)
    kept = [row for group in by_label.values() for row in rng.sample(group, smallest)]
    rng.shuffle(kept)
    return kept


def split_rows(rows: Sequence, fractions: Sequence[float], seed: int) -> tuple[list, list, list]:
    """Shuffle, then cut into train / validation / test by ``fractions`` (summing to 1)."""
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    n_train = int(len(rows) * fractions[0])
    n_val = int(len(rows) * fractions[1])
    return rows[:n_train], rows[n_train : n_train + n_val], rows[n_train + n_val :]


# --8<-- [end:table]


# --8<-- [start:pooling]
def encode_text(tokenizer, text: str) -> list[int]:
    """A text's ids. Text that spells ``<|endoftext|>`` is that text, not a document boundary; an
    empty text is the end-of-text token alone, so that it has a last token to classify by."""
    return tokenizer.encode(text, disallowed_special=()) or [tokenizer.eot_token or 0]


def collate(batch: Sequence[tuple[list[int], int]], pad_id: int):
    """Token ids padded to the batch's longest text, each text's length, and the label ids."""
    length = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), length), pad_id, dtype=torch.long)  # (B, T)
    for row, (tokens, _) in enumerate(batch):
        ids[row, : len(tokens)] = torch.tensor(tokens)
    lengths = torch.tensor([len(tokens) for tokens, _ in batch])  # (B,)
    labels = torch.tensor([label for _, label in batch])  # (B,)
    return ids, lengths, labels


def last_token_logits(logits: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, T, C) logits and (B,) lengths -> (B, C): each row's logits at its last real token."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits[rows, lengths.to(logits.device) - 1]  # (B, C)


def make_classifier(model: GPTModel, num_classes: int) -> GPTModel:
    """Replace the vocabulary head with a fresh ``emb_dim -> num_classes`` head, in place."""
    model.out_head = nn.Linear(model.cfg.emb_dim, num_classes).to(model.tok_emb.weight.device)
    model.cfg = replace(model.cfg, tie_weights=False)  # the new head shares nothing
    return model


# --8<-- [end:pooling]


# --8<-- [start:evaluate]
@torch.no_grad()
def predict_batches(model: GPTModel, batches) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted and true label ids over all batches."""
    model.eval()
    predicted, true = [], []
    for ids, lengths, labels in batches:
        predicted.append(last_token_logits(model(ids), lengths).argmax(dim=-1).cpu())
        true.append(labels.cpu())
    return torch.cat(predicted), torch.cat(true)


def confusion_matrix(
    predicted: torch.Tensor, true: torch.Tensor, num_classes: int
) -> list[list[int]]:
    """``matrix[t][p]``: how many examples of true class ``t`` were predicted as ``p``."""
    matrix = torch.zeros(num_classes, num_classes, dtype=torch.long)
    matrix.index_put_((true, predicted), torch.ones_like(true), accumulate=True)
    return matrix.tolist()


def format_confusion(matrix: list[list[int]], labels: Sequence[str]) -> str:
    width = max(8, *(len(label) + 2 for label in labels))
    lines = ["true \\ predicted".ljust(width + 8) + "".join(label.rjust(width) for label in labels)]
    for label, row in zip(labels, matrix, strict=True):
        lines.append(label.ljust(width + 8) + "".join(str(n).rjust(width) for n in row))
    return "\n".join(lines)


# --8<-- [end:evaluate]


# --8<-- [start:load_classifier]
def load_classifier(out_dir: str | Path, device: torch.device):
    """The classifier saved in ``out_dir`` (its latest checkpoint), its tokenizer and labels."""
    try:
        model, tokenizer, meta = load_model(Path(out_dir), device)
    except UserError as err:
        raise UserError(f"no classifier in {out_dir} ({err}); train one there first "
                        f"(--data ... --out-dir {out_dir})") from None  # fmt: skip
    labels = meta.get("labels")
    if not isinstance(labels, list) or len(labels) != model.out_head.weight.shape[0]:
        raise UserError(f"{out_dir} holds no classifier: its checkpoint has no labels for its head")
    return model, tokenizer, labels


@torch.no_grad()
def classify_text(
    model: GPTModel, tokenizer, labels: Sequence[str], text: str, too_long: str
) -> tuple[str, float]:
    """The most likely label of ``text`` and its probability. A text longer than the context is
    handled as in training (``too_long``: an error, or cut with a warning)."""
    ids = encode_text(tokenizer, text)
    ids = fit_to_context(ids, model.cfg.context_length, too_long, "the --predict text")
    logits = model(torch.tensor([ids], device=model.tok_emb.weight.device))[0, -1]  # (C,)
    probs = torch.softmax(logits.float(), dim=-1)
    best = int(probs.argmax())
    return labels[best], float(probs[best])


# --8<-- [end:load_classifier]


# --8<-- [start:cli]
def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m src.classify",
        description="Finetune a GPT to classify text, or classify text with a finetuned one (--predict).",
    )
    a = p.add_argument
    a("--data", help=f"CSV/TSV file with a header row, or {SMS_SPAM!r} (the SMS Spam Collection, "
      "downloaded once)")  # fmt: skip
    a("--text-column", default="text", help="column holding the text")
    a("--label-column", default="label", help="column holding the label")
    a("--labels", help="comma-separated label set; a row with another label is an error; the "
      "labels found when not given")  # fmt: skip
    a("--balance", action="store_true", help="undersample every class to the size of the smallest")
    a("--split", default="0.7,0.1,0.2", help="train,val,test fractions, summing to 1")
    a("--predict", action="append", metavar="TEXT", help="classify TEXT with the classifier saved "
      "in --out-dir and print label and probability (repeatable)")  # fmt: skip
    add_finetune_arguments(p, ("last-block", "all", "lora"), "last-block", default_lr=5e-5)
    return p


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), _run, argv)


def _run(args: argparse.Namespace) -> None:
    if args.predict:
        if args.out_dir is None:
            raise UserError("--predict needs --out-dir: the folder a classifier was saved to")
        model, tokenizer, labels = load_classifier(args.out_dir, resolve_device(args.device))
        for text in args.predict:
            label, prob = classify_text(model, tokenizer, labels, text, args.too_long)
            print(f"{label}\t{prob:.3f}\t{text}")
        return
    fractions = _parse_split(args.split)
    if args.data is None:
        raise UserError("--data is required to train (a CSV/TSV file or 'sms-spam')")
    with claim_out_dir(args) as folder:
        splits, labels = _load_splits(args, fractions)
        schedule = plan(args, len(splits["train"]))
        model, tokenizer, base = load_base_model(args)
        _train(args, folder, schedule, model, tokenizer, base, splits, labels)


def _load_splits(args, fractions) -> tuple[dict[str, list], list[str]]:
    """The labelled rows, checked, balanced if asked, and split into train, val and test."""
    if args.data == SMS_SPAM:
        rows = load_sms_spam()
    else:
        rows = read_table(args.data, args.text_column, args.label_column)
    wanted = (
        args.labels.split(",")
        if args.labels
        else (SMS_SPAM_LABELS if args.data == SMS_SPAM else None)
    )
    labels = check_labels(rows, wanted, args.data)
    if args.balance:
        rows = balance(rows, args.seed)
    splits = dict(
        zip(("train", "val", "test"), split_rows(rows, fractions, args.seed), strict=True)
    )
    if not all(splits.values()):
        raise UserError(f"{args.data}: {len(rows)} examples are too few for the split {args.split}")
    counts = {name: dict(Counter(label for _, label in split)) for name, split in splits.items()}
    print(f"data: {len(rows)} examples; per split: {counts}", file=sys.stderr)
    return splits, labels


def _train(args, folder, schedule, model, tokenizer, base, splits, labels) -> None:
    """Encode the splits, put a classification head on the model, finetune, report, save."""
    label_id = {label: i for i, label in enumerate(labels)}
    limit = model.cfg.context_length
    encoded = {
        name: [(fit_to_context(encode_text(tokenizer, text), limit, args.too_long,
                               f"{name} text {i}"), label_id[label])
               for i, (text, label) in enumerate(split)]
        for name, split in splits.items()
    }  # fmt: skip
    make_classifier(model, len(labels))
    lora = set_trainable(model, args.trainable, args.lora_rank, args.lora_alpha)
    device = model.tok_emb.weight.device
    pad_id = (
        tokenizer.eot_token if tokenizer.eot_token is not None else 0
    )  # never read: see pooling

    def to_device(group) -> tuple[torch.Tensor, ...]:
        return tuple(t.to(device) for t in collate(group, pad_id))

    def loss_fn(batch) -> torch.Tensor:
        ids, lengths, targets = batch
        with autocast(device, args.dtype):
            logits = last_token_logits(model(ids), lengths)  # (B, num_classes)
        return nn.functional.cross_entropy(logits.float(), targets)

    def evaluate(final: bool = False) -> dict:
        result = {}
        for split in ("train", "val", "test") if final else ("train", "val"):
            batches = (to_device(group) for group in in_order(encoded[split], args.batch_size))
            predicted, true = predict_batches(model, batches)
            result[f"{split}_accuracy"] = (predicted == true).float().mean().item()
            if final:
                result[f"{split}_confusion"] = confusion_matrix(predicted, true, len(labels))
        return result

    meta = base | {"labels": labels, "lora": lora}
    metrics = finetune(model, tokenizer, args, folder, schedule, encoded["train"], to_device,
                       loss_fn, evaluate, meta)  # fmt: skip
    final = evaluate(final=True)
    for split in ("train", "val", "test"):
        print(
            f"\n{split}: accuracy {final[f'{split}_accuracy']:.4f} ({len(splits[split])} examples)"
        )
        print(format_confusion(final[f"{split}_confusion"], labels))
    results = metrics | {"final": final, "labels": labels,
                         "split_sizes": {k: len(v) for k, v in splits.items()}}  # fmt: skip
    write_atomically(folder.path / "results.json", json.dumps(results, indent=1))


def _parse_split(text: str) -> tuple[float, float, float]:
    try:
        fractions = tuple(float(x) for x in text.split(","))
    except ValueError:
        fractions = ()
    if (len(fractions) != 3 or not all(math.isfinite(f) and f >= 0 for f in fractions)
            or abs(sum(fractions) - 1.0) > 1e-6):  # fmt: skip
        raise UserError(
            f"--split must be three fractions summing to 1, like 0.7,0.1,0.2; got {text!r}"
        )
    return fractions


# --8<-- [end:cli]


if __name__ == "__main__":
    sys.exit(main())
