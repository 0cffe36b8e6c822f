"""The chapter "From GPT-2 to a modern LLM": its measurements and its "Break it" experiments.

Each function computes one table and returns it as Markdown; ``main`` writes it to
``docs/assets/modern/<name>.md``, which the chapter includes, so every number on that page comes
from here:

    uv run python experiments/modern.py                    # all of them, a few minutes on a CPU
    uv run python experiments/modern.py rope-convention    # one

- ``equivalence``: our logits against ``transformers``' Llama, Qwen2 and Qwen3, on every attention
  path, and greedy decoding with our KV cache against ``transformers``' ``generate``;
- ``kv-cache``: the KV cache of the published shapes and of our CPU preset, grouped against
  multi-head attention, in bytes, computed and measured;
- ``past-context`` (Break it): learned positions against rotary ones, past the trained context;
- ``rope-convention`` (Break it): rotary embeddings in the other convention on loaded weights.
"""

import argparse
import sys
import time
import types
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from anywhere
from src import fused_softmax  # noqa: E402
from src.attention import KVCache  # noqa: E402
from src.data import (  # noqa: E402
    GPTDataset,
    load_corpus,
    split_tokens,
    step_batch,
    tokenize_cached,
    train_tokenizer_cached,
)
from src.files import cache_dir  # noqa: E402
from src.generate import generate  # noqa: E402
from src.llama import config_from_hf, load_llama_state_dict  # noqa: E402
from src.model import PRESETS, GPTConfig, GPTModel, kv_cache_bytes  # noqa: E402
from src.training import Schedule, adamw, cross_entropy, optimizer_step  # noqa: E402

OUT = REPO / "docs" / "assets" / "modern"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


# ---------------------------------------------------------------------------------------------
# Equal to the public implementations


def hf_models() -> dict[str, torch.nn.Module]:
    """One small random model per family, built by transformers offline: grouped heads and a tied
    head (Llama), one key/value head (Qwen2), a head size of its own (Qwen3)."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    common = dict(num_hidden_layers=2, vocab_size=101, max_position_embeddings=48,
                  hidden_size=64, num_attention_heads=4, initializer_range=0.2,
                  attn_implementation="eager")  # fmt: skip
    specs = {
        "Llama, 2 key/value heads, tied": (LlamaForCausalLM, LlamaConfig(
            **common, intermediate_size=100, num_key_value_heads=2, tie_word_embeddings=True,
            rope_theta=10000.0)),
        "Qwen2, 1 key/value head, untied": (Qwen2ForCausalLM, Qwen2Config(
            **common, intermediate_size=150, num_key_value_heads=1, tie_word_embeddings=False,
            rope_theta=1000000.0)),
        "Qwen3, head size 32 on width 64": (Qwen3ForCausalLM, Qwen3Config(
            **common, intermediate_size=90, num_key_value_heads=2, head_dim=32,
            tie_word_embeddings=True, rope_theta=1000000.0)),
    }  # fmt: skip
    models = {}
    for name, (model_class, config) in specs.items():
        torch.manual_seed(0)
        models[name] = model_class(config).eval()
        with torch.no_grad():  # norms at 1 and biases at 0 would hide a mix-up
            for p in models[name].parameters():
                p.add_(0.05 * torch.randn_like(p))
    return models


def equivalence() -> str:
    """Max |our logits - transformers' logits| in float32 on 3 random sequences of 48 tokens, per
    attention path; and 30 greedy tokens from a 5-token prompt, with our KV cache."""
    rows = []
    for name, ref in hf_models().items():
        idx = torch.randint(0, 101, (3, 48), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            expected = ref(idx).logits
        diffs = []
        for impl in ("eager", "fused", "sdpa"):
            ours = GPTModel(config_from_hf(ref.config, attn_impl=impl)).eval()
            load_llama_state_dict(ours, ref.state_dict())
            with torch.no_grad():
                diffs.append(f"{(ours(idx) - expected).abs().max().item():.1e}")
        prompt = torch.tensor([[5, 17, 42, 99, 3]])
        eos = ref.generation_config.eos_token_id  # both stop at the model's end-of-text token
        got = generate(ours, prompt, max_new_tokens=30, context_length=48, eos_id=eos)
        want = ref.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=30,
                            do_sample=False, pad_token_id=0)  # fmt: skip
        n = got.shape[1] - prompt.shape[1]
        same = f"all {n} equal" if torch.equal(got, want) else "DIFFERENT"
        rows.append([name, *diffs, f"{expected.abs().max().item():.1f}", same])
    fused = "" if fused_softmax.is_available() else " (fused kernel unavailable: plain path)"
    return table(["model", "eager", "fused" + fused, "sdpa", "largest logit",
                  "greedy tokens, our KV cache"], rows)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The KV cache with grouped heads


def kv_cache() -> str:
    """The cache of one sequence at full context, bf16 (2 bytes a number), grouped-query as the
    models have it and multi-head (every query head with its own key/value head); for the CPU
    preset also measured: the bytes of the tensors a real cache holds after 256 tokens (float32)."""
    rows = []
    for name in ("gpt2-small", "smollm2-135m", "qwen2.5-0.5b", "qwen3-0.6b", "cpu-llama"):
        cfg = PRESETS[name]
        mha = replace(cfg, n_kv_heads=None)
        per_token, per_token_mha = kv_cache_bytes(cfg, 1), kv_cache_bytes(mha, 1)
        full, full_mha = (
            kv_cache_bytes(cfg, cfg.context_length),
            kv_cache_bytes(mha, cfg.context_length),
        )
        rows.append([f"`{name}`", f"{cfg.n_layers} x {cfg.n_heads} / {cfg.kv_heads} x {cfg.head_size}",
                     f"{per_token / 1024:,.1f} KiB", f"{per_token_mha / 1024:,.1f} KiB",
                     f"{per_token_mha / per_token:.1f}x", f"{cfg.context_length:,}",
                     f"{size(full)}", f"{size(full_mha)}"])  # fmt: skip
    measured = []
    for cfg in (PRESETS["cpu-llama"], replace(PRESETS["cpu-llama"], n_kv_heads=None)):
        torch.manual_seed(0)
        model = GPTModel(cfg).eval()
        cache = [KVCache() for _ in model.trf_blocks]
        with torch.no_grad():
            model(torch.zeros(1, cfg.context_length, dtype=torch.long), kv_cache=cache)
        held = sum(c.k.nbytes + c.v.nbytes for c in cache)
        assert held == kv_cache_bytes(cfg, cfg.context_length, bytes_per_value=4)
        measured.append(f"{held / 1024:,.0f} KiB")
    header = ["preset", "layers x query / key-value heads x head size", "per token (GQA)",
              "per token (MHA)", "MHA / GQA", "context", "full context (GQA)",
              "full context (MHA)"]  # fmt: skip
    return (table(header, rows) + f"\n\nMeasured on `cpu-llama` in float32 after "
            f"{PRESETS['cpu-llama'].context_length} tokens: the tensors of a real `KVCache` hold "
            f"{measured[0]} with 2 key/value heads, {measured[1]} with 4, as the formula says.")  # fmt: skip


def size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


# ---------------------------------------------------------------------------------------------
# Break it: positions past the trained context

TINY = GPTConfig(
    vocab_size=1024, context_length=64, emb_dim=64, n_heads=2, n_layers=2, drop_rate=0.0
)


def tiny_corpus() -> tuple[np.ndarray, np.ndarray]:
    corpus = load_corpus()
    tokenizer = train_tokenizer_cached(corpus, TINY.vocab_size, cache_dir())
    return split_tokens(tokenize_cached(corpus, tokenizer, cache_dir()))


def train(cfg: GPTConfig, tokens: np.ndarray, steps: int = 400, batch_size: int = 16) -> GPTModel:
    torch.manual_seed(0)
    model = GPTModel(cfg)
    data = GPTDataset(tokens, cfg.context_length, stride=cfg.context_length)
    optimizer, schedule = adamw(model, 3e-3, 0.1), Schedule(3e-3, 3e-4, 30, steps)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = schedule(step)
        batch = data.batch(step_batch(step, len(data), batch_size, seed=0))
        optimizer_step(
            model, optimizer, [batch], lambda xy: cross_entropy(model(xy[0]), xy[1]), step
        )
    return model.eval()


@torch.no_grad()
def loss_by_position(
    model: GPTModel, tokens: np.ndarray, T: int, buckets: list[range]
) -> list[str]:
    """Mean loss at the positions of each bucket, over windows of T tokens that start every 8
    tokens: every validation token is a target at every range of positions, so the buckets
    differ in the context a token has, not in which tokens they score."""
    data = GPTDataset(tokens, T, stride=8)
    losses = []
    for start in range(0, len(data), 64):
        x, y = data.batch(torch.arange(start, min(start + 64, len(data))))
        logits = model(x).transpose(1, 2)  # (B, vocab_size, T)
        losses.append(torch.nn.functional.cross_entropy(logits, y, reduction="none"))
    losses = torch.cat(losses)  # (windows, T)
    return [f"{losses[:, b.start : b.stop].mean().item():.2f}" for b in buckets]


def past_context() -> str:
    """Train a model with learned positions and one with rotary positions at context 64, then ask
    both about windows of 256 tokens. Positions 0-63 are the trained ones; 48-63 are the trained
    positions with the most text before them, the fair comparison for the later ones."""
    train_tokens, val_tokens = tiny_corpus()
    buckets = [range(0, 64), range(48, 64), range(64, 128), range(128, 192), range(192, 256)]
    rows = []
    for label, pos_emb in (("learned positions", "learned"), ("rotary (RoPE)", "rope")):
        cfg = replace(TINY, pos_emb=pos_emb)
        model = train(cfg, train_tokens)
        longer = GPTModel(replace(cfg, context_length=256)).eval()
        try:
            # --8<-- [start:longer]
            longer.load_state_dict(model.state_dict())  # the same weights, a context of 256
            # --8<-- [end:longer]
        except RuntimeError as err:  # a learned table has rows for positions 0-63 only
            why = str(err).splitlines()[1].split(":")[0].strip()  # "size mismatch for ..."
            trained = loss_by_position(model, val_tokens, 64, buckets[:2])
            rows.append([label, *trained, f"cannot run: {why}", "", ""])
            continue
        rows.append([label, *loss_by_position(longer, val_tokens, 256, buckets)])
    header = ["trained at context 64", "positions 0-63", "48-63", "64-127", "128-191", "192-255"]
    return table(header, rows)


# ---------------------------------------------------------------------------------------------
# Break it: the other rotary convention


def rotate_interleaved(self, x: torch.Tensor, start: int) -> torch.Tensor:
    """``RotaryEmbedding.forward`` with the paper's pairs, (x_0, x_1), (x_2, x_3), ..."""
    T = x.shape[-2]
    positions = torch.arange(start, start + T, dtype=torch.float32)
    angles = torch.outer(positions, self.inv_freq).repeat_interleave(2, dim=-1)  # (T, hd)
    # --8<-- [start:interleaved]
    turned = torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)  # (a, b) -> (-b, a)
    # --8<-- [end:interleaved]
    return x * angles.cos() + turned * angles.sin()


def interleave_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder each head's rows from half-split to interleaved pairs: row i of the head goes to
    2i, row i + hd/2 to 2i + 1, so that each pair of the rotation holds the same two numbers."""
    hd = weight.shape[0] // n_heads
    order = torch.arange(hd).view(2, hd // 2).t().flatten()  # 0, hd/2, 1, hd/2 + 1, ...
    return weight.view(n_heads, hd, -1)[:, order].reshape(weight.shape)


def rope_convention() -> str:
    """Load a random Llama from transformers and rotate q and k in the interleaved convention
    instead of Hugging Face's half-split one; then also reorder the q and k rows to match."""
    ref = hf_models()["Llama, 2 key/value heads, tied"]
    idx = torch.randint(0, 101, (8, 48), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = ref(idx).logits
    rows = []
    for label in (
        "half-split, as loaded",
        "interleaved (wrong)",
        "interleaved, q and k rows reordered",
    ):
        model = GPTModel(config_from_hf(ref.config)).eval()
        load_llama_state_dict(model, ref.state_dict())
        for block in model.trf_blocks if label != "half-split, as loaded" else []:
            block.att.rope.forward = types.MethodType(rotate_interleaved, block.att.rope)
            if "reordered" in label:
                with torch.no_grad():
                    for proj, heads in ((block.att.W_query, 4), (block.att.W_key, 2)):
                        proj.weight.copy_(interleave_rows(proj.weight, heads))
        with torch.no_grad():
            got = model(idx)
        agree = (got.argmax(-1) == expected.argmax(-1)).float().mean().item()
        rows.append([label, f"{(got - expected).abs().max().item():.1e}", f"{agree:.0%}"])
    return table(["rotary convention", "max abs logit difference", "same top-1 token"], rows)


EXPERIMENTS: dict[str, Callable[[], str]] = {
    "equivalence": equivalence,
    "kv-cache": kv_cache,
    "past-context": past_context,
    "rope-convention": rope_convention,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", choices=[[], *EXPERIMENTS], metavar="NAME",
                        help=f"what to run (default: all of {', '.join(EXPERIMENTS)})")  # fmt: skip
    parser.add_argument("--out", type=Path, default=OUT, help=f"output folder (default {OUT})")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny models; one thread gives the same numbers every time
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.names or EXPERIMENTS:
        start = time.perf_counter()
        result = EXPERIMENTS[name]()
        note = f"\n\n*Made by `uv run python experiments/modern.py {name}`.*\n"
        (args.out / f"{name}.md").write_text(result + note, "utf-8")
        print(f"{name} ({time.perf_counter() - start:.0f} s)\n{result}\n", flush=True)


if __name__ == "__main__":
    main()
