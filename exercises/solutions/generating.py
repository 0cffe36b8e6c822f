"""Generating text: the answers, and the cases each one is checked on.

The answers to the two filters are the sampler's own functions in ``src/generate.py``, checked here
against a brute force in float64 that walks each row's tokens in order of probability, one by one; ``greedy_generate`` against the project's ``src.generate.generate``
with ``temperature=0`` and no KV cache.
"""

import math

import torch

from exercises.checker import Case, Exercise
from src.generate import generate, top_k_filter, top_p_filter  # noqa: F401 (the answers)
from src.model import GPTConfig, GPTModel


# --8<-- [start:greedy_generate]
@torch.no_grad()
def greedy_generate(
    model: torch.nn.Module, idx: torch.Tensor, max_new_tokens: int, context_length: int
) -> torch.Tensor:
    for _ in range(max_new_tokens):
        logits = model(idx[:, -context_length:])  # (B, t, V): no more than the model can see
        next_id = logits[:, -1].argmax(dim=-1, keepdim=True)  # (B, 1): the last position's best
        idx = torch.cat([idx, next_id], dim=1)
    return idx


# --8<-- [end:greedy_generate]


def _keep_by_hand(logits, stop):
    """Each row's tokens in order of probability, kept one by one until ``stop(kept, total)``."""
    rows = logits.double().reshape(-1, logits.shape[-1])
    out = torch.full_like(rows, -math.inf)
    for r, row in enumerate(rows):
        probs = torch.softmax(row, dim=0).tolist()
        total = 0.0
        for n, j in enumerate(sorted(range(len(probs)), key=lambda j: -probs[j])):
            if stop(n, total):
                break
            out[r, j], total = row[j], total + probs[j]
    return out.reshape(logits.shape).to(logits.dtype)


def _top_k_by_hand(logits, k):
    return _keep_by_hand(logits, lambda kept, total: kept >= k)


def _top_p_by_hand(logits, p):
    return _keep_by_hand(logits, lambda kept, total: kept > 0 and total >= p)


def _log(probs):
    return torch.tensor(probs).log()


def _top_k_cases(g):
    return [
        Case("k = 2 of five logits, not sorted", (torch.tensor([0.5, 3.0, -1.0, 2.0, 0.0]), 2)),
        Case("k = 1 keeps the best token alone", (torch.tensor([0.1, -0.2, 0.4]), 1)),
        Case("k larger than the vocabulary keeps every token", (torch.tensor([1.0, 2.0, 3.0]), 10)),
        Case("a batch of two rows: the k best of each row", (torch.tensor([[1.0, 2.0, 3.0, 4.0],
             [4.0, 3.0, 2.0, 1.0]]), 2)),
        Case("random, (B, V)", (torch.randn(4, 50, generator=g) * 2, 5)),
    ]  # fmt: skip


def _top_p_cases(g):
    return [
        Case("probabilities 0.5, 0.3, 0.2 and p = 0.6: 0.5 is not enough, the 0.3 that crosses "
             "p is kept too", (_log([0.5, 0.3, 0.2]), 0.6)),
        Case("p below the top probability: the top token alone, never none", (_log([0.7, 0.2, 0.1]), 0.5)),
        Case("not sorted: the kept logits stay in their places", (_log([0.05, 0.15, 0.6, 0.2]), 0.7)),
        Case("p = 1 keeps every token", (torch.tensor([0.0, 1.0, -1.0, 2.0]), 1.0)),
        Case("a batch of two rows: each row its own nucleus", (torch.stack([_log([0.4, 0.3, 0.2, 0.1]),
             _log([0.9, 0.04, 0.03, 0.03])]), 0.65)),
        Case("random, (B, V)", (torch.randn(4, 50, generator=g) * 2, 0.9)),
    ]  # fmt: skip


class _TinyGPT(GPTModel):
    """A small random GPTModel that prints as one line."""

    def __repr__(self):
        c = self.cfg
        return f"a tiny GPTModel (vocab {c.vocab_size}, context {c.context_length}, {c.n_layers} layers)"


def _tiny_model():
    cfg = GPTConfig(
        vocab_size=40, context_length=8, emb_dim=16, n_heads=2, n_layers=2, drop_rate=0.0
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = _TinyGPT(cfg).eval()
        with torch.no_grad():
            model.out_head.weight.normal_(0, 1.0)  # logits far apart: one clear best token
    return model


def _generate_cases(g):
    model = _tiny_model()
    return [
        Case("one prompt, three new tokens", (model, torch.tensor([[1, 2, 3]]), 3, 8)),
        Case("a batch of two prompts: the argmax of each row", (model, torch.tensor([[5, 6], [7, 8]]), 4, 8)),
        Case("the sequence outgrows the context of 8: feed the model only the last 8 tokens",
             (model, torch.tensor([[3, 1, 4, 1, 5, 9]]), 5, 8)),
        Case("no new tokens: the prompt itself", (model, torch.tensor([[2, 7]]), 0, 8)),
    ]  # fmt: skip


def _greedy_by_src(model, idx, max_new_tokens, context_length):
    return generate(model, idx, max_new_tokens, context_length, temperature=0.0, use_cache=False)


EXERCISES = [
    Exercise(
        "top_k_filter", "keep the k largest logits of each row, the rest -inf",
        reference=_top_k_by_hand, cases=_top_k_cases,
        hint="torch.topk(logits, k, dim=-1).values[..., -1:] is each row's k-th largest, kept as "
        "a column; mask what is below it; clamp k to the row's length first",
    ),
    Exercise(
        "top_p_filter", "keep the most probable tokens until their probability reaches p, the rest -inf",
        reference=_top_p_by_hand, cases=_top_p_cases,
        hint="sort descending, softmax, cumsum; drop a token when the mass BEFORE it (cumsum minus "
        "its own probability) already reaches p, so the token that crosses p stays and so does the "
        "first; scatter the mask back to vocabulary order",
    ),
    Exercise(
        "greedy_generate", "the generation loop: run the model, append the argmax, repeat",
        reference=_greedy_by_src, cases=_generate_cases,
        hint="crop to idx[:, -context_length:] before every call; take logits[:, -1] (the last "
        "position) and argmax over the vocabulary, dim=-1 with keepdim=True, then cat along dim 1",
    ),
]  # fmt: skip
