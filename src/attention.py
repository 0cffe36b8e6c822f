"""Causal multi-head self-attention: how each token gathers information from the tokens before it.

A language model predicts the next token from the ones before it, so token ``t`` may look at tokens
``0..t`` and never at the future. Self-attention lets every position build its output as a weighted
average of the *values* of the earlier positions, with weights that it computes from how well its
*query* matches their *keys*:

    attention(Q, K, V) = softmax(mask(Q K^T / sqrt(head_dim))) V

Multi-head attention runs ``n_heads`` such averages side by side on slices of the embedding, so that
different heads can attend to different things, then mixes them with an output projection.

The middle step, scale + causal mask + softmax, can be computed four ways, chosen by ``attn_impl``:

- ``"eager"``: the plain PyTorch reference, written out step by step. It materialises the
  ``(B, H, T, T)`` score matrix several times, which makes it memory-bound.
- ``"fused"``: our own kernel (``src/fused_softmax.py``), one pass per row over the causal prefix;
  if it cannot be built, a warning says why and the plain path runs instead.
- ``"sdpa"``: PyTorch's ``scaled_dot_product_attention``, which picks a fused kernel when it can.
- ``"flash"``: our own fused attention (``src/flash_attention.py``): the whole core in one kernel,
  tiled, with no ``(T, T)`` tensor. It has no dropout: with attention dropout on, or if it cannot
  be built, a warning says so once and SDPA runs instead.

Before ``MultiHeadAttention``, the module builds it up in five steps, each adding one idea to the one
before: dot products of the raw vectors, trainable projections, the causal mask, dropout on the
weights, and several heads side by side. Given the same weights, each step computes what the next
one computes (``tests/test_attention_steps.py``).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from src import flash_attention, fused_softmax

ATTN_IMPLS = ("eager", "fused", "sdpa", "flash")


# --8<-- [start:dot_product]
def dot_product_attention(x: torch.Tensor) -> torch.Tensor:
    """Step 1: each position's output is an average of all the inputs, weighted by similarity.

    No parameters yet: a token's vector serves as its query, its key and its value. A dot product is
    large when two vectors point the same way, zero when they are orthogonal and negative when they
    point apart; the softmax turns each row of scores into positive weights that sum to one.
    """
    scores = x @ x.transpose(-2, -1)  # (..., T, T): scores[i, j] = x_i . x_j
    weights = torch.softmax(scores, dim=-1)  # (..., T, T), every row sums to 1
    return weights @ x  # (..., T, d): row i is sum_j weights[i, j] * x_j


# --8<-- [end:dot_product]


# --8<-- [start:self_attention]
class SelfAttention(nn.Module):
    """Step 2: trainable queries, keys and values, and the 1/sqrt(d) scale.

    Three linear maps let a token ask for one thing (query), advertise another (key) and hand over a
    third (value), where step 1 could only match a vector against itself. The cost: three
    ``d_in x d_out`` matrices, and every token's output now depends on what training puts in them.
    """

    def __init__(self, d_in: int, d_out: int, qkv_bias: bool = False):
        super().__init__()
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.W_query(x), self.W_key(x), self.W_value(x)  # (B, T, d_out) each
        return self.weights(q, k) @ v  # (B, T, T) @ (B, T, d_out) -> (B, T, d_out)

    def weights(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """softmax(q k^T / sqrt(d_out)): the scale keeps the scores' spread independent of width."""
        scores = q @ k.transpose(-2, -1)  # (B, T, T)
        return torch.softmax(scores / math.sqrt(k.shape[-1]), dim=-1)


# --8<-- [end:self_attention]


# --8<-- [start:causal_attention]
class CausalAttention(SelfAttention):
    """Steps 3 and 4: hide the future with the causal mask, then drop attention weights in training.

    The mask makes position ``t`` see only positions ``0..t``, so a model trained on whole sequences
    never reads the token it must predict. Dropout zeroes each weight with probability ``drop_rate``
    and scales the survivors by ``1 / (1 - drop_rate)``, so the expected weight is unchanged and
    ``eval()``, which turns dropout off, sees the averages the training saw.
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        context_length: int,
        drop_rate: float = 0.0,
        qkv_bias: bool = False,
    ):
        super().__init__(d_in, d_out, qkv_bias)
        self.dropout = nn.Dropout(drop_rate)
        # A buffer moves with the module (.to(device)) but is not a trained parameter, and is not
        # saved in checkpoints.
        self.register_buffer("mask", causal_mask(context_length), persistent=False)

    def weights(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        T = q.shape[-2]
        scale = 1.0 / math.sqrt(k.shape[-1])
        weights = causal_softmax(q @ k.transpose(-2, -1), scale, self.mask[:T, :T])  # (B, T, T)
        return self.dropout(weights)  # in training only: zero some, scale up the rest


# --8<-- [end:causal_attention]


# --8<-- [start:wrapper]
class MultiHeadAttentionWrapper(nn.Module):
    """Step 5: ``n_heads`` independent causal heads, each ``d_out / n_heads`` wide, side by side.

    One softmax average can only take one mixture of the past; several heads take several, each with
    its own projections. The cost: ``n_heads`` small matrix products per projection where one large
    one would do, which step 6 (``MultiHeadAttention``) removes.
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        context_length: int,
        n_heads: int,
        drop_rate: float = 0.0,
        qkv_bias: bool = False,
    ):
        super().__init__()
        if d_out % n_heads != 0:
            raise ValueError(f"d_out ({d_out}) must be divisible by n_heads ({n_heads})")
        head = (d_in, d_out // n_heads, context_length, drop_rate, qkv_bias)
        self.heads = nn.ModuleList([CausalAttention(*head) for _ in range(n_heads)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # n_heads outputs of (B, T, hd), put side by side along the last dimension: (B, T, d_out)
        return torch.cat([head(x) for head in self.heads], dim=-1)


# --8<-- [end:wrapper]


# --8<-- [start:mha]
class MultiHeadAttention(nn.Module):
    """Causal multi-head self-attention over a sequence of ``d_in``-dimensional vectors."""

    def __init__(
        self,
        d_in: int,
        d_out: int,
        context_length: int,
        n_heads: int,
        drop_rate: float = 0.0,
        qkv_bias: bool = False,
        attn_impl: str = "eager",
    ):
        super().__init__()
        if d_out % n_heads != 0:
            raise ValueError(f"d_out ({d_out}) must be divisible by n_heads ({n_heads})")
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}")
        self.d_out = d_out
        self.n_heads = n_heads
        self.head_dim = d_out // n_heads
        self.drop_rate = drop_rate
        self.attn_impl = attn_impl
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(drop_rate)
        # A buffer moves with the module (.to(device)) but is not a trained parameter, and is not
        # saved in checkpoints.
        self.register_buffer("mask", causal_mask(context_length), persistent=False)

    def forward(self, x: torch.Tensor, kv_cache: "KVCache | None" = None) -> torch.Tensor:
        B, T, _ = x.shape  # (B, T, d_in)
        # Project, then split the last dimension into heads and move heads before time.
        q = self.W_query(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.W_key(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        v = self.W_value(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        if kv_cache is None:
            context = self.attend(q, k, v)  # (B, H, T, hd)
        else:
            start = kv_cache.length  # tokens already in the cache come before these T
            k, v = kv_cache.append(k, v)  # (B, H, start + T, hd)
            context = attend_cached(q, k, v, self.mask[start : start + T, : start + T])
        # Put the heads side by side again and mix them.
        context = context.transpose(1, 2).reshape(B, T, self.d_out)  # (B, T, d_out)
        return self.out_proj(context)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The attention core: causal softmax(q k^T / sqrt(head_dim)) v, by ``attn_impl``."""
        drop = self.drop_rate if self.training else 0.0
        scale = 1.0 / math.sqrt(self.head_dim)
        if self.attn_impl == "flash" and flash_attention.runs(drop):
            return flash_attention.flash_causal_attention(q, k, v, scale)  # (B, H, T, hd)
        if self.attn_impl in ("sdpa", "flash"):  # flash: with dropout or no kernel, warned once
            return F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=True)
        T = q.shape[-2]
        scores = q @ k.transpose(-2, -1)  # (B, H, T, T)
        if self.attn_impl == "fused" and fused_softmax.is_available():
            weights = fused_softmax.fused_causal_softmax(scores, scale)  # (B, H, T, T)
        else:
            weights = causal_softmax(scores, scale, self.mask[:T, :T])  # (B, H, T, T)
        weights = self.dropout(weights)
        return weights @ v  # (B, H, T, hd)


# --8<-- [end:mha]


# --8<-- [start:kv_cache]
class KVCache:
    """The keys and values one attention layer has computed so far during generation.

    A token's key and value depend only on the tokens up to it, so they never change once computed.
    Keeping them lets each new token cost one row of attention instead of re-running the prefix.
    """

    def __init__(self):
        self.k: torch.Tensor | None = None  # (B, H, length, hd)
        self.v: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the new positions' keys and values; return all of them."""
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v


def attend_cached(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Attention of ``T`` new queries over ``start + T`` cached keys, in inference mode.

    ``mask`` is the causal mask's rows ``start..start+T-1``: query ``i`` sits at position
    ``start + i`` and sees every key up to it. The core is the plain reference, so cached decoding
    computes exactly what the eager path computes.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    weights = causal_softmax(q @ k.transpose(-2, -1), scale, mask)  # (B, H, T, start + T)
    return weights @ v  # (B, H, T, hd)


# --8<-- [end:kv_cache]


# --8<-- [start:causal_softmax]
def causal_mask(T: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(T, T), True above the diagonal: the future positions that query ``i`` must not see."""
    return torch.ones(T, T, dtype=torch.bool, device=device).triu(diagonal=1)


def causal_softmax(scores: torch.Tensor, scale: float, mask: torch.Tensor) -> torch.Tensor:
    """The plain reference: scale, hide the future with -inf, softmax over each row.

    Each of the three steps reads and writes a full ``(..., T, T)`` tensor. With ``exp(-inf) = 0``
    the masked positions get exactly zero weight, and the rows still sum to one.
    """
    scores = scores * scale
    scores = scores.masked_fill(mask, float("-inf"))
    return torch.softmax(scores, dim=-1)


# --8<-- [end:causal_softmax]
