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


# ---------------------------------------------------------------------------------------------
# The modern switches, each against an independent reference


def test_rmsnorm_matches_torch():
    from src.attention import RMSNorm

    x = torch.randn(4, 7, 32, dtype=torch.float64)
    ours = RMSNorm(32, eps=1e-6).double()
    with torch.no_grad():
        ours.scale.normal_()
    expected = torch.nn.functional.rms_norm(x, (32,), ours.scale, eps=1e-6)
    torch.testing.assert_close(ours(x), expected)


def test_rotary_embedding_is_a_rotation_of_each_pair_by_position():
    """Against complex numbers in float64: pair (x_i, x_{i+hd/2}) is x_i + j x_{i+hd/2}, and
    position m multiplies it by exp(j m theta_i); a query at m and a key at n then score the same
    as at m + 5 and n + 5."""
    from src.attention import RotaryEmbedding

    hd, T, base = 16, 12, 500.0
    rope = RotaryEmbedding(hd, base).double()
    x = torch.randn(2, 3, T, hd, dtype=torch.float64)
    theta = base ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)  # (hd/2,)
    pairs = torch.complex(x[..., : hd // 2], x[..., hd // 2 :])
    turned = pairs * torch.polar(torch.ones(T, hd // 2, dtype=torch.float64),
                                 (torch.arange(3, 3 + T, dtype=torch.float64)[:, None] * theta))  # fmt: skip
    expected = torch.cat((turned.real, turned.imag), dim=-1)
    # The angles are float32, as Hugging Face computes them: equal to about 1e-6.
    torch.testing.assert_close(rope(x, torch.arange(3, 3 + T)), expected, rtol=0, atol=1e-5)
    q, k = torch.randn(hd, dtype=torch.float64), torch.randn(hd, dtype=torch.float64)
    at = lambda v, m: rope(v.view(1, 1, 1, hd), torch.tensor([m])).flatten()  # noqa: E731
    torch.testing.assert_close(at(q, 7) @ at(k, 2), at(q, 12) @ at(k, 7))


def test_swiglu_is_silu_gate_times_up_then_down():
    from src.model import SwiGLU

    cfg = GPTConfig(emb_dim=32, n_heads=4, ff="swiglu", ff_hidden_dim=40, bias=False)
    ff = SwiGLU(cfg).double()
    x = torch.randn(3, 5, 32, dtype=torch.float64)
    F = torch.nn.functional
    expected = F.linear(
        F.silu(F.linear(x, ff.gate.weight)) * F.linear(x, ff.fc.weight), ff.proj.weight
    )
    torch.testing.assert_close(ff(x), expected)
    assert GPTConfig(emb_dim=256, n_heads=4, ff="swiglu").ff_width == 704  # 8/3 x 256, up to 64


@pytest.mark.parametrize("attn_impl", ["eager", "fused", "sdpa", "flash"])
@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
def test_grouped_heads_equal_attention_over_repeated_key_value_heads(attn_impl, n_kv_heads):
    """The reference repeats each key/value head for its group and runs PyTorch's attention."""
    torch.manual_seed(2)
    dtype = torch.float32 if attn_impl == "fused" else torch.float64  # the kernel's float64 is slow
    mha = MultiHeadAttention(32, 32, 16, 4, attn_impl=attn_impl, n_kv_heads=n_kv_heads, qk_norm=True,
                             rope_theta=10000.0, out_bias=False).to(dtype).eval()  # fmt: skip
    x = torch.randn(2, 16, 32, dtype=dtype)
    B, T, G = 2, 16, 4 // n_kv_heads
    q = mha.W_query(x).view(B, T, 4, 8).transpose(1, 2)
    k = mha.W_key(x).view(B, T, n_kv_heads, 8).transpose(1, 2)
    v = mha.W_value(x).view(B, T, n_kv_heads, 8).transpose(1, 2)
    positions = torch.arange(T)
    q, k = mha.rope(mha.q_norm(q), positions), mha.rope(mha.k_norm(k), positions)
    k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)  # (B, 4, T, hd)
    context = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    expected = mha.out_proj(context.transpose(1, 2).reshape(B, T, 32))
    torch.testing.assert_close(mha(x), expected, rtol=1e-5, atol=1e-5)
    assert mha.W_key.weight.shape == (8 * n_kv_heads, 32)  # only the key/value heads are learned


def test_modern_switches_are_checked():
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        GPTConfig(emb_dim=64, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="norm must be one of"):
        GPTConfig(norm="batchnorm")
    with pytest.raises(ValueError, match="even head size"):
        GPTConfig(emb_dim=36, n_heads=4, pos_emb="rope")
    old = {k: v for k, v in PRESETS["cpu-small"].to_dict().items() if k in GPTConfig.__annotations__
           and list(GPTConfig.__annotations__).index(k) <= 8}  # a checkpoint's config from before  # fmt: skip
    assert GPTConfig(**old) == PRESETS["cpu-small"]


def test_rope_model_has_no_position_table_and_runs_past_its_training_context():
    cfg = GPTConfig.from_preset("cpu-tiny", pos_emb="rope", norm="rmsnorm", ff="swiglu")
    model = GPTModel(cfg).eval()
    assert model.pos_emb is None
    longer = GPTModel(
        GPTConfig.from_preset("cpu-tiny", **(cfg.to_dict() | {"context_length": 256}))
    )
    longer.load_state_dict(model.state_dict())  # no weight depends on the context length
    assert longer(torch.zeros(1, 256, dtype=torch.long)).shape == (1, 256, cfg.vocab_size)
