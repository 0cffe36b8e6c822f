"""The book's "Break it" experiments: remove one idea at a time and measure what goes wrong.

Each experiment trains or probes a small model twice, once as built and once with one piece broken,
and writes its numbers as a Markdown table to ``docs/assets/break-it/<name>.md``, which the chapter
includes. So every number on those pages comes from this script:

    uv run python benchmarks/break_it.py            # all experiments, a few minutes on a laptop CPU
    uv run python benchmarks/break_it.py no-scale   # just one

Models are tiny and runs short: the point is the contrast between the two columns, not the loss.
"""

import argparse
import math
import re
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere
from src.data import (
    load_corpus,
    split_tokens,
    tokenize_cached,
    train_tokenizer_cached,
)
from src.files import cache_dir
from src.model import GPTConfig, GPTModel
from src.tokenizer import BPETokenizer
from src.training import adamw, cross_entropy

OUT = Path(__file__).resolve().parent.parent / "docs" / "assets" / "break-it"
TINY = GPTConfig(
    vocab_size=1024, context_length=64, emb_dim=64, n_heads=2, n_layers=2, drop_rate=0.0
)


def get_batch(tokens: np.ndarray, batch_size: int, T: int, generator: torch.Generator):
    """``batch_size`` windows of T + 1 tokens at random offsets, as inputs and shifted targets: the
    random windows these experiments were written with (the trainer uses one batching rule of its
    own, ``src.data``)."""
    starts = torch.randint(len(tokens) - T, (batch_size,), generator=generator)
    batch = torch.from_numpy(
        np.stack([tokens[s : s + T + 1].astype(np.int64) for s in starts.tolist()])
    )
    return batch[:, :-1], batch[:, 1:]


def corpus_tokens(vocab_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Train and validation tokens of the default corpus, with a small BPE trained on it."""
    corpus = load_corpus()
    tokenizer = train_tokenizer_cached(corpus, vocab_size, cache_dir())
    return split_tokens(tokenize_cached(corpus, tokenizer, cache_dir()))


def train(
    model: nn.Module,
    tokens: np.ndarray,
    steps: int,
    lr: float,
    batch_size: int = 16,
    warmup: int = 0,
    shift: bool = True,
) -> list[float]:
    """Plain AdamW training on random windows; returns the loss of every step."""
    generator = torch.Generator().manual_seed(0)
    optimizer = adamw(model, lr, weight_decay=0.1)
    T = model.cfg.context_length
    losses = []
    model.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup) if warmup else lr
        x, y = get_batch(tokens, batch_size, T, generator)
        loss = cross_entropy(model(x), y if shift else x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def evaluate(model: nn.Module, tokens: np.ndarray, batches: int = 20) -> float:
    generator = torch.Generator().manual_seed(1)
    model.eval()
    T = model.cfg.context_length
    total = 0.0
    for _ in range(batches):
        x, y = get_batch(tokens, 16, T, generator)
        total += cross_entropy(model(x), y).item()
    return total / batches


def fmt(x: float) -> str:
    return "diverged (NaN)" if math.isnan(x) else f"{x:.2f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


# ---------------------------------------------------------------------------------------------
# Attention


def no_causal_mask() -> str:
    """Train without the causal mask: each position sees the token it must predict."""
    train_tokens, val_tokens = corpus_tokens()
    rows = []
    for label, masked in (("with the mask", True), ("mask removed", False)):
        torch.manual_seed(0)
        model = GPTModel(TINY)
        if not masked:
            for block in model.trf_blocks:
                block.att.mask.zero_()  # nothing is hidden any more
        losses = train(model, train_tokens, steps=300, lr=3e-3)
        for block in model.trf_blocks:  # generation only ever has the past: restore the mask
            block.att.mask.copy_(torch.ones_like(block.att.mask).triu(1))
        rows.append([label, fmt(np.mean(losses[-20:])), fmt(evaluate(model, val_tokens))])
    return table(
        ["", "train loss (as trained)", "validation loss (causal, as in generation)"], rows
    )


def no_scale() -> str:
    """Attention weights at initialisation with and without the 1/sqrt(d) scale."""
    torch.manual_seed(0)
    T = 64
    rows = []
    for d in (16, 64, 256):
        q, k = torch.randn(256, T, d), torch.randn(256, T, d)
        for label, scale in (("1/sqrt(d)", 1 / math.sqrt(d)), ("none", 1.0)):
            scores = (q @ k.transpose(-2, -1) * scale).requires_grad_()  # (N, T, T), no mask
            weights = torch.softmax(scores, dim=-1)
            entropy = -(weights * weights.clamp_min(1e-30).log()).sum(-1).mean()
            (weights * torch.randn_like(weights)).sum().backward()
            rows.append(
                [
                    str(d),
                    label,
                    f"{weights.max(-1).values.mean():.2f}",
                    f"{entropy:.2f} of {math.log(T):.2f}",
                    f"{scores.grad.norm(dim=-1).mean():.4f}",
                ]
            )
    return table(
        ["head_dim", "scale", "mean largest weight", "entropy (nats)", "gradient norm per row"],
        rows,
    )


# ---------------------------------------------------------------------------------------------
# The model


def no_layernorm() -> str:
    """An 8-layer model trained with and without LayerNorm, at a modest and a high learning rate."""
    train_tokens, val_tokens = corpus_tokens()
    cfg = GPTConfig(**(TINY.to_dict() | dict(n_layers=8, emb_dim=128, n_heads=4)))
    rows = []
    for lr in (1e-3, 1e-2):
        for label, keep_norm in (("with LayerNorm", True), ("LayerNorm removed", False)):
            torch.manual_seed(0)
            model = GPTModel(cfg)
            if not keep_norm:
                for block in model.trf_blocks:
                    block.norm1, block.norm2 = nn.Identity(), nn.Identity()
                model.final_norm = nn.Identity()
            losses = train(model, train_tokens, steps=200, lr=lr, warmup=20)
            rows.append(
                [f"{lr:g}", label]
                + [fmt(np.mean(losses[s - 10 : s])) for s in (10, 50, 100, 200)]
                + [fmt(evaluate(model, val_tokens))]
            )
    header = ["lr", "", "loss, steps 1-10", "41-50", "91-100", "191-200", "validation loss"]
    return table(header, rows)


def no_residual() -> str:
    """An 8-layer model trained with and without its residual connections."""
    train_tokens, val_tokens = corpus_tokens()
    cfg = GPTConfig(**(TINY.to_dict() | dict(n_layers=8, emb_dim=128, n_heads=4)))

    def without_shortcut(block, x, kv_cache=None):  # x = f(norm(x)), not x + f(norm(x))
        x = block.att(block.norm1(x), kv_cache)
        return block.ff(block.norm2(x))

    rows = []
    for label, residual in (("with residual connections", True), ("residuals removed", False)):
        torch.manual_seed(0)
        model = GPTModel(cfg)
        if not residual:
            for block in model.trf_blocks:
                block.forward = types.MethodType(without_shortcut, block)
        losses = train(model, train_tokens, steps=200, lr=1e-3, warmup=20)
        first_grad = model.trf_blocks[0].att.W_query.weight.grad.norm().item()
        rows.append(
            [label]
            + [fmt(np.mean(losses[s - 10 : s])) for s in (10, 100, 200)]
            + [fmt(evaluate(model, val_tokens)), f"{first_grad:.1e}"]
        )
    header = [
        "",
        "loss, steps 1-10",
        "91-100",
        "191-200",
        "validation loss",
        "gradient norm, first block's W_query (last step)",
    ]
    return table(header, rows)


# ---------------------------------------------------------------------------------------------
# Tokens and batches


def no_pretokenizer() -> str:
    """BPE trained with and without the split pattern: without it, merges glue words together."""
    text = load_corpus().text
    rows = []
    for label, pattern in (("GPT-2 split pattern", None), ("no split (whole lines)", r"[^\n]+|\n")):
        kwargs = {} if pattern is None else {"pattern": pattern}
        tokenizer = BPETokenizer.train(text, 2048, **kwargs)
        by_rank = sorted(tokenizer.mergeable_ranks, key=tokenizer.mergeable_ranks.get)
        # A token that holds a space between two visible characters spans a word boundary.
        spanning = [t for t in by_rank if re.search(rb"\S \S", t)]
        shown = ", ".join(repr(t.decode("utf-8", "replace")) for t in spanning[:5]) or "none"
        rows.append(
            [
                label,
                f"{len(text.encode()) / len(tokenizer.encode(text)):.2f}",
                str(len(spanning)),
                shown,
            ]
        )
    return table(["", "bytes per token", "tokens spanning words", "first learned of them"], rows)


def unshifted_targets() -> str:
    """Train with targets equal to the inputs instead of shifted by one."""
    train_tokens, val_tokens = corpus_tokens()
    rows = []
    for label, shift in (("targets shifted by one", True), ("targets = inputs", False)):
        torch.manual_seed(0)
        model = GPTModel(TINY)
        losses = train(model, train_tokens, steps=300, lr=3e-3, shift=shift)
        rows.append([label, fmt(np.mean(losses[-20:])), fmt(evaluate(model, val_tokens))])
    return table(["", "train loss (as trained)", "next-token validation loss"], rows)


def random_split() -> str:
    """What a validation set drawn at random from the training text would report, against a
    held-out one split by position, as a model trains longer."""
    train_tokens, val_tokens = corpus_tokens()
    torch.manual_seed(0)
    model = GPTModel(TINY)
    rows = []
    for steps in (300, 1000):
        train(model, train_tokens, steps=steps - (300 if steps > 300 else 0), lr=3e-3)
        seen = evaluate(model, train_tokens)  # windows a random split would share with training
        held_out = evaluate(model, val_tokens)
        rows.append([str(steps), fmt(seen), fmt(held_out), fmt(held_out - seen)])
    return table(
        [
            "steps trained",
            "validation drawn from the training text",
            "held out by position",
            "how much the random split flatters",
        ],
        rows,
    )


# ---------------------------------------------------------------------------------------------
# Pretraining


def learning_rate() -> str:
    """The same model at three learning rates, with and without warmup."""
    train_tokens, val_tokens = corpus_tokens()
    cfg = GPTConfig(**(TINY.to_dict() | dict(n_layers=4, emb_dim=128, n_heads=4)))
    rows = []
    for lr, warmup in ((1e-3, 0), (3e-2, 0), (3e-2, 100), (3e-1, 100)):
        torch.manual_seed(0)
        model = GPTModel(cfg)
        losses = train(model, train_tokens, steps=300, lr=lr, warmup=warmup)
        rows.append(
            [
                f"{lr:g}",
                str(warmup),
                fmt(max(losses[:50])),
                fmt(np.mean(losses[-20:])),
                fmt(evaluate(model, val_tokens)),
            ]
        )
    return table(
        ["lr", "warmup steps", "worst loss, first 50 steps", "final train loss", "validation"],
        rows,
    )


# ---------------------------------------------------------------------------------------------
# Fusing the softmax


def no_max_subtraction() -> str:
    """Softmax with and without subtracting the row maximum, as scores grow, in float32 and bf16."""
    torch.manual_seed(0)
    base = torch.randn(1024, 64)  # 1024 rows of 64 unit-variance scores
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for magnitude in (1, 10, 50, 100, 1000):
            x = (base * magnitude).to(dtype)
            reference = torch.softmax(x.double(), dim=-1)
            e = torch.exp(x)  # no maximum subtracted: exponents as large as the scores
            naive = (e / e.sum(-1, keepdim=True)).double()
            stable = torch.softmax(x, dim=-1).double()  # subtracts the maximum first
            bad = ~torch.isfinite(naive).all(-1)
            rows.append(
                [
                    str(dtype).removeprefix("torch."),
                    str(magnitude),
                    f"{bad.float().mean():.0%}",
                    f"{(naive - reference).abs().nan_to_num(nan=1.0).max():.1e}",
                    f"{(stable - reference).abs().max():.1e}",
                ]
            )
    return table(
        [
            "dtype",
            "score std",
            "rows with inf/NaN, no max",
            "max error, no max (NaN counted as 1)",
            "max error, max subtracted",
        ],
        rows,
    )


def narrow_accumulator() -> str:
    """The softmax denominator summed in bfloat16 instead of float32, as rows grow."""
    torch.manual_seed(0)
    rows = []
    for T in (64, 256, 1024, 4096):
        x = torch.randn(64, T)  # 64 rows of unit-variance scores
        e = torch.exp(x - x.max(-1, keepdim=True).values).to(torch.bfloat16)
        wide = e.float().sum(-1)  # what the kernel does: widen, sum in float32
        narrow = torch.zeros(64, dtype=torch.bfloat16)
        for j in range(T):  # a running sum kept in bfloat16, rounded after every add
            narrow = narrow + e[:, j]
        exact = e.double().sum(-1)
        rows.append(
            [
                str(T),
                f"{((wide.double() - exact) / exact).abs().max():.1e}",
                f"{((narrow.double() - exact) / exact).abs().max():.1e}",
                f"{(exact / narrow.double()).sum().item() / 64:.3f}",
            ]
        )
    return table(
        [
            "T",
            "denominator error, float32 sum",
            "denominator error, bf16 sum",
            "mean sum of the bf16-normalised weights",
        ],
        rows,
    )


# ---------------------------------------------------------------------------------------------
# Fusing the whole attention


def tiled_attention(q, k, v, scale: float, tile: int, rescale=True, diagonal=True) -> torch.Tensor:
    """The flash forward in plain PyTorch: query tiles against key tiles, a running maximum m and
    sum l (``total``) per row. ``rescale=False`` forgets to shrink the output accumulated so far when m grows;
    ``diagonal=False`` leaves out each query tile's diagonal key tile."""
    T = q.shape[-2]
    out = torch.empty_like(q)
    for q0 in range(0, T, tile):
        rows = torch.arange(q0, min(q0 + tile, T))
        m = torch.full(q.shape[:-2] + (len(rows),), float("-inf"), dtype=q.dtype)
        total = torch.zeros_like(m)  # l, the running sum
        o = torch.zeros(q.shape[:-2] + (len(rows), q.shape[-1]), dtype=q.dtype)
        last = q0 // tile if diagonal else q0 // tile - 1
        for k0 in range(0, (last + 1) * tile, tile):
            cols = torch.arange(k0, min(k0 + tile, T))
            s = (q[..., rows, :] @ k[..., cols, :].transpose(-2, -1)) * scale
            s = s.masked_fill(cols[None, :] > rows[:, None], float("-inf"))
            m_new = torch.maximum(m, s.amax(-1))
            p = torch.exp(s - m_new[..., None])
            alpha = torch.exp(m - m_new)  # exp(m - m'): 0 on the first tile
            total = total * alpha + p.sum(-1)  # l' = l exp(m - m') + sum p
            o = (o * alpha[..., None] if rescale else o) + p @ v[..., cols, :]
            m = m_new
        out[..., rows, :] = o / total[..., None]
    return out


def _attention_inputs(T: int) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, T, 64, dtype=torch.float64) for _ in range(3))
    mask = torch.ones(T, T, dtype=torch.bool).triu(1)
    scores = (q @ k.transpose(-2, -1) / 8).masked_fill(mask, float("-inf"))
    return q, k, v, torch.softmax(scores, -1) @ v  # the eager path, in float64


def flash_no_rescale() -> str:
    """The flash forward with and without rescaling the accumulated output when the maximum grows."""
    rows = []
    for T in (64, 256, 1024, 4096):
        q, k, v, reference = _attention_inputs(T)
        right = (tiled_attention(q, k, v, 1 / 8, 64) - reference).abs()
        wrong = (tiled_attention(q, k, v, 1 / 8, 64, rescale=False) - reference).abs()
        norm = tiled_attention(q, k, v, 1 / 8, 64, rescale=False).norm(dim=-1)
        rows.append([str(T), str(T // 64), f"{right.max():.1e}", f"{wrong.max():.2f}",
                     f"{(wrong.amax(-1) > 0.01).double().mean():.0%}",
                     f"{(norm / reference.norm(dim=-1)).mean():.2f}"])  # fmt: skip
    return table(
        ["T", "key tiles of the last row", "max error, rescaled", "max error, not rescaled",
         "rows off by > 0.01", "mean output norm / correct"],
        rows,
    )  # fmt: skip


def flash_no_diagonal() -> str:
    """The flash forward with and without each query tile's diagonal key tile."""
    rows = []
    for T in (64, 256, 1024):
        q, k, v, reference = _attention_inputs(T)
        out = tiled_attention(q, k, v, 1 / 8, 64, diagonal=False)
        nan_rows = torch.isnan(out).any(-1)
        rest = (out - reference).abs().amax(-1)[~nan_rows]
        rows.append([str(T), f"{nan_rows[..., :64].double().mean():.0%}",
                     f"{nan_rows[..., 64:].double().mean():.0%}" if T > 64 else "-",
                     f"{rest.max():.2f}" if rest.numel() else "-",
                     f"{(tiled_attention(q, k, v, 1 / 8, 64) - reference).abs().max():.1e}"])  # fmt: skip
    return table(
        ["T", "NaN rows, first tile", "NaN rows, later tiles", "max error, later rows",
         "max error with the diagonal tile"],
        rows,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Generating text


def _trained_tiny() -> tuple[GPTModel, np.ndarray]:
    """The tiny model trained briefly, and the validation tokens to draw prompts from."""
    train_tokens, val_tokens = corpus_tokens()
    torch.manual_seed(0)
    model = GPTModel(TINY)
    train(model, train_tokens, steps=400, lr=3e-3)
    model.eval()
    return model, val_tokens


def _prompts(tokens: np.ndarray, n: int = 16, length: int = 8) -> torch.Tensor:
    starts = np.linspace(0, len(tokens) - length - 1, n).astype(int)
    return torch.tensor(np.stack([tokens[s : s + length] for s in starts]), dtype=torch.long)


def repeated_ngrams(tokens: torch.Tensor, n: int = 4) -> float:
    """Fraction of the n-grams in each row that already occurred earlier in that row."""
    repeated = total = 0
    for row in tokens.tolist():
        seen = set()
        for i in range(len(row) - n + 1):
            gram = tuple(row[i : i + n])
            repeated += gram in seen
            seen.add(gram)
            total += 1
    return repeated / total


def greedy_loops() -> str:
    """Greedy decoding against sampling: how much of the generated text repeats itself."""
    from src.generate import generate

    model, val_tokens = _trained_tiny()
    prompts = _prompts(val_tokens)
    rows = []
    for label, kwargs in (
        ("greedy", {}),
        ("temperature 0.7", dict(temperature=0.7)),
        ("temperature 1.0", dict(temperature=1.0)),
        ("temperature 1.0, top-k 40", dict(temperature=1.0, top_k=40)),
        ("temperature 1.0, top-p 0.9", dict(temperature=1.0, top_p=0.9)),
    ):
        generator = torch.Generator().manual_seed(0)
        out = generate(model, prompts, 200, TINY.context_length, generator=generator, **kwargs)
        new = out[:, prompts.shape[1] :]
        rows.append([label, f"{repeated_ngrams(new):.0%}"])
    real = torch.tensor(val_tokens[: 16 * 200].astype(np.int64)).view(16, 200)
    rows.append(["(real validation text, 16 x 200 tokens)", f"{repeated_ngrams(real):.0%}"])
    return table(["decoding", "repeated 4-grams in 200 new tokens"], rows)


def high_temperature() -> str:
    """Sampling at rising temperature: entropy per token and how the model scores its own text."""
    from src.generate import generate

    model, val_tokens = _trained_tiny()
    prompts = _prompts(val_tokens)
    rows = []
    for temperature in (0.5, 1.0, 1.5, 2.0, 5.0):
        generator = torch.Generator().manual_seed(0)
        out = generate(
            model, prompts, 56, TINY.context_length, temperature=temperature, generator=generator
        )  # (16, 64): one full context window per row
        with torch.no_grad():
            logits = model(out)[:, prompts.shape[1] - 1 : -1]  # predictions of the new tokens
            log_probs = torch.log_softmax(logits, dim=-1)
            own_loss = -log_probs.gather(-1, out[:, prompts.shape[1] :, None]).mean()
            scaled = torch.log_softmax(logits / temperature, dim=-1)
            entropy = -(scaled.exp() * scaled).sum(-1).mean()
        rows.append(
            [
                f"{temperature:g}",
                f"{entropy:.2f} of {math.log(TINY.vocab_size):.2f}",
                f"{own_loss:.2f}",
            ]
        )
    return (
        table(
            [
                "temperature",
                "entropy of the sampling distribution (nats)",
                "model's loss on its own samples (at temperature 1)",
            ],
            rows,
        )
        + f"\n\nValidation loss of the same model on real text: {evaluate(model, val_tokens):.2f}."
    )


# ---------------------------------------------------------------------------------------------
# Loading GPT-2


def _random_gpt2() -> tuple[object, nn.Module, torch.Tensor, torch.Tensor]:
    """A small GPT-2 with random weights from transformers, 8 random sequences, and its logits."""
    from transformers import GPT2Config, GPT2LMHeadModel  # the independent reference

    torch.manual_seed(0)
    # Weights 10x GPT-2's initial scale (0.02), closer to a trained model's: at 0.02 attention is
    # nearly uniform, and swapping query and key barely shows.
    hf_config = GPT2Config(
        vocab_size=1024, n_positions=64, n_embd=64, n_layer=2, n_head=2, initializer_range=0.2
    )
    reference = GPT2LMHeadModel(hf_config).eval()
    ids = torch.randint(0, 1024, (8, 64))
    with torch.no_grad():
        expected = reference(ids).logits  # (B, T, V)
    return hf_config, reference, ids, expected


def gpt2_layout() -> str:
    """Load a small random GPT-2 from transformers, then undo one layout step, and compare logits."""
    from src.gpt2 import config_from_hf, load_gpt2_state_dict

    hf_config, reference, ids, expected = _random_gpt2()

    def untransposed_c_proj(model: GPTModel) -> None:
        for block in model.trf_blocks:  # square (E, E): the wrong layout has the right shape
            block.att.out_proj.weight.copy_(block.att.out_proj.weight.t().clone())

    def key_query_swapped(model: GPTModel) -> None:
        for block in model.trf_blocks:  # c_attn read as [key | query | value]
            q, k = block.att.W_query, block.att.W_key
            for name in ("weight", "bias"):
                a, b = getattr(q, name).clone(), getattr(k, name).clone()
                getattr(q, name).copy_(b)
                getattr(k, name).copy_(a)

    rows = []
    for label, breakage in (
        ("as built", None),
        ("c_proj not transposed", untransposed_c_proj),
        ("c_attn split as key, query, value", key_query_swapped),
    ):
        model = GPTModel(config_from_hf(hf_config, drop_rate=0.0))
        load_gpt2_state_dict(model, reference.state_dict()).eval()
        with torch.no_grad():
            if breakage:
                breakage(model)
            logits = model(ids)
        agree = (logits.argmax(-1) == expected.argmax(-1)).float().mean()
        rows.append(
            [
                label,
                f"{(logits - expected).abs().max():.2e}",
                f"{expected.std():.2f}",
                f"{100 * agree:.1f}%",
            ]
        )
    return table(
        ["", "max abs logit difference", "logit std (reference)", "same top-1 token"], rows
    )


def forgot_eval() -> str:
    """Use loaded GPT-2 weights without ``model.eval()``: dropout stays on in every forward pass."""
    from src.generate import generate
    from src.gpt2 import config_from_hf, load_gpt2_state_dict

    hf_config, reference, ids, expected = _random_gpt2()
    prompt = ids[:, :8]
    rows = []
    for label, training in (("model.eval()", False), ("left in training mode", True)):
        torch.manual_seed(0)
        model = GPTModel(config_from_hf(hf_config))  # GPT-2's own dropout: 0.1
        load_gpt2_state_dict(model, reference.state_dict()).train(training)
        with torch.no_grad():
            first, second = model(ids), model(ids)
        agree = (first.argmax(-1) == expected.argmax(-1)).float().mean()
        greedy = [generate(model, prompt, 24, hf_config.n_positions)[:, 8:] for _ in range(2)]
        rows.append(
            [
                label,
                f"{(first - expected).abs().max():.2e}",
                f"{(first - second).abs().max():.2e}",
                f"{100 * agree:.1f}%",
                f"{100 * (greedy[0] == greedy[1]).float().mean():.1f}%",
            ]
        )
    return table(
        [
            "",
            "max abs logit difference from the reference",
            "between two calls on the same input",
            "same top-1 token as the reference",
            "same greedy tokens in two runs",
        ],
        rows,
    )


# ---------------------------------------------------------------------------------------------
# Classification


CLASSIFIER = GPTConfig(**(TINY.to_dict() | dict(vocab_size=64)))


def _random_ids(generator: torch.Generator) -> torch.Tensor:
    """A text of 8-24 random tokens from 4-63 (0-3 are left free for keywords and padding)."""
    length = int(torch.randint(8, 25, (1,), generator=generator))
    return torch.randint(4, 64, (length,), generator=generator)


def _train_classifier(groups, pool=None) -> tuple[nn.Module, float]:
    """The tiny model with a two-class head, trained on ``groups`` of ``(ids, label)`` with the
    output of ``pool`` (the last real token's by default); returns it in eval mode, and the loss
    of the last group."""
    from src.classify import collate, last_token_logits, make_classifier

    pool = pool or last_token_logits
    torch.manual_seed(0)
    model = make_classifier(GPTModel(CLASSIFIER), 2)
    optimizer = adamw(model, 1e-3, weight_decay=0.1)
    model.train()
    for group in groups:
        ids, lengths, labels = collate(group, pad_id=0)
        loss = nn.functional.cross_entropy(pool(model(ids), lengths), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval(), loss.item()


def first_token_pooling() -> str:
    """Classify with the first token's output instead of the last one's, on a synthetic task."""
    from src.classify import collate, last_token_logits
    from src.finetune import minibatches

    # Class 1 holds the keyword token 3 somewhere after the first token.
    generator = torch.Generator().manual_seed(0)

    def examples(n: int) -> list[tuple[list[int], int]]:
        out = []
        for _ in range(n):
            ids = _random_ids(generator).tolist()
            label = int(torch.randint(0, 2, (1,), generator=generator))
            if label:
                ids[int(torch.randint(1, len(ids), (1,), generator=generator))] = 3
            out.append((ids, label))
        return out

    train_set, test_set = examples(6400), examples(1000)
    test_ids, test_lengths, test_labels = collate(test_set, pad_id=0)
    rows = []
    for label, pool in (
        ("last token (as built)", last_token_logits),
        ("first token", lambda logits, lengths: logits[:, 0]),
    ):
        model, loss = _train_classifier(minibatches(train_set, 32), pool)  # one pass, in order
        with torch.no_grad():
            accuracy = (
                (pool(model(test_ids), test_lengths).argmax(-1) == test_labels).float().mean()
            )
        rows.append([label, f"{loss:.2f}", f"{100 * accuracy:.1f}%"])
    return table(["pooled output", "final train loss", "test accuracy (chance: 50%)"], rows)


# ---------------------------------------------------------------------------------------------
# Instruction finetuning


def _copy_task() -> tuple[list[tuple[list[int], int]], list[tuple[list[int], int]]]:
    """A synthetic instruction task, 300 x 16 training and 500 test examples as
    ``(ids, prompt_length)``: the prompt is 2-20 random tokens, then a separator (1); the response
    is the same tokens, then end-of-text (0)."""
    generator = torch.Generator().manual_seed(0)

    def examples(n: int) -> list[tuple[list[int], int]]:
        out = []
        for _ in range(n):
            length = int(torch.randint(2, 21, (1,), generator=generator))
            prompt = torch.randint(2, 64, (length,), generator=generator).tolist() + [1]
            out.append((prompt + prompt[:-1] + [0], len(prompt)))
        return out

    return examples(300 * 16), examples(500)


def _train_copy(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[GPTModel, list[float]]:
    """The tiny model (vocabulary 64) trained from scratch, one step per (inputs, targets) batch;
    returns it, in eval mode, and the loss of every step."""
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(**(TINY.to_dict() | dict(vocab_size=64))))
    optimizer = adamw(model, 3e-3, weight_decay=0.1)
    model.train()
    losses = []
    for inputs, targets in batches:
        loss = cross_entropy(model(inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return model, losses


def padding_targets() -> str:
    """Train a copy task with padding targets ignored (-100) or kept as end-of-text tokens."""
    from src.instruct import IGNORE_INDEX, collate

    def batch(rows, ignore_padding: bool):
        inputs, targets = collate(rows, pad_id=0, mask_prompt=True)  # (B, T), (B, T)
        if not ignore_padding:
            for row, (ids, _) in enumerate(rows):
                targets[row, len(ids) - 1 :] = 0  # padding targets become end-of-text tokens
        return inputs, targets

    train_set, test_set = _copy_task()
    test_inputs, test_targets = batch(test_set, ignore_padding=True)  # response tokens only
    rows = []
    for label, ignore_padding in (
        ("padding targets = -100", True),
        ("padding targets kept", False),
    ):
        batches = [
            batch(train_set[start : start + 16], ignore_padding)
            for start in range(0, len(train_set), 16)
        ]
        model, losses = _train_copy(batches)
        padding_share = []
        for inputs, targets in batches:
            counted = targets != IGNORE_INDEX
            padding_share.append((counted & (inputs == 0)).sum().item() / counted.sum().item())
        with torch.no_grad():
            logits = model(test_inputs)
            response = test_targets != IGNORE_INDEX
            accuracy = (logits.argmax(-1) == test_targets)[response].float().mean()
            rows.append(
                [
                    label,
                    f"{100 * np.mean(padding_share):.0f}%",
                    fmt(np.mean(losses[-20:])),
                    fmt(cross_entropy(logits, test_targets).item()),
                    f"{100 * accuracy:.1f}%",
                ]
            )
    return table(
        [
            "",
            "targets in the loss that are padding",
            "train loss (as reported)",
            "test loss on responses",
            "response tokens right",
        ],
        rows,
    )


# ---------------------------------------------------------------------------------------------
# LoRA


def _pretrained_tiny(train_tokens: np.ndarray) -> GPTModel:
    torch.manual_seed(0)
    model = GPTModel(TINY)
    train(model, train_tokens, steps=200, lr=3e-3)
    return model


def lora_init() -> str:
    """Wrap a briefly pretrained tiny model with LoRA, with B at zero (as built) or random."""
    from src.lora import LoRALinear, apply_lora

    train_tokens, val_tokens = corpus_tokens()
    base = _pretrained_tiny(train_tokens)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    x = torch.from_numpy(val_tokens[: 4 * 64].astype(np.int64)).view(4, 64)
    with torch.no_grad():
        base.eval()
        base_logits, base_loss = base(x), evaluate(base, val_tokens)
    rows = []
    for label, random_b in (("B = 0 (as built)", False), ("B random, like A", True)):
        torch.manual_seed(0)
        model = GPTModel(TINY)
        model.load_state_dict(state)
        apply_lora(model, rank=16, alpha=16)
        if random_b:
            for module in model.modules():
                if isinstance(module, LoRALinear):
                    nn.init.kaiming_uniform_(module.lora_B, a=math.sqrt(5))
        model.eval()
        with torch.no_grad():
            difference = (model(x) - base_logits).abs().max().item()
        step0 = evaluate(model, val_tokens)
        train(model, train_tokens, steps=100, lr=1e-3)
        rows.append([label, f"{difference:.2e}", fmt(step0), fmt(evaluate(model, val_tokens))])
    return table(
        [
            "",
            "max abs logit change at step 0",
            f"validation loss at step 0 (base: {base_loss:.2f})",
            "after 100 LoRA steps",
        ],
        rows,
    )


def lora_alpha() -> str:
    """LoRA finetuning of the same base at alpha/rank = 1, 16 and 256 (rank 16, same lr)."""
    from src.lora import apply_lora

    train_tokens, val_tokens = corpus_tokens()
    base = _pretrained_tiny(train_tokens)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    base_loss = evaluate(base, val_tokens)
    rows = []
    for alpha in (16, 256, 4096):
        torch.manual_seed(0)
        model = GPTModel(TINY)
        model.load_state_dict(state)
        apply_lora(model, rank=16, alpha=alpha)
        losses = train(model, train_tokens, steps=100, lr=1e-3)
        rows.append(
            [
                f"{alpha:g}",
                f"{alpha / 16:g}",
                fmt(max(losses[:20])),
                fmt(np.mean(losses[-10:])),
                fmt(evaluate(model, val_tokens)),
            ]
        )
    return table(
        [
            "alpha (rank 16)",
            "scale alpha/rank",
            "worst loss, first 20 steps",
            "final train loss",
            f"validation (base: {base_loss:.2f})",
        ],
        rows,
    )


# ---------------------------------------------------------------------------------------------
# Scaling out


def average_gradients(replicas: list[nn.Module]) -> None:
    """Give every replica the mean of their gradients: what DDP's all-reduce does, parameter by
    parameter."""
    for params in zip(*(m.parameters() for m in replicas), strict=True):
        mean = torch.stack([p.grad for p in params]).mean(0)
        for p in params:
            p.grad = mean.clone()


def unsynchronised_replicas() -> str:
    """Two data-parallel replicas, simulated in one process, with and without gradient averaging."""
    train_tokens, val_tokens = corpus_tokens()
    rows = []
    for label, average in (("gradients averaged (DDP)", True), ("no averaging", False)):
        torch.manual_seed(0)
        replicas = [GPTModel(TINY), GPTModel(TINY)]
        replicas[1].load_state_dict(replicas[0].state_dict())  # same start, as DDP broadcasts
        optimizers = [adamw(m, 3e-3, weight_decay=0.1) for m in replicas]
        generator = torch.Generator().manual_seed(0)
        for _ in range(200):
            x, y = get_batch(train_tokens, 16, TINY.context_length, generator)  # the global batch
            for rank, (model, optimizer) in enumerate(zip(replicas, optimizers, strict=True)):
                shard = slice(8 * rank, 8 * rank + 8)  # each replica sees its half
                optimizer.zero_grad(set_to_none=True)
                cross_entropy(model(x[shard]), y[shard]).backward()
            if average:
                average_gradients(replicas)
            for optimizer in optimizers:
                optimizer.step()
        gap = max(
            (a - b).abs().max().item()
            for a, b in zip(replicas[0].parameters(), replicas[1].parameters(), strict=True)
        )
        rows.append([label, f"{gap:.2e}"] + [fmt(evaluate(m, val_tokens)) for m in replicas])
    return table(
        ["", "largest weight difference between replicas", "val loss, rank 0", "val loss, rank 1"],
        rows,
    )


# ---------------------------------------------------------------------------------------------
# Tokens, pretraining and scaling out, continued: decoding, overfitting, sharding


def per_token_decoding() -> str:
    """Decode every token on its own and join the texts, instead of decoding the joined bytes."""
    tokenizer = train_tokenizer_cached(load_corpus(), 1024, cache_dir())
    token_bytes = {rank: token for token, rank in tokenizer.mergeable_ranks.items()}
    rows = []
    for text in (
        "It’s “quoted” — done…",
        "Café, naïve, résumé, Zürich",
        "東京で寿司を食べた",
        "Ship it 🚀",
    ):
        ids = tokenizer.encode(text)
        pieces = [tokenizer.decode([i]) for i in ids]  # each token's bytes decoded alone
        # A character is corrupted when a token boundary falls inside its bytes.
        cuts = set(np.cumsum([len(token_bytes[i]) for i in ids]).tolist())
        ends = np.cumsum([len(ch.encode()) for ch in text]).tolist()
        starts = [0] + ends[:-1]
        corrupted = sum(any(s < c < e for c in cuts) for s, e in zip(starts, ends, strict=True))
        rows.append(
            [
                f"`{text}`",
                str(len(ids)),
                str(sum("\ufffd" in piece for piece in pieces)),
                f"{corrupted} of {len(text)} ({corrupted / len(text):.0%})",
                f"`{''.join(pieces)}`",
                "exact" if tokenizer.decode(ids) == text else "differs",
            ]
        )
    return table(
        [
            "text",
            "tokens",
            "tokens that are not valid UTF-8 alone",
            "characters corrupted",
            "decoded token by token",
            "joined bytes, decoded once",
        ],
        rows,
    )


def overfitting() -> str:
    """Train the tiny model for 400 steps on a slice of 4,096 tokens; evaluate on held-out text."""
    train_tokens, val_tokens = corpus_tokens()
    few = train_tokens[:4096]  # four batches of 16 x 64 tokens: 400 steps read it 100 times
    torch.manual_seed(0)
    model = GPTModel(TINY)
    optimizer = adamw(model, 3e-3, weight_decay=0.1)
    generator = torch.Generator().manual_seed(0)
    checkpoints = [(0, evaluate(model, few), evaluate(model, val_tokens))]
    for step in range(1, 401):
        model.train()
        x, y = get_batch(few, 16, TINY.context_length, generator)
        loss = cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 10 == 0:
            checkpoints.append((step, evaluate(model, few), evaluate(model, val_tokens)))
    best = min(checkpoints, key=lambda c: c[2])[0]
    return table(
        ["step", "train loss (on the 4,096 tokens)", "validation loss", ""],
        [
            [str(s), fmt(t), fmt(v), "best validation" if s == best else ""]
            for s, t, v in checkpoints
            if s in (0, 20, 100, 200, 400) or s == best
        ],
    )


def duplicated_data() -> str:
    """Two data-parallel replicas that read the same shard, against distinct shards and one alone."""
    train_tokens, val_tokens = corpus_tokens()
    rows = []
    for label, shards in (
        ("one replica", [slice(0, 8)]),
        ("two replicas, same shard (no rank offset)", [slice(0, 8), slice(0, 8)]),
        ("two replicas, distinct shards (as in DDP)", [slice(0, 8), slice(8, 16)]),
    ):
        torch.manual_seed(0)
        replicas = [GPTModel(TINY) for _ in shards]
        for model in replicas[1:]:
            model.load_state_dict(replicas[0].state_dict())  # same start, as DDP broadcasts
        optimizers = [adamw(m, 3e-3, weight_decay=0.1) for m in replicas]
        generator = torch.Generator().manual_seed(0)
        for _ in range(200):
            x, y = get_batch(train_tokens, 16, TINY.context_length, generator)  # the global batch
            for model, optimizer, shard in zip(replicas, optimizers, shards, strict=True):
                optimizer.zero_grad(set_to_none=True)
                cross_entropy(model(x[shard]), y[shard]).backward()
            average_gradients(replicas)
            for optimizer in optimizers:
                optimizer.step()
        if len(shards) == 1:
            single = replicas[0]
        gap = max(
            (a - b).abs().max().item()
            for a, b in zip(single.parameters(), replicas[0].parameters(), strict=True)
        )
        rows.append(
            [
                label,
                str(len(shards)),
                str(len({i for shard in shards for i in range(16)[shard]})),
                "(the reference)" if len(shards) == 1 else f"{gap:.2e}",
                fmt(evaluate(replicas[0], val_tokens)),
            ]
        )
    return table(
        [
            "",
            "workers",
            "distinct sequences per step",
            "largest weight difference from one replica",
            "validation loss",
        ],
        rows,
    )


# ---------------------------------------------------------------------------------------------
# Classification: a rare class


def imbalanced_classes() -> str:
    """A rare class (13% of texts), trained on as it comes and on a balanced, undersampled set."""
    from src.classify import balance, collate, confusion_matrix, last_token_logits
    from src.finetune import minibatches

    # In class 1, 13% of the texts, each token is replaced with probability 1/4 by one of 8 "spam
    # words" (tokens 4-11). Class 0 texts hold spam words too, by chance (8 of the 60 tokens
    # drawn), so the classes overlap: no rule separates them all.
    generator = torch.Generator().manual_seed(0)

    def examples(n: int) -> list[tuple[list[int], int]]:
        out = []
        for _ in range(n):
            ids = _random_ids(generator)
            length = len(ids)
            label = int(torch.rand(1, generator=generator) < 0.13)
            if label:
                spam = torch.rand(length, generator=generator) < 0.25
                ids = torch.where(spam, torch.randint(4, 12, (length,), generator=generator), ids)
            out.append((ids.tolist(), label))
        return out

    train_set, test_set = examples(6400), examples(2000)  # the test set keeps the real mix
    test_ids, test_lengths, test_labels = collate(test_set, pad_id=0)

    def scores(label: str, n_train: str, predicted: torch.Tensor) -> list[str]:
        matrix = confusion_matrix(predicted, test_labels, 2)  # matrix[true][predicted]
        recall = [matrix[c][c] / sum(matrix[c]) for c in (0, 1)]
        accuracy = (predicted == test_labels).float().mean().item()
        return [label, n_train] + [f"{100 * x:.1f}%" for x in (accuracy, *recall, np.mean(recall))]

    rows = [scores("always class 0 (no model)", "none", torch.zeros_like(test_labels))]
    for label, train_rows in (
        ("trained on the data as it comes", train_set),
        ("trained on balanced data", balance(train_set, seed=0)),
    ):
        order = torch.Generator().manual_seed(0)
        two_epochs = (group for _ in range(2) for group in minibatches(train_rows, 32, order))
        model, _ = _train_classifier(two_epochs)
        with torch.no_grad():
            predicted = last_token_logits(model(test_ids), test_lengths).argmax(-1)
        rows.append(scores(label, str(len(train_rows)), predicted))
    share = test_labels.float().mean().item()
    return table(
        [
            "",
            "training texts",
            "test accuracy",
            f"recall, class 0 ({100 * (1 - share):.0f}% of the test set)",
            f"recall, class 1 ({100 * share:.0f}%)",
            "balanced accuracy (mean recall)",
        ],
        rows,
    )


# ---------------------------------------------------------------------------------------------
# Instruction finetuning: the end-of-text target


def no_eot_target() -> str:
    """Train the copy task with the end-of-text target kept or set to -100; generate greedily."""
    from src.generate import generate
    from src.instruct import IGNORE_INDEX, collate

    train_set, test_set = _copy_task()
    limit = 40  # new tokens at most: twice the longest response
    by_prompt_length: dict[int, list[list[int]]] = {}  # generate() takes equal-length prompts
    for ids, prompt_length in test_set:
        by_prompt_length.setdefault(prompt_length, []).append(ids)
    rows = []
    for label, mask_eot in (
        ("end-of-text target kept (as built)", False),
        ("end-of-text target = -100", True),
    ):
        batches = []
        for start in range(0, len(train_set), 16):
            inputs, targets = collate(train_set[start : start + 16], pad_id=0, mask_prompt=True)
            if mask_eot:
                targets[targets == 0] = IGNORE_INDEX  # 0 is a target only where a response ends
            batches.append((inputs, targets))
        model, _ = _train_copy(batches)
        stopped, lengths, target_lengths, right_length, exact = [], [], [], [], []
        for prompt_length, group in by_prompt_length.items():
            prompts = torch.tensor([ids[:prompt_length] for ids in group])  # (B, prompt_length)
            out = generate(model, prompts, limit, model.cfg.context_length, eos_id=0)
            for ids, new in zip(group, out[:, prompt_length:].tolist(), strict=True):
                target = ids[prompt_length:-1]  # the response without its end-of-text
                response = new[: new.index(0)] if 0 in new else new  # cut at end-of-text
                stopped.append(0 in new)
                lengths.append(len(response))
                target_lengths.append(len(target))
                right_length.append(len(response) == len(target))
                exact.append(response == target)
        rows.append(
            [
                label,
                f"{100 * np.mean(stopped):.1f}%",
                f"{np.mean(lengths):.1f}",
                f"{100 * np.mean(right_length):.1f}%",
                f"{100 * np.mean(exact):.1f}%",
            ]
        )
    return table(
        [
            "",
            f"responses that emit end-of-text (limit: {limit} new tokens)",
            f"mean response length, tokens (target: {np.mean(target_lengths):.1f})",
            "responses of the target length",
            "responses exactly right",
        ],
        rows,
    )


EXPERIMENTS: dict[str, Callable[[], str]] = {
    "no-causal-mask": no_causal_mask,
    "no-scale": no_scale,
    "no-layernorm": no_layernorm,
    "no-residual": no_residual,
    "no-pretokenizer": no_pretokenizer,
    "unshifted-targets": unshifted_targets,
    "random-split": random_split,
    "learning-rate": learning_rate,
    "no-max-subtraction": no_max_subtraction,
    "narrow-accumulator": narrow_accumulator,
    "flash-no-rescale": flash_no_rescale,
    "flash-no-diagonal": flash_no_diagonal,
    "greedy-loops": greedy_loops,
    "high-temperature": high_temperature,
    "gpt2-layout": gpt2_layout,
    "forgot-eval": forgot_eval,
    "first-token-pooling": first_token_pooling,
    "padding-targets": padding_targets,
    "lora-init": lora_init,
    "lora-alpha": lora_alpha,
    "unsynchronised-replicas": unsynchronised_replicas,
    "per-token-decoding": per_token_decoding,
    "overfitting": overfitting,
    "duplicated-data": duplicated_data,
    "imbalanced-classes": imbalanced_classes,
    "no-eot-target": no_eot_target,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "names",
        nargs="*",
        choices=[[], *EXPERIMENTS],
        metavar="NAME",
        help=f"experiments to run (default: all of {', '.join(EXPERIMENTS)})",
    )
    parser.add_argument("--out", type=Path, default=OUT, help=f"output folder (default {OUT})")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads (default 1: tiny models gain little from more, and "
        "one thread gives the same numbers on every run)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.names or EXPERIMENTS:
        start = time.perf_counter()
        result = EXPERIMENTS[name]()
        note = f"\n\n*Made by `uv run python benchmarks/break_it.py {name}`.*\n"
        (args.out / f"{name}.md").write_text(result + note)
        print(f"{name} ({time.perf_counter() - start:.0f} s)\n{result}\n")


if __name__ == "__main__":
    main()
