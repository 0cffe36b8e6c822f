"""Attention built step by step: given the same weights, each step computes what the next one does.

The chain runs from ``dot_product_attention`` (no weights) through ``SelfAttention``,
``CausalAttention`` and ``MultiHeadAttentionWrapper`` to the production ``MultiHeadAttention``.
Every comparison is in float64, so "equal" means equal up to rounding, not within a loose tolerance.
"""

import math

import pytest
import torch
from torch import nn

from src.attention import (
    CausalAttention,
    MultiHeadAttention,
    MultiHeadAttentionWrapper,
    SelfAttention,
    dot_product_attention,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: one thread is faster
D = torch.float64


def test_dot_product_attention_is_a_similarity_weighted_average():
    x = torch.randn(2, 5, 3, dtype=D)
    out = dot_product_attention(x)
    expected = torch.zeros_like(x)
    for b in range(2):  # the formula, one output vector at a time
        for i in range(5):
            scores = [float(x[b, i] @ x[b, j]) for j in range(5)]
            total = sum(math.exp(s) for s in scores)
            for j in range(5):
                expected[b, i] += math.exp(scores[j]) / total * x[b, j]
    torch.testing.assert_close(out, expected)


def test_the_chapters_toy_example():
    # The numbers the chapter shows: three 2-d vectors, the third pointing away from the first.
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], dtype=D)
    weights = torch.softmax(x @ x.T, dim=-1)
    torch.testing.assert_close(
        weights[0], torch.tensor([0.665, 0.245, 0.090], dtype=D), atol=5e-4, rtol=0
    )
    out = dot_product_attention(x)
    torch.testing.assert_close(out[0], torch.tensor([0.575, 0.245], dtype=D), atol=5e-4, rtol=0)
    torch.testing.assert_close(out[1], torch.tensor([0.0, 0.576], dtype=D), atol=5e-4, rtol=0)


def test_self_attention_with_identity_projections_is_step_1():
    # Queries and keys of d^(1/4) x, values x: the 1/sqrt(d) scale cancels, and step 2 is step 1.
    d = 4
    attn = SelfAttention(d, d).double()
    with torch.no_grad():
        attn.W_query.weight.copy_(torch.eye(d) * d**0.25)
        attn.W_key.weight.copy_(torch.eye(d) * d**0.25)
        attn.W_value.weight.copy_(torch.eye(d))
    x = torch.randn(2, 6, d, dtype=D)
    torch.testing.assert_close(attn(x), dot_product_attention(x))


def test_causal_attention_is_self_attention_over_the_prefix():
    # Position t under the mask sees exactly what unmasked attention sees when the input stops at t.
    plain = SelfAttention(8, 6, qkv_bias=True).double()
    causal = CausalAttention(8, 6, context_length=10, qkv_bias=True).double()
    causal.load_state_dict(plain.state_dict())  # the mask is a buffer, not in the state dict
    x = torch.randn(3, 10, 8, dtype=D)
    out = causal(x)  # (3, 10, 6)
    for t in range(10):
        torch.testing.assert_close(out[:, t], plain(x[:, : t + 1])[:, -1])
    # The last position sees everything: there, masked and unmasked attention agree.
    torch.testing.assert_close(out[:, -1], plain(x)[:, -1])


def test_masking_before_the_softmax_is_zeroing_after_it_and_renormalising():
    attn = CausalAttention(8, 8, context_length=7).double()
    q, k = torch.randn(2, 7, 8, dtype=D), torch.randn(2, 7, 8, dtype=D)
    unmasked = SelfAttention.weights(attn, q, k)  # step 2's weights, every position visible
    below = unmasked * torch.ones(7, 7, dtype=D).tril()  # keep the past and the present
    torch.testing.assert_close(attn.weights(q, k), below / below.sum(-1, keepdim=True))


def test_the_mask_is_a_buffer_it_moves_with_the_module_and_is_not_saved():
    attn = CausalAttention(4, 4, context_length=5)
    assert "mask" in dict(attn.named_buffers()) and "mask" not in attn.state_dict()
    assert all(name != "mask" for name, _ in attn.named_parameters())  # the optimizer never sees it
    assert attn.double().mask.dtype == torch.bool  # .double() converts floats; a bool mask stays
    assert attn.to("meta").mask.device.type == "meta"  # .to(device) takes it along


def test_dropout_zeroes_a_fraction_p_scales_the_rest_and_eval_turns_it_off():
    p = 0.3
    attn = CausalAttention(16, 16, context_length=64, drop_rate=p).double()
    q, k = torch.randn(16, 64, 16, dtype=D), torch.randn(16, 64, 16, dtype=D)
    attn.eval()
    clean = attn.weights(q, k)  # (16, 64, 64)
    torch.testing.assert_close(attn.weights(q, k), clean, rtol=0, atol=0)  # eval: no randomness
    visible = clean > 0  # the causal half; the masked half stays zero either way
    attn.train()
    dropped = attn.weights(q, k)
    zeroed = (dropped == 0) & visible
    assert zeroed.sum().item() / visible.sum().item() == pytest.approx(p, abs=0.01)
    kept = (dropped != 0) & visible
    torch.testing.assert_close(dropped[kept], clean[kept] / (1 - p))  # survivors scaled by 1/(1-p)
    assert (dropped[~visible] == 0).all()
    # The scaling keeps every weight's expected value: the mean over many draws is the clean weight.
    draws = 20_000
    q1, k1 = q[:1, :8].expand(draws, 8, 16), k[:1, :8].expand(draws, 8, 16)
    mean = attn.weights(q1, k1).mean(0)  # (8, 8), each the average of 20,000 dropout draws
    torch.testing.assert_close(mean, clean[0, :8, :8], rtol=0, atol=0.02)


def test_causal_attention_in_eval_mode_is_causal_attention_without_dropout():
    with_dropout = CausalAttention(8, 8, context_length=12, drop_rate=0.5).double().eval()
    without = CausalAttention(8, 8, context_length=12, drop_rate=0.0).double()
    without.load_state_dict(with_dropout.state_dict())
    x = torch.randn(2, 12, 8, dtype=D)
    torch.testing.assert_close(with_dropout(x), without(x))
    assert not torch.equal(with_dropout.train()(x), without(x))


def test_one_head_wrapper_is_causal_attention():
    wrapper = MultiHeadAttentionWrapper(8, 6, context_length=10, n_heads=1).double()
    head = CausalAttention(8, 6, context_length=10).double()
    head.load_state_dict(wrapper.heads[0].state_dict())
    x = torch.randn(2, 10, 8, dtype=D)
    torch.testing.assert_close(wrapper(x), head(x))


def split_into(mha: MultiHeadAttention, wrapper: MultiHeadAttentionWrapper) -> None:
    """Copy head h's projections into rows h * hd .. (h + 1) * hd of the one big projection each."""
    hd = mha.head_dim
    with torch.no_grad():
        for h, head in enumerate(wrapper.heads):
            for name in ("W_query", "W_key", "W_value"):
                big, small = getattr(mha, name), getattr(head, name)
                big.weight[h * hd : (h + 1) * hd] = small.weight  # (hd, d_in) of (d_out, d_in)
                if small.bias is not None:
                    big.bias[h * hd : (h + 1) * hd] = small.bias


@pytest.mark.parametrize("attn_impl", ["eager", "sdpa"])
def test_stacked_heads_equal_the_weight_split(attn_impl):
    d_in, d_out, T, H = 12, 16, 9, 4
    wrapper = MultiHeadAttentionWrapper(d_in, d_out, T, H, qkv_bias=True).double()
    mha = MultiHeadAttention(d_in, d_out, T, H, qkv_bias=True, attn_impl=attn_impl).double()
    split_into(mha, wrapper)
    x = torch.randn(3, T, d_in, dtype=D)
    # With its output projection, the split is the stack followed by one mixing layer...
    torch.testing.assert_close(mha(x), mha.out_proj(wrapper(x)))
    # ...and with the identity there, the split alone is exactly the stack.
    with torch.no_grad():
        mha.out_proj.weight.copy_(torch.eye(d_out))
        mha.out_proj.bias.zero_()
    torch.testing.assert_close(mha(x), wrapper(x))


def test_the_split_is_one_matrix_product_where_the_stack_is_n_heads():
    wrapper = MultiHeadAttentionWrapper(32, 32, 16, n_heads=4)
    mha = MultiHeadAttention(32, 32, 16, n_heads=4)
    linears = [m for m in wrapper.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 3 * 4  # three projections per head
    assert [tuple(m.weight.shape) for m in linears[:3]] == [(8, 32)] * 3
    projections = [mha.W_query, mha.W_key, mha.W_value]
    assert [tuple(m.weight.shape) for m in projections] == [(32, 32)] * 3
    # Same number of projection weights either way; the split adds only the output projection.
    in_wrapper = sum(p.numel() for p in wrapper.parameters())
    assert sum(p.numel() for p in mha.parameters()) == in_wrapper + 32 * 32 + 32


def test_view_splits_in_place_transpose_strides_and_reshape_after_it_copies():
    B, T, H, hd = 2, 3, 4, 5
    x = torch.randn(B, T, H * hd)  # a projection's output
    heads = x.view(B, T, H, hd)  # the same memory, read with a new shape
    assert heads.data_ptr() == x.data_ptr()
    moved = heads.transpose(1, 2)  # (B, H, T, hd): still the same memory, other strides
    assert moved.data_ptr() == x.data_ptr() and not moved.is_contiguous()
    # The attention core returns a fresh, contiguous (B, H, T, hd); moving heads back behind time
    # gives a strided (B, T, H, hd) whose H and hd are no longer neighbours in memory.
    context = torch.randn(B, H, T, hd).transpose(1, 2)
    with pytest.raises(RuntimeError, match="view"):
        context.view(B, T, H * hd)  # view never copies, so it refuses
    merged = context.reshape(B, T, H * hd)  # reshape copies when it must
    assert merged.data_ptr() != context.data_ptr() and merged.is_contiguous()
    torch.testing.assert_close(merged, context.contiguous().view(B, T, H * hd))
