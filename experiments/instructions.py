"""Break it, chapter "Finetuning to follow instructions": keep the padding targets; mask end-of-text.

Both train on a synthetic copy task: the prompt is 2-20 random tokens and a separator (1); the
response is the same tokens, then end-of-text (0). The tiny model (vocabulary 64) trains from
scratch for one epoch of 300 steps of 16 examples, with the prompt masked, and is tested on 500 new
examples.
"""

from functools import partial

import torch

from benchmarks.harness import markdown_table
from experiments.harness import batches, fmt, tiny, train
from src.generate import generate
from src.instruct import IGNORE_INDEX, collate
from src.model import GPTModel
from src.training import cross_entropy

BATCH_SIZE = 16


def copy_task(n_train: int = 300 * BATCH_SIZE, n_test: int = 500) -> tuple[list, list]:
    """Training and test examples of the copy task, as ``(ids, prompt_length)``."""
    generator = torch.Generator().manual_seed(0)

    def examples(n: int) -> list[tuple[list[int], int]]:
        out = []
        for _ in range(n):
            length = int(torch.randint(2, 21, (1,), generator=generator))
            prompt = torch.randint(2, 64, (length,), generator=generator).tolist() + [1]
            out.append((prompt + prompt[:-1] + [0], len(prompt)))
        return out

    return examples(n_train), examples(n_test)


def train_copy(train_set: list, collate_fn, lr: float = 3e-3) -> tuple[GPTModel, list, list]:
    """The tiny model trained from scratch for one epoch over ``train_set``, each batch made by
    ``collate_fn``; returns it in eval mode, the loss of every step, and the batches."""
    torch.manual_seed(0)
    model = GPTModel(tiny(vocab_size=64))
    batch_of = batches(train_set, BATCH_SIZE)
    steps = len(train_set) // BATCH_SIZE
    seen = [collate_fn(batch_of(step)) for step in range(steps)]

    def loss_fn(batch) -> torch.Tensor:
        inputs, targets = batch
        return cross_entropy(model(inputs), targets)

    losses = train(model, loss_fn, lambda step: seen[step], steps, lr)
    return model.eval(), losses, seen


# --8<-- [start:padding-targets]
def keep_padding_targets(rows: list, ignore_padding: bool):
    """``collate``'s inputs and targets; unless ``ignore_padding``, every padding target becomes
    end-of-text (0), like the padding of the inputs, instead of -100."""
    inputs, targets = collate(rows, pad_id=0, mask_prompt=True)  # (B, T), (B, T)
    if not ignore_padding:
        for row, (ids, _) in enumerate(rows):
            targets[row, len(ids) - 1 :] = 0
    return inputs, targets


# --8<-- [end:padding-targets]


def padding_targets() -> str:
    """Train a copy task with padding targets ignored (-100) or kept as end-of-text tokens."""
    train_set, test_set = copy_task()
    test_inputs, test_targets = keep_padding_targets(test_set, ignore_padding=True)
    rows = []
    for label, ignore in (("padding targets = -100", True), ("padding targets kept", False)):
        model, losses, seen = train_copy(
            train_set, partial(keep_padding_targets, ignore_padding=ignore)
        )
        counted = [targets != IGNORE_INDEX for _, targets in seen]
        padding = [(c & (inputs == 0)).sum().item() / c.sum().item()
                   for c, (inputs, _) in zip(counted, seen, strict=True)]  # fmt: skip
        with torch.no_grad():
            logits = model(test_inputs)
        response = test_targets != IGNORE_INDEX  # scored on the response tokens only
        right = (logits.argmax(-1) == test_targets)[response].float().mean()
        rows.append([label, f"{100 * sum(padding) / len(padding):.0f}%",
                     fmt(sum(losses[-20:]) / 20), fmt(cross_entropy(logits, test_targets).item()),
                     f"{100 * right:.1f}%"])  # fmt: skip
    header = ["", "targets in the loss that are padding", "train loss (as reported)",
              "test loss on responses", "response tokens right"]  # fmt: skip
    return markdown_table(header, rows)


# --8<-- [start:no-eot-target]
def mask_end_of_text(rows: list, mask_eot: bool):
    """``collate``'s inputs and targets; with ``mask_eot``, the end-of-text target that ends each
    response is -100 too, like the padding after it."""
    inputs, targets = collate(rows, pad_id=0, mask_prompt=True)
    if mask_eot:
        targets[targets == 0] = IGNORE_INDEX  # 0 is a target only where a response ends
    return inputs, targets


# --8<-- [end:no-eot-target]


def responses(model: GPTModel, test_set: list, limit: int) -> list[tuple[list[int], list[int]]]:
    """Greedy responses to every test prompt, at most ``limit`` new tokens, each cut at its first
    end-of-text, beside the target response (without its end-of-text)."""
    by_prompt_length: dict[int, list[list[int]]] = {}  # generate() takes equal-length prompts
    for ids, prompt_length in test_set:
        by_prompt_length.setdefault(prompt_length, []).append(ids)
    found = []
    for prompt_length, group in by_prompt_length.items():
        prompts = torch.tensor([ids[:prompt_length] for ids in group])  # (B, prompt_length)
        out = generate(model, prompts, limit, model.cfg.context_length, eos_id=0)
        for ids, new in zip(group, out[:, prompt_length:].tolist(), strict=True):
            found.append((new, ids[prompt_length:-1]))
    return found


def no_eot_target(limit: int = 40) -> str:
    """Train the copy task with the end-of-text target kept or set to -100; generate greedily."""
    train_set, test_set = copy_task()
    rows = []
    for label, mask_eot in (
        ("end-of-text target kept (as built)", False),
        ("end-of-text target = -100", True),
    ):
        model, _, _ = train_copy(train_set, partial(mask_end_of_text, mask_eot=mask_eot))
        found = responses(model, test_set, limit)
        cut = [new[: new.index(0)] if 0 in new else new for new, _ in found]
        targets = [target for _, target in found]
        rows.append([
            label,
            f"{100 * sum(0 in new for new, _ in found) / len(found):.1f}%",
            f"{sum(map(len, cut)) / len(cut):.1f}",
            f"{100 * sum(len(c) == len(t) for c, t in zip(cut, targets, strict=True)) / len(cut):.1f}%",
            f"{100 * sum(c == t for c, t in zip(cut, targets, strict=True)) / len(cut):.1f}%",
        ])  # fmt: skip
    target_length = sum(map(len, targets)) / len(targets)
    header = ["", f"responses that emit end-of-text (limit: {limit} new tokens)",
              f"mean response length, tokens (target: {target_length:.1f})",
              "responses of the target length", "responses exactly right"]  # fmt: skip
    return markdown_table(header, rows)


EXPERIMENTS = {"padding-targets": padding_targets, "no-eot-target": no_eot_target}
