"""Break it, chapter "Making it small and fast": int4 with one scale per row; speculative sampling
that keeps every draft token.

Both start from the tiny model trained for 400 steps on the default corpus (the target), and the
second also from the same model after 50 steps (the draft: the same tokenizer, a worse model).
"""

import copy
import math
from unittest import mock

import numpy as np
import torch

import src.generate
from benchmarks.harness import markdown_table
from experiments.harness import TINY, corpus_tokens, evaluate, pretrained_tiny, windows
from src.generate import generate, speculative_generate, speculative_rounds
from src.quantize import dequantize, model_size_bytes, quantize, quantize_model

TARGET_STEPS, DRAFT_STEPS = 400, 50

# --8<-- [start:int4-one-scale]
INT4 = {  # label -> group_size: weights of a row that share one scale
    "int4, groups of 16": 16,
    "int4, groups of 32": 32,
    "int4, one scale per row": None,  # one outlier sets the step of the whole row
}


@torch.no_grad()
def with_outlier_columns(model, factor: float = 20.0, channels: int = 2):
    """The same function, with outliers in every row as large models have: ``channels`` features
    of each LayerNorm shrink by ``factor``, the columns that read them grow by it."""
    model = copy.deepcopy(model)
    for block in model.trf_blocks:
        for norm, layers in ((block.norm1, (block.att.W_query, block.att.W_key,
                              block.att.W_value)), (block.norm2, (block.ff.fc,))):  # fmt: skip
            norm.scale[:channels] /= factor
            norm.shift[:channels] /= factor
            for layer in layers:
                layer.weight[:, :channels] *= factor  # W x = (W D) (D^-1 x)
    return model


# --8<-- [end:int4-one-scale]


def rounding_error(model, group_size: int | None) -> float:
    """Mean |w - q s| / mean |w| over the model's matrices: the weights' relative rounding error."""
    moved = total = 0.0
    for w in model.state_dict().values():
        if w.dim() == 2:  # the Linear and Embedding weights: what quantize_model quantizes
            q, scales = quantize(w, 4, group_size)
            moved += (w - dequantize(q, scales)).abs().sum().item()
            total += w.abs().sum().item()
    return moved / total


def int4_one_scale() -> str:
    """int4 with groups against one scale per row, on the model as trained and on the same function
    with outlier columns: validation perplexity."""
    trained, (_, val_tokens) = pretrained_tiny(TARGET_STEPS), corpus_tokens()
    val, models = windows(val_tokens), {"as trained": trained}
    models["with outlier columns"] = with_outlier_columns(trained)
    losses = {name: {"float32": evaluate(m, val)} for name, m in models.items()}
    for name, m in models.items():
        losses[name]["int8, a scale per row"] = evaluate(quantize_model(m, 8), val)
        for label, group_size in INT4.items():
            losses[name][label] = evaluate(quantize_model(m, 4, group_size), val)
    rows = []
    for label in losses["as trained"]:
        group = INT4.get(label)
        size = model_size_bytes(trained if label == "float32" else quantize_model(
            trained, 4 if label in INT4 else 8, group))  # fmt: skip
        cells = [label, f"{size:,}"]
        for name, m in models.items():
            base, loss = losses[name]["float32"], losses[name][label]
            change = "" if label == "float32" else f" ({math.exp(loss - base) - 1:+.1%})"
            error = f"{rounding_error(m, group):.1%}, " if label in INT4 else ""
            cells.append(f"{error}{math.exp(loss):.1f}{change}")
        rows.append(cells)
    header = ["weights", "bytes", "as trained: rounding error, perplexity (change)",
              "with outlier columns: rounding error, perplexity (change)"]  # fmt: skip
    return markdown_table(header, rows, align="lrrr")


# --8<-- [start:accept-every-draft]
def accept_every_draft(p, q, drafted, generator):
    """The rule broken: every draft token kept, as if the draft's q were the target's p; then
    one more token drawn from the target."""
    return len(drafted), torch.multinomial(p[-1], 1, generator=generator)


# --8<-- [end:accept-every-draft]


def total_variation(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Half the L1 distance between observed frequencies and a distribution: 0 is equal, 1 disjoint."""
    return 0.5 * (counts.double() / counts.sum() - probs.double()).abs().sum().item()


def first_tokens(rule, target, draft, prompt, draws: int) -> tuple[torch.Tensor, float]:
    """Counts of the first new token over ``draws`` speculative rounds of 4 draft tokens on one
    prompt, with ``rule`` as the acceptance rule; and the share of the draft tokens kept."""
    g, proposed, kept = torch.Generator().manual_seed(0), 0, 0
    counts = torch.zeros(TINY.vocab_size)
    with mock.patch.object(src.generate, "accept_or_resample", rule):
        for _ in range(draws):
            rounds = speculative_rounds(target, draft, prompt, 5, TINY.context_length, 4,
                                        temperature=1.0, generator=g)  # fmt: skip
            tokens, k = next(rounds)  # (1, n): the first round's tokens
            counts[tokens[0, 0]] += 1
            proposed, kept = proposed + k, kept + tokens.shape[1] - 1
    return counts, kept / proposed


def texts_loss(rule, target, draft, prompts) -> float:
    """The target's own mean loss (at temperature 1) on the tokens that fill each prompt's context,
    sampled by the target alone (``rule`` None) or speculatively with ``rule``."""
    g = torch.Generator().manual_seed(0)
    new = TINY.context_length - prompts.shape[1]
    if rule is None:
        out = generate(target, prompts, new, TINY.context_length, temperature=1.0, generator=g)
    else:
        with mock.patch.object(src.generate, "accept_or_resample", rule):
            out = speculative_generate(target, draft, prompts, new, TINY.context_length, 4,
                                       temperature=1.0, generator=g)  # fmt: skip
    with torch.no_grad():
        logits = target(out)[:, prompts.shape[1] - 1 : -1]  # the predictions of the new tokens
        loss = -torch.log_softmax(logits, dim=-1).gather(-1, out[:, prompts.shape[1] :, None])
    return loss.mean().item()


def accept_every_draft_experiment(draws: int = 2000) -> str:
    """Speculative sampling with and without the rejection rule: does its text still follow the
    target's distribution?"""
    target, draft = pretrained_tiny(TARGET_STEPS), pretrained_tiny(DRAFT_STEPS)
    _, val_tokens = corpus_tokens()
    starts = np.linspace(0, len(val_tokens) - 9, 16).astype(int)
    prompts = torch.tensor(np.stack([val_tokens[s : s + 8] for s in starts]), dtype=torch.long)
    prompt = prompts[:1]
    with torch.no_grad():
        p = torch.softmax(target(prompt)[0, -1], dim=-1)  # the target's exact first-token law
        q = torch.softmax(draft(prompt)[0, -1], dim=-1)
    g = torch.Generator().manual_seed(0)
    alone = torch.bincount(torch.multinomial(p, draws, replacement=True, generator=g),
                           minlength=TINY.vocab_size)  # fmt: skip
    rows = [["the target alone", "", f"{total_variation(alone, p):.3f}",
             f"{texts_loss(None, target, draft, prompts):.2f}"]]  # fmt: skip
    rules = {"speculative, the rejection rule": src.generate.accept_or_resample,
             "speculative, every draft token kept": accept_every_draft}  # fmt: skip
    for label, rule in rules.items():
        counts, accepted = first_tokens(rule, target, draft, prompt, draws)
        rows.append([label, f"{accepted:.0%}", f"{total_variation(counts, p):.3f}",
                     f"{texts_loss(rule, target, draft, prompts):.2f}"])  # fmt: skip
    header = ["sampling", "draft tokens kept",
              f"distance of the first token's frequencies from the target's ({draws:,} draws)",
              "target's loss on the text"]  # fmt: skip
    exact = 0.5 * (p - q).abs().sum().item()
    return (markdown_table(header, rows, align="lrrr") + f"\n\nThe distance between the target's "
            f"and the draft's exact distributions of that token: {exact:.3f}.")  # fmt: skip


EXPERIMENTS = {
    "int4-one-scale": int4_one_scale,
    "accept-every-draft": accept_every_draft_experiment,
}
