"""The model's building blocks: sizes, shapes and the equivalence of the attention paths."""

import functools

import pytest
import torch

from src.attention import MultiHeadAttention
from src.model import GELU, PRESETS, GPTConfig, GPTModel, LayerNorm, count_parameters


def test_gpt2_small_parameter_count_untied_and_tied():
    # Counted from the architecture, on the meta device (shapes, no storage, no initialisation);
    # the reference figures are the book's.
    with torch.device("meta"):
        untied = GPTModel(GPTConfig.from_preset("gpt2-small"))
        tied = GPTModel(GPTConfig.from_preset("gpt2-small", tie_weights=True))
    assert count_parameters(untied) == 163_009_536
    assert count_parameters(tied) == 124_412_160
    assert tied.out_head.weight is tied.tok_emb.weight


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(ValueError, match="gpt2-small"):
        GPTConfig.from_preset("gpt5")


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(emb_dim=100, n_heads=3)
    with pytest.raises(ValueError, match="attn_impl"):
        GPTConfig(attn_impl="magic")


def test_layernorm_and_gelu_match_torch():
    x = torch.randn(4, 7, 32, dtype=torch.float64)
    ours = LayerNorm(32).double()
    ref = torch.nn.LayerNorm(32, eps=1e-5).double()
    torch.testing.assert_close(ours(x), ref(x))
    torch.testing.assert_close(GELU()(x), torch.nn.functional.gelu(x, approximate="tanh"))


def test_fused_layers_are_the_written_out_layers():
    # F.layer_norm and F.gelu(approximate="tanh") in place of the written-out formulas: the same
    # function, so the same logits and gradients, in float64 to the last digits.
    cfg = GPTConfig.from_preset("cpu-tiny")
    written = GPTModel(cfg).double()
    fused = GPTModel(GPTConfig.from_preset("cpu-tiny", fused_layers=True)).double()
    fused.load_state_dict(written.state_dict())
    assert fused.trf_blocks[0].norm1.fused and fused.trf_blocks[0].ff.gelu.fused
    idx = torch.randint(0, cfg.vocab_size, (2, 20))
    logits = [model(idx) for model in (written, fused)]
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-10, atol=1e-10)
    for out in logits:
        out.square().mean().backward()
    for (name, p_w), p_f in zip(written.named_parameters(), fused.parameters(), strict=True):
        torch.testing.assert_close(p_f.grad, p_w.grad, rtol=1e-9, atol=1e-12, msg=name)


def test_forward_shape_and_context_guard():
    cfg = PRESETS["cpu-tiny"]
    model = GPTModel(cfg)
    idx = torch.randint(0, cfg.vocab_size, (3, 10))
    assert model(idx).shape == (3, 10, cfg.vocab_size)
    with pytest.raises(ValueError, match="context_length"):
        model(torch.zeros(1, cfg.context_length + 1, dtype=torch.long))


def test_init_scales_residual_projections():
    cfg = GPTConfig.from_preset("cpu-small", n_layers=8)
    torch.manual_seed(0)
    model = GPTModel(cfg)
    block = model.trf_blocks[0]
    expected = 0.02 / (2 * cfg.n_layers) ** 0.5
    assert block.att.out_proj.weight.std().item() == pytest.approx(expected, rel=0.05)
    assert block.ff.proj.weight.std().item() == pytest.approx(expected, rel=0.05)
    assert block.att.W_query.weight.std().item() == pytest.approx(0.02, rel=0.05)


@pytest.mark.parametrize("T", [1, 5, 16])
def test_eager_and_sdpa_agree_on_outputs_and_gradients(T):
    torch.manual_seed(1)
    eager = MultiHeadAttention(32, 32, 16, 4, qkv_bias=True, attn_impl="eager").double()
    sdpa = MultiHeadAttention(32, 32, 16, 4, qkv_bias=True, attn_impl="sdpa").double()
    sdpa.load_state_dict(eager.state_dict())
    x = torch.randn(2, T, 32, dtype=torch.float64)
    out_e, out_s = eager(x), sdpa(x)
    torch.testing.assert_close(out_s, out_e)
    (out_e**2).sum().backward()
    (out_s**2).sum().backward()
    for (name, pe), ps in zip(eager.named_parameters(), sdpa.parameters(), strict=True):
        torch.testing.assert_close(ps.grad, pe.grad, msg=name)


def test_causality_future_tokens_do_not_change_the_past():
    cfg = PRESETS["cpu-tiny"]
    model = GPTModel(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (1, 12))
    changed = idx.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % cfg.vocab_size
    torch.testing.assert_close(model(idx)[:, :8], model(changed)[:, :8])


# What the model chapter explains: embeddings, the position limit, dropout and eval().


def test_embedding_lookup_is_a_one_hot_matrix_product():
    emb = torch.nn.Embedding(11, 5).double()
    ids = torch.tensor([[3, 0, 3, 10], [7, 7, 1, 2]])
    one_hot = torch.nn.functional.one_hot(ids, num_classes=11).double()  # (2, 4, 11)
    torch.testing.assert_close(emb(ids), one_hot @ emb.weight)  # (2, 4, 5) both
    # The gradients agree too: only the rows of ids that occur receive any, and a repeated id sums.
    w = emb.weight.detach().clone().requires_grad_()
    g = torch.randn(2, 4, 5, dtype=torch.float64)
    (emb(ids) * g).sum().backward()
    ((one_hot @ w) * g).sum().backward()
    torch.testing.assert_close(emb.weight.grad, w.grad)
    unused = [i for i in range(11) if i not in ids]
    assert (emb.weight.grad[unused] == 0).all()


def test_learned_positions_stop_at_context_length():
    cfg = PRESETS["cpu-tiny"]
    model = GPTModel(cfg)
    assert model.pos_emb.weight.shape == (cfg.context_length, cfg.emb_dim)  # one row per position
    with pytest.raises(IndexError):
        model.pos_emb(torch.tensor([cfg.context_length]))  # no row for the next position
    with pytest.raises(ValueError, match=f"exceeds context_length {cfg.context_length}"):
        model(torch.zeros(1, cfg.context_length + 1, dtype=torch.long))
    # A row learns only from sequences long enough to reach it: train on 10 tokens, and the
    # position rows from 10 on receive no gradient at all.
    model(torch.randint(0, cfg.vocab_size, (2, 10))).sum().backward()
    grad = model.pos_emb.weight.grad
    assert (grad[:10].abs().sum(-1) > 0).all() and (grad[10:] == 0).all()


def test_dropout_sits_at_three_sites_and_eval_turns_every_one_off():
    cfg = GPTConfig.from_preset("cpu-tiny", drop_rate=0.2)
    model = GPTModel(cfg)
    sites = sorted(n for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout))
    per_block = [
        f"trf_blocks.{i}.{s}" for i in range(cfg.n_layers) for s in ("att.dropout", "drop_shortcut")
    ]
    assert sites == sorted(["drop_emb", *per_block])
    zeroed = {}  # site -> share of its output that is zero, on its first call in training

    def record(name, module, args, out):  # returns None: the hook leaves the output as it is
        zeroed.setdefault(name, (out == 0).float().mean().item())

    for name in sites:
        model.get_submodule(name).register_forward_hook(functools.partial(record, name))
    idx = torch.randint(0, cfg.vocab_size, (4, 32))
    model.train()
    first, second = model(idx), model(idx)
    assert not torch.equal(first, second)  # a new random mask on every call
    assert set(zeroed) == set(sites)
    # The attention weights are half zero from the mask already; the other sites are dense.
    assert all(0.15 < v < 0.25 for n, v in zeroed.items() if "att" not in n), zeroed
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(idx), model(idx), rtol=0, atol=0)
        without = GPTModel(GPTConfig.from_preset("cpu-tiny", drop_rate=0.0))
        without.load_state_dict(model.state_dict())
        torch.testing.assert_close(model(idx), without(idx), rtol=0, atol=0)


def test_a_linear_layer_counts_in_times_out_weights_and_acts_on_each_position_alone():
    layer = torch.nn.Linear(768, 3072)
    assert layer.weight.numel() == 768 * 3072 == 2_359_296
    assert sum(p.numel() for p in layer.parameters()) == 2_359_296 + 3072
    x = torch.randn(2, 5, 768)
    y = layer(x)  # (2, 5, 3072)
    torch.testing.assert_close(y[1, 3], layer(x[1, 3]))  # one position alone gives the same row
    x[0, 0] += 1.0  # change one position: only its own output moves
    changed = (layer(x) != y).any(-1)
    assert changed[0, 0] and changed.sum() == 1
