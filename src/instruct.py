"""Instruction finetuning: teach a pretrained model to answer a request instead of continuing it.

A pretrained GPT continues text. Asked "Name three primes.", it may well write more questions. To make
it respond, we finetune it on examples of requests and the responses we want, each laid out in one
fixed prompt format, so that after training the format itself cues a response. We use the Alpaca
format: a JSON list of ``{"instruction", "input", "output"}`` entries, rendered as

    Below is an instruction that describes a task. ...
    ### Instruction:            <- what to do
    ### Input:                  <- optional material to do it on
    ### Response:               <- the model learns to write what follows, then <|endoftext|>

Training is next-token prediction, as in pretraining, with three details:

- **Dynamic padding.** Examples differ in length; each batch is padded only to its own longest one.
- **-100 targets.** Padding positions must not count in the loss. PyTorch's cross-entropy skips
  every target equal to ``ignore_index=-100``, so padding targets are set to -100, except the first
  end-of-text token after each response: predicting it is how the model learns to *stop*.
- **Prompt masking (optional).** Setting the targets inside the prompt to -100 too trains the model
  only on writing responses, not on reproducing prompts.

After training, the command writes the model's responses to the test split as JSON and scores them
against the references with two simple automatic measures, exact match and token F1.
"""

import argparse
import json
import re
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from src.cli import Parser, positive_int, run_command
from src.errors import UserError
from src.files import write_atomically
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
from src.generate import generate
from src.lora import merge_lora
from src.training import autocast, cross_entropy

IGNORE_INDEX = -100  # F.cross_entropy's default ignore_index: these targets add nothing to the loss


# --8<-- [start:format]
PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)


def format_prompt(entry: dict) -> str:
    """The prompt for one entry: everything the model sees before it starts to respond."""
    text = f"{PREAMBLE}\n\n### Instruction:\n{entry['instruction']}"
    if entry["input"]:  # many instructions need no input; then the section is left out
        text += f"\n\n### Input:\n{entry['input']}"
    return text + "\n\n### Response:\n"


# --8<-- [end:format]


# --8<-- [start:load]
KEYS = ("instruction", "input", "output")


def load_instructions(path: str | Path) -> list[dict]:
    """Read and check an Alpaca-format JSON file: a list of objects with string values for
    ``instruction``, ``input`` (may be empty) and ``output``."""
    path = Path(path)
    try:
        data = json.loads(path.read_bytes().decode("utf-8-sig"))
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (IsADirectoryError, PermissionError) as err:
        raise UserError(f"{path}: cannot be read ({err.strerror})") from None
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not UTF-8 text (invalid byte at offset {err.start})") from None
    except json.JSONDecodeError as err:
        raise UserError(
            f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})"
        ) from None
    if not isinstance(data, list) or not data:
        raise UserError(
            f"{path}: expected a non-empty JSON list of {{instruction, input, output}} objects"
        )
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise UserError(f"{path}: entry {i} is not a JSON object")
        missing = [k for k in KEYS if k not in entry]
        if missing:
            raise UserError(
                f"{path}: entry {i} has no {', '.join(missing)} (each entry needs {', '.join(KEYS)})"
            )
        wrong = [k for k in KEYS if not isinstance(entry[k], str)]
        if wrong:
            raise UserError(f"{path}: entry {i}: {wrong[0]!r} must be a string")
    return data


def split_instructions(data: Sequence[dict], train: float = 0.85, test: float = 0.10):
    """First 85% train, next 10% test, the rest validation, in file order (the file is already
    shuffled; keeping its order makes the split the same everywhere). 1,100 -> 935 / 55 / 110."""
    n_train, n_test = int(len(data) * train), int(len(data) * test)
    train_set = list(data[:n_train])
    test_set = list(data[n_train : n_train + n_test])
    val_set = list(data[n_train + n_test :])
    return train_set, val_set, test_set


# --8<-- [end:load]


# --8<-- [start:encode]
def encode_example(
    entry: dict, tokenizer, max_tokens: int, too_long: str, where: str
) -> tuple[list[int], int]:
    """Token ids of prompt + response + end-of-text, and how many of them are the prompt.

    ``max_tokens`` is the context length + 1: the model reads all ids but the last and predicts all
    but the first. A longer example is cut (``too_long="truncate"``, with a warning) or an error.
    """
    # User text that spells <|endoftext|> is text: only the one we append ends the example.
    prompt = tokenizer.encode(format_prompt(entry), disallowed_special=())
    ids = prompt + tokenizer.encode(entry["output"], disallowed_special=()) + [tokenizer.eot_token]
    return fit_to_context(ids, max_tokens, too_long, where), len(prompt)


def collate(
    batch: Sequence[tuple[list[int], int]], pad_id: int, mask_prompt: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets for a batch of ``(ids, prompt_length)``, padded to its longest example.

    ``ids`` ends with one end-of-text token. Inputs are ``ids[:-1]`` padded with ``pad_id``; targets
    are ``ids[1:]`` (the next token at each position) padded with -100, so the end-of-text target
    is kept and every padding target is ignored. With ``mask_prompt``, the targets that predict
    prompt tokens are -100 too; the first target kept is the response's first token.
    """
    length = max(len(ids) for ids, _ in batch) - 1
    inputs = torch.full((len(batch), length), pad_id, dtype=torch.long)  # (B, T)
    targets = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    for row, (ids, prompt_length) in enumerate(batch):
        n = len(ids) - 1
        inputs[row, :n] = torch.tensor(ids[:-1])
        targets[row, :n] = torch.tensor(ids[1:])
        if mask_prompt:
            # Target j predicts token j + 1: tokens 1 .. prompt_length - 1 belong to the prompt.
            targets[row, : prompt_length - 1] = IGNORE_INDEX
    return inputs, targets


# --8<-- [end:encode]


# --8<-- [start:score]
def _words(text: str) -> list[str]:
    """Lowercased words without punctuation: 'The answer is 4.' -> ['the', 'answer', 'is', '4']."""
    return re.findall(r"\w+", text.lower())


def exact_match(response: str, reference: str) -> float:
    return float(_words(response) == _words(reference))


def token_f1(response: str, reference: str) -> float:
    """Harmonic mean of precision and recall of the response's words against the reference's
    (each word counted as often as it occurs in both). 1 for the same words, 0 for none shared."""
    got, want = _words(response), _words(reference)
    if not got or not want:
        return float(got == want)
    common = sum((Counter(got) & Counter(want)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(got), common / len(want)
    return 2 * precision * recall / (precision + recall)


# --8<-- [end:score]


# --8<-- [start:respond]
@torch.no_grad()
def respond(
    model, tokenizer, entries: Sequence[dict], max_new_tokens: int, device, quiet: bool = False
) -> list[str]:
    """Greedy responses to each entry's prompt, cut at the first end-of-text token."""
    model.eval()
    context_length = model.cfg.context_length
    responses = []
    for entry in tqdm(entries, desc="responses", disable=quiet, dynamic_ncols=True):
        prompt = tokenizer.encode(format_prompt(entry), disallowed_special=())[-context_length:]
        idx = torch.tensor([prompt], device=device)
        out = generate(model, idx, max_new_tokens, context_length, eos_id=tokenizer.eot_token)
        new = out[0, len(prompt) :].tolist()
        if tokenizer.eot_token in new:
            new = new[: new.index(tokenizer.eot_token)]
        responses.append(tokenizer.decode(new).strip())
    return responses


# --8<-- [end:respond]


# --8<-- [start:cli]
def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m src.instruct",
        description="Finetune a GPT to follow instructions (Alpaca-format JSON: instruction, input, "
        "output). Splits the data 85/5/10 into train/val/test in file order, trains, writes the "
        "model's responses to the test split to OUT_DIR/responses.json and scores them.",
    )
    a = p.add_argument
    a(
        "--data",
        required=True,
        help="Alpaca-format JSON file (a list of {instruction, input, output})",
    )
    a("--mask-prompt", action="store_true",
      help="exclude the prompt tokens from the loss, training only on responses")  # fmt: skip
    a("--max-new-tokens", type=positive_int, default=256,
      help="longest response generated per test example")  # fmt: skip
    a("--limit-test", type=positive_int,
      help="generate responses for only the first N test examples; all when not given")  # fmt: skip
    add_finetune_arguments(p, ("all", "lora"), "all", default_lr=5e-5)
    return p


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), _run, argv)


def _run(args: argparse.Namespace) -> None:
    with claim_out_dir(args) as folder:
        data = load_instructions(args.data)
        train_set, val_set, test_set = split_instructions(data)
        if not (train_set and val_set and test_set):
            raise UserError(f"{args.data}: {len(data)} entries are too few for an 85/5/10 split")
        schedule = plan(args, len(train_set))
        model, tokenizer, base = load_base_model(args)
        if tokenizer.eot_token is None:
            raise UserError("the tokenizer has no <|endoftext|> token; instruction data needs one")
        print(f"data: {len(train_set)} train, {len(val_set)} val, {len(test_set)} test examples",
              file=sys.stderr)  # fmt: skip
        max_tokens = model.cfg.context_length + 1
        encoded = {
            name: [encode_example(e, tokenizer, max_tokens, args.too_long, f"{name} example {i}")
                   for i, e in enumerate(split)]
            for name, split in (("train", train_set), ("val", val_set))
        }  # fmt: skip
        metrics = _train(args, folder, schedule, model, tokenizer, base, encoded)
        _answer(args, folder, model, tokenizer, metrics, test_set)


def _train(args, folder, schedule, model, tokenizer, base, encoded) -> dict:
    lora = set_trainable(model, args.trainable, args.lora_rank, args.lora_alpha)
    device = model.tok_emb.weight.device

    def to_device(group) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = collate(group, tokenizer.eot_token, args.mask_prompt)
        return inputs.to(device), targets.to(device)

    def loss_fn(batch) -> torch.Tensor:
        inputs, targets = batch
        with autocast(device, args.dtype):
            logits = model(inputs)  # (B, T, vocab_size)
        return cross_entropy(logits, targets)

    @torch.no_grad()
    def evaluate() -> dict:
        model.eval()
        result = {}
        for split in ("train", "val"):
            total, count = 0.0, 0
            for inputs, targets in map(to_device, in_order(encoded[split], args.batch_size)):
                n = (targets != IGNORE_INDEX).sum().item()
                total += loss_fn((inputs, targets)).item() * n
                count += n
            result[f"{split}_loss"] = total / count
        return result

    meta = base | {"lora": lora, "mask_prompt": args.mask_prompt}
    return finetune(model, tokenizer, args, folder, schedule, encoded["train"], to_device,
                    loss_fn, evaluate, meta)  # fmt: skip


def _answer(args, folder, model, tokenizer, metrics: dict, test_set: list[dict]) -> None:
    """The model's responses to the test examples, scored, in responses.json and results.json."""
    merge_lora(model)  # generation runs at the base model's speed
    entries = test_set if args.limit_test is None else test_set[: args.limit_test]
    print(f"writing responses to {len(entries)} test examples", file=sys.stderr)
    device = model.tok_emb.weight.device
    responses = respond(model, tokenizer, entries, args.max_new_tokens, device, args.quiet)
    scored = [dict(e, model_response=r, exact_match=exact_match(r, e["output"]),
                   token_f1=token_f1(r, e["output"]))
              for e, r in zip(entries, responses, strict=True)]  # fmt: skip
    scores = {
        "exact_match": sum(s["exact_match"] for s in scored) / len(scored),
        "token_f1": sum(s["token_f1"] for s in scored) / len(scored),
        "n_test": len(scored),
    }
    write_atomically(folder.path / "responses.json", json.dumps(scored, indent=1))
    write_atomically(folder.path / "results.json", json.dumps(metrics | {"test": scores}, indent=1))
    print(f"test: exact match {scores['exact_match']:.3f}, token F1 {scores['token_f1']:.3f} over "
          f"{len(scored)} examples; responses in {folder.path / 'responses.json'}")  # fmt: skip


# --8<-- [end:cli]


if __name__ == "__main__":
    sys.exit(main())
