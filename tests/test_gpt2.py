"""Our model equals Hugging Face's GPT-2 when it carries the same weights.

The HF models are built offline from small random configs, so no download is needed.
"""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model

from src.generate import generate
from src.gpt2 import config_from_hf, load_gpt2_state_dict
from src.model import GPTModel

HF_CONFIGS = {
    "2L-4H-64": dict(n_layer=2, n_head=4, n_embd=64, n_positions=32, vocab_size=101),
    "3L-3H-48": dict(n_layer=3, n_head=3, n_embd=48, n_positions=40, vocab_size=257),
}


def hf_model(name: str, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    # HF's own eager attention is the reference, not the code path we test against it.
    config = GPT2Config(**HF_CONFIGS[name], attn_implementation="eager")
    model = GPT2LMHeadModel(config).eval()
    # Random init leaves biases at zero and LayerNorm at identity; perturb them so the test
    # would catch a wrongly mapped bias or norm parameter.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("attn_impl", ["eager", "sdpa"])
@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_logits_match_transformers(name, attn_impl):
    ref = hf_model(name)
    ours = GPTModel(config_from_hf(ref.config, attn_impl=attn_impl, drop_rate=0.0)).eval()
    load_gpt2_state_dict(ours, ref.state_dict())
    idx = torch.randint(0, ref.config.vocab_size, (3, ref.config.n_positions))
    with torch.no_grad():
        expected = ref(idx).logits
        got = ours(idx)
    assert (got - expected).abs().max().item() <= 1e-5


def test_loads_gpt2model_state_dict_without_prefix_or_head():
    ref = hf_model("2L-4H-64")
    base = GPT2Model(ref.config).eval()
    base.load_state_dict(ref.transformer.state_dict())
    ours = GPTModel(config_from_hf(ref.config, drop_rate=0.0)).eval()
    load_gpt2_state_dict(ours, base.state_dict())  # keys like "h.0.ln_1.weight", no lm_head
    idx = torch.randint(0, ref.config.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), ref(idx).logits, atol=1e-5, rtol=0)


def test_wrong_config_names_the_first_mismatched_key_and_shape():
    ref = hf_model("2L-4H-64")
    wrong = GPTModel(config_from_hf(ref.config, emb_dim=32, n_heads=4))
    with pytest.raises(ValueError, match=r"wte\.weight.*\(101, 64\).*\(101, 32\)"):
        load_gpt2_state_dict(wrong, ref.state_dict())


def test_missing_qkv_bias_is_reported():
    ref = hf_model("2L-4H-64")
    no_bias = GPTModel(config_from_hf(ref.config, qkv_bias=False))
    with pytest.raises(ValueError, match=r"c_attn\.bias"):
        load_gpt2_state_dict(no_bias, ref.state_dict())


def test_greedy_generation_matches_transformers():
    ref = hf_model("3L-3H-48", seed=3)
    ours = GPTModel(config_from_hf(ref.config, drop_rate=0.0)).eval()
    load_gpt2_state_dict(ours, ref.state_dict())
    prompt = torch.tensor([[5, 17, 42, 99]])
    got = generate(ours, prompt, max_new_tokens=20, context_length=ref.config.n_positions)
    again = generate(ours, prompt, max_new_tokens=20, context_length=ref.config.n_positions)
    expected = ref.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=20,
        do_sample=False,
        pad_token_id=0,
    )
    assert torch.equal(got, again)
    assert torch.equal(got, expected)


def test_generation_stops_at_end_of_text():
    ref = hf_model("2L-4H-64")
    ours = GPTModel(config_from_hf(ref.config, drop_rate=0.0)).eval()
    load_gpt2_state_dict(ours, ref.state_dict())
    prompt = torch.tensor([[1, 2, 3]])
    free = generate(ours, prompt, max_new_tokens=10, context_length=32)
    eos = free[0, 5].item()  # make the second generated token the end-of-text id
    stopped = generate(ours, prompt, max_new_tokens=10, context_length=32, eos_id=eos)
    first = (free[0, 3:] == eos).nonzero()[0].item() + 3
    assert torch.equal(stopped, free[:, : first + 1])
