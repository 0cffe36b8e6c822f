"""Break it, chapter "From GPT-2 to a modern LLM": read past the trained context; rotate in the
other rotary convention.

The first trains the tiny model twice, with learned and with rotary positions, at a context of 64
and asks both about windows of 256 tokens; the second needs no training, only a small random Llama
built by ``transformers``, loaded into our model, and rotated the other way.
"""

import types
from dataclasses import replace

import numpy as np
import torch

from benchmarks.harness import markdown_table
from experiments.harness import corpus_tokens, pretrain, tiny, windows
from src.data import GPTDataset
from src.llama import config_from_hf, load_llama_state_dict
from src.model import GPTModel


# --8<-- [start:past-context]
def longer_context(model: GPTModel, context_length: int) -> GPTModel:
    """The trained weights in a model with a longer context: possible only without a table of
    learned positions, which has a row for each trained position and none after them."""
    longer = GPTModel(replace(model.cfg, context_length=context_length)).eval()
    longer.load_state_dict(model.state_dict())  # learned positions: 64 rows, and 256 are asked for
    return longer


# --8<-- [end:past-context]


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


def past_context(steps: int = 400, lr: float = 3e-3) -> str:
    """Learned positions against rotary ones, past the trained context of 64 tokens.

    Positions 0-63 are the trained ones; 48-63 are the trained positions with the most text before
    them, the fair comparison for the later ones."""
    train_tokens, val_tokens = corpus_tokens()
    buckets = [range(0, 64), range(48, 64), range(64, 128), range(128, 192), range(192, 256)]
    rows = []
    for label, pos_emb in (("learned positions", "learned"), ("rotary (RoPE)", "rope")):
        torch.manual_seed(0)
        model = GPTModel(tiny(pos_emb=pos_emb))
        pretrain(model, windows(train_tokens), steps, lr, warmup=30)
        model.eval()
        try:
            longer = longer_context(model, 256)
        except RuntimeError as err:  # "size mismatch for pos_emb.weight: ..."
            why = str(err).splitlines()[1].split(":")[0].strip()
            trained = loss_by_position(model, val_tokens, 64, buckets[:2])
            rows.append([label, *trained, f"cannot run: {why}", "", ""])
            continue
        rows.append([label, *loss_by_position(longer, val_tokens, 256, buckets)])
    header = ["trained at context 64", "positions 0-63", "48-63", "64-127", "128-191", "192-255"]
    return markdown_table(header, rows, align="lrrrrr")


# --8<-- [start:rope-convention]
def rotate_interleaved(self, x: torch.Tensor, start: int) -> torch.Tensor:
    """``RotaryEmbedding.forward`` with the paper's pairs, (x_0, x_1), (x_2, x_3), ..."""
    positions = torch.arange(start, start + x.shape[-2], dtype=torch.float32)
    angles = torch.outer(positions, self.inv_freq).repeat_interleave(2, dim=-1)  # (T, hd)
    turned = torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)  # (a, b) -> (-b, a)
    return x * angles.cos() + turned * angles.sin()


def interleave_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Each head's rows from half-split to interleaved order: row i to 2i, row i + hd/2 to 2i + 1."""
    hd = weight.shape[0] // n_heads
    order = torch.arange(hd).view(2, hd // 2).t().flatten()  # 0, hd/2, 1, hd/2 + 1, ...
    return weight.view(n_heads, hd, -1)[:, order].reshape(weight.shape)


# --8<-- [end:rope-convention]


def random_llama() -> torch.nn.Module:
    """A small random Llama built by ``transformers`` offline: 4 query heads, 2 key/value heads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(num_hidden_layers=2, vocab_size=101, max_position_embeddings=48,
                         hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=100, tie_word_embeddings=True, rope_theta=10000.0,
                         initializer_range=0.2, attn_implementation="eager")  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms at 1 would hide a mix-up
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def rope_convention() -> str:
    """Real weights rotated in the interleaved convention instead of the half-split one they were
    converted for; then with each head's query and key rows reordered to match."""
    ref = random_llama()
    idx = torch.randint(0, 101, (8, 48), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = ref(idx).logits  # (B, T, vocab_size)
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
    return markdown_table(["rotary convention", "max abs logit difference", "same top-1 token"],
                          rows, align="lrr")  # fmt: skip


EXPERIMENTS = {"past-context": past_context, "rope-convention": rope_convention}
