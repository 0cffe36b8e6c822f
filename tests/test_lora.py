"""LoRA: starts as the identity change, trains only its own matrices, merges exactly."""

import pytest
import torch
from torch import nn

from src.lora import LoRALinear, apply_lora, lora_parameter_count, merge_lora, unmerge_lora
from src.model import GPTConfig, GPTModel, count_parameters


def tiny_model() -> GPTModel:
    cfg = GPTConfig.from_preset("cpu-tiny", vocab_size=97, context_length=16)
    return GPTModel(cfg).eval()


def perturb_lora(model: nn.Module) -> None:
    """B starts at zero; give it values so the update is not trivially zero."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0, 0.05)


def test_at_initialisation_outputs_equal_the_base_model():
    model = tiny_model()
    idx = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        expected = model(idx).clone()
    apply_lora(model, rank=4, alpha=8)
    with torch.no_grad():
        got = model(idx)
    assert torch.equal(got, expected)


def test_only_lora_parameters_receive_gradients():
    model = tiny_model()
    apply_lora(model, rank=4, alpha=8)
    perturb_lora(model)  # with B = 0 the gradient of A would be zero, hiding a frozen A
    idx = torch.randint(0, 97, (2, 16))
    model(idx).square().mean().backward()
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name


def test_merged_equals_unmerged_and_unmerge_restores_the_base():
    model = tiny_model()
    base_weights = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, rank=4, alpha=8)
    perturb_lora(model)
    idx = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        unmerged = model(idx)
        merge_lora(model)
        merged = model(idx)
        # The merge really moved the base weights (the test would be empty otherwise).
        wq = model.trf_blocks[0].att.W_query
        assert not torch.equal(wq.base.weight, base_weights["trf_blocks.0.att.W_query.weight"])
        unmerge_lora(model)
        again = model(idx)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, unmerged, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        wq.base.weight, base_weights["trf_blocks.0.att.W_query.weight"], atol=1e-6, rtol=0
    )


def test_update_is_alpha_over_rank_times_BA_against_a_plain_computation():
    torch.manual_seed(1)
    base = nn.Linear(6, 5)
    layer = LoRALinear(base, rank=3, alpha=12)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 6)
    expected = x @ (base.weight + (12 / 3) * layer.lora_B @ layer.lora_A).T + base.bias
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_parameter_counts_are_rank_times_in_plus_out_per_layer():
    model = tiny_model()
    total_before = sum(p.numel() for p in model.parameters())
    cfg = model.cfg
    E, L, r = cfg.emb_dim, cfg.n_layers, 8
    names = apply_lora(model, rank=r, alpha=16)
    # Per block: W_query, W_key, W_value, out_proj (E -> E) and the two feed-forward layers
    # (E -> 4E, 4E -> E); plus the output head (E -> vocab).
    per_block = 4 * r * (E + E) + 2 * r * (E + 4 * E)
    expected = L * per_block + r * (E + cfg.vocab_size)
    assert len(names) == 6 * L + 1
    assert lora_parameter_count(model) == expected
    assert count_parameters(model) == expected  # trainable = LoRA matrices only
    assert sum(p.numel() for p in model.parameters()) == total_before + expected


def test_targets_select_layers_by_name():
    model = tiny_model()
    names = apply_lora(model, rank=2, alpha=2, targets=["W_query", "W_value"])
    assert names == [
        f"trf_blocks.{i}.att.{n}" for i in range(model.cfg.n_layers) for n in ("W_query", "W_value")
    ]
    assert isinstance(model.trf_blocks[0].att.W_key, nn.Linear)


@pytest.mark.parametrize("rank", [0, -3])
def test_rank_must_be_positive(rank):
    with pytest.raises(ValueError, match="LoRA rank must be a positive integer"):
        apply_lora(tiny_model(), rank=rank, alpha=8)


def test_targets_that_match_nothing_are_an_error():
    with pytest.raises(ValueError, match="no Linear layer"):
        apply_lora(tiny_model(), rank=2, alpha=2, targets=["c_attn"])
