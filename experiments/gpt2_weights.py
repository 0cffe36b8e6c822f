"""Break it, chapter "Loading GPT-2": read the layout wrong; forget ``model.eval()``.

Both build a small GPT-2 with random weights in ``transformers``, the independent reference, load it
with our loader, and compare our logits with Hugging Face's. No training, no download.
"""

import torch

from benchmarks.harness import markdown_table
from src.generate import generate
from src.gpt2 import config_from_hf, load_gpt2_state_dict
from src.model import GPTModel


def random_gpt2(initializer_range: float = 0.2):
    """A small GPT-2 with random weights from transformers, 8 random sequences, and its logits.

    The weights are drawn 10x GPT-2's initial scale (0.02), closer to a trained model's: at 0.02
    attention is nearly uniform, and swapping query and key barely shows."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf_config = GPT2Config(vocab_size=1024, n_positions=64, n_embd=64, n_layer=2, n_head=2,
                           initializer_range=initializer_range)  # fmt: skip
    reference = GPT2LMHeadModel(hf_config).eval()
    ids = torch.randint(0, 1024, (8, 64))
    with torch.no_grad():
        expected = reference(ids).logits  # (B, T, V)
    return hf_config, reference, ids, expected


# --8<-- [start:gpt2-layout]
def untransposed_c_proj(model: GPTModel) -> None:
    """Undo the transpose of c_proj: square (E, E), so the wrong layout has the right shape."""
    for block in model.trf_blocks:
        block.att.out_proj.weight.copy_(block.att.out_proj.weight.t().clone())


def key_query_swapped(model: GPTModel) -> None:
    """Read c_attn's three slices as [key | query | value] instead of [query | key | value]."""
    for block in model.trf_blocks:
        q, k = block.att.W_query, block.att.W_key
        for name in ("weight", "bias"):
            a, b = getattr(q, name).clone(), getattr(k, name).clone()
            getattr(q, name).copy_(b)
            getattr(k, name).copy_(a)


# --8<-- [end:gpt2-layout]


def gpt2_layout() -> str:
    """Load a small random GPT-2 from transformers, then undo one layout step, and compare logits."""
    hf_config, reference, ids, expected = random_gpt2()
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
        rows.append([label, f"{(logits - expected).abs().max():.2e}", f"{expected.std():.2f}",
                     f"{100 * agree:.1f}%"])  # fmt: skip
    header = ["", "max abs logit difference", "logit std (reference)", "same top-1 token"]
    return markdown_table(header, rows)


def forgot_eval() -> str:
    """Use loaded GPT-2 weights without ``model.eval()``: dropout stays on in every forward pass."""
    hf_config, reference, ids, expected = random_gpt2()
    prompt = ids[:, :8]
    rows = []
    for label, training in (("model.eval()", False), ("left in training mode", True)):
        torch.manual_seed(0)
        model = GPTModel(config_from_hf(hf_config))  # GPT-2's own dropout: 0.1
        load_gpt2_state_dict(model, reference.state_dict())
        # --8<-- [start:forgot-eval]
        model.train(training)  # training=True: what a model is left in unless eval() is called
        # --8<-- [end:forgot-eval]
        with torch.no_grad():
            first, second = model(ids), model(ids)
        agree = (first.argmax(-1) == expected.argmax(-1)).float().mean()
        greedy = [generate(model, prompt, 24, hf_config.n_positions)[:, 8:] for _ in range(2)]
        rows.append([
            label,
            f"{(first - expected).abs().max():.2e}",
            f"{(first - second).abs().max():.2e}",
            f"{100 * agree:.1f}%",
            f"{100 * (greedy[0] == greedy[1]).float().mean():.1f}%",
        ])  # fmt: skip
    header = ["", "max abs logit difference from the reference", "between two calls on the same input",
              "same top-1 token as the reference", "same greedy tokens in two runs"]  # fmt: skip
    return markdown_table(header, rows)


EXPERIMENTS = {"gpt2-layout": gpt2_layout, "forgot-eval": forgot_eval}
