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

Three later ideas change what goes into that core, not the core itself; each is off by default, so
the layer is GPT-2's unless asked (the chapter "From GPT-2 to a modern LLM" explains them):

- **grouped-query attention**: ``n_kv_heads < n_heads`` key/value heads, each shared by a group of
  query heads, so the KV cache holds fewer of them (``n_kv_heads=1`` is multi-query attention);
- **rotary position embeddings** (``rope_theta``): q and k are rotated by an angle proportional to
  their position, so that ``q . k`` depends on how far apart two tokens are;
- **QK-norm** (``qk_norm``): each head's query and key are RMS-normalised before the product, which
  bounds the scores.
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
    """Causal multi-head self-attention over a sequence of ``d_in``-dimensional vectors.

    The arguments after ``attn_impl`` are the modern switches; their defaults give GPT-2's layer.
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        context_length: int,
        n_heads: int,
        drop_rate: float = 0.0,
        qkv_bias: bool = False,
        attn_impl: str = "eager",
        n_kv_heads: int | None = None,  # key/value heads; n_heads when not given
        head_dim: int | None = None,  # d_out // n_heads when not given
        out_bias: bool = True,  # a bias on out_proj
        rope_theta: float | None = None,  # rotary position embedding with this base, or none
        qk_norm: bool = False,  # RMS-normalise each head's query and key
        norm_eps: float = 1e-6,  # of QK-norm
    ):
        super().__init__()
        n_kv_heads = n_kv_heads or n_heads
        if head_dim is None and d_out % n_heads != 0:
            raise ValueError(f"d_out ({d_out}) must be divisible by n_heads ({n_heads})")
        if n_heads % n_kv_heads != 0:
            raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}")
        self.d_out = d_out
        self.context_length = context_length
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.head_dim = head_dim or d_out // n_heads
        self.drop_rate = drop_rate
        self.attn_impl = attn_impl
        inner = n_heads * self.head_dim  # d_out, unless head_dim says otherwise (Qwen3)
        self.W_query = nn.Linear(d_in, inner, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, n_kv_heads * self.head_dim, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, n_kv_heads * self.head_dim, bias=qkv_bias)
        self.out_proj = nn.Linear(inner, d_out, bias=out_bias)
        self.dropout = nn.Dropout(drop_rate)
        self.q_norm = RMSNorm(self.head_dim, norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, norm_eps) if qk_norm else None
        self.rope = RotaryEmbedding(self.head_dim, rope_theta) if rope_theta else None

    def forward(self, x: torch.Tensor, kv_cache: "KVCache | None" = None) -> torch.Tensor:
        B, T, _ = x.shape  # (B, T, d_in)
        start = 0 if kv_cache is None else kv_cache.length  # tokens cached before these T
        if start + T > self.context_length:
            raise ValueError(
                f"sequence length {start + T} exceeds context_length {self.context_length}"
            )
        H, KV, hd = self.n_heads, self.n_kv_heads, self.head_dim
        # Project, then split the last dimension into heads and move heads before time.
        q = self.W_query(x).view(B, T, H, hd).transpose(1, 2)  # (B, H, T, hd)
        k = self.W_key(x).view(B, T, KV, hd).transpose(1, 2)  # (B, KV, T, hd)
        v = self.W_value(x).view(B, T, KV, hd).transpose(1, 2)  # (B, KV, T, hd)
        if self.q_norm is not None:  # each head's vector, before it is rotated
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None:  # rotated by their positions: start, start + 1, ... in each row
            positions = (
                torch.arange(T, device=x.device)
                if kv_cache is None
                else kv_cache.positions(T, x.device)
            )
            q, k = self.rope(q, positions), self.rope(k, positions)
        if kv_cache is None:
            context = self.attend(q, k, v)  # (B, H, T, hd)
        else:
            # (B, KV, start + T, hd): only the key/value heads, written in place
            k, v = kv_cache.append(k, v, self.context_length)
            context = attend_cached(q, k, v, kv_cache.mask(T))
        # Put the heads side by side again and mix them.
        context = context.transpose(1, 2).reshape(B, T, H * hd)  # (B, T, H * hd)
        return self.out_proj(context)  # (B, T, d_out)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The attention core: causal softmax(q k^T / sqrt(head_dim)) v, by ``attn_impl``.

        q is (B, H, T, hd); k and v are (B, KV, T, hd), each key/value head shared by the
        ``H / KV`` query heads of its group."""
        drop = self.drop_rate if self.training else 0.0
        scale = 1.0 / math.sqrt(self.head_dim)
        if self.attn_impl == "flash" and flash_attention.runs(drop):
            return flash_attention.flash_causal_attention(q, k, v, scale)  # (B, H, T, hd)
        if self.attn_impl in ("sdpa", "flash"):  # flash: with dropout or no kernel, warned once
            return F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=True,
                                                  enable_gqa=self.n_kv_heads != self.n_heads)  # fmt: skip
        T = q.shape[-2]
        scores = grouped_scores(q, k)  # (B, H, T, T)
        if self.attn_impl == "fused" and fused_softmax.is_available():
            weights = fused_softmax.fused_causal_softmax(scores, scale)  # (B, H, T, T)
        else:
            weights = causal_softmax(scores, scale, causal_mask(T, q.device))  # (B, H, T, T)
        weights = self.dropout(weights)
        return grouped_mix(weights, v)  # (B, H, T, hd)


# --8<-- [end:mha]


# --8<-- [start:grouped]
def grouped_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q k^T for every query head, with each key head shared by a group of G query heads.

    Query heads ``g * G .. g * G + G - 1`` form group ``g`` and read key head ``g``. Stacking a
    group's queries along time makes one matrix product per key head: the keys are read as they
    are, never copied G times. With G = 1 this is the plain ``q @ k^T``.
    """
    B, H, T, hd = q.shape
    KV, S = k.shape[1], k.shape[2]  # S: the number of keys (T, or more with a cache)
    q = q.reshape(B, KV, (H // KV) * T, hd)  # (B, KV, G*T, hd): a group's queries, stacked
    return (q @ k.transpose(-2, -1)).view(B, H, T, S)  # (B, KV, G*T, S) -> (B, H, T, S)


def grouped_mix(weights: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """weights @ v, with each value head shared by its group of query heads, as in ``grouped_scores``."""
    B, H, T, S = weights.shape
    KV, hd = v.shape[1], v.shape[3]
    out = weights.reshape(B, KV, (H // KV) * T, S) @ v  # (B, KV, G*T, hd)
    return out.view(B, H, T, hd)


# --8<-- [end:grouped]


# --8<-- [start:rmsnorm]
class RMSNorm(nn.Module):
    """Scale each vector to unit root-mean-square, then by a learned gain: LayerNorm without the
    mean and without the shift (Zhang and Sennrich, 2019).

    It sits here, not beside LayerNorm in ``src/model.py``, because QK-norm inside attention uses
    it too; the model's blocks import it from here.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In float32 even under bf16 autocast: a mean of squares in bf16 loses the small ones.
        x32 = x.float()
        rms_inv = torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)  # 1 / RMS(x)
        return self.scale * (x32 * rms_inv).to(x.dtype)  # g * x / RMS(x)


# --8<-- [end:rmsnorm]


# --8<-- [start:rope]
class RotaryEmbedding(nn.Module):
    """Rotary position embedding (Su et al., 2021): rotate q and k by angles that grow with position.

    A head's ``hd`` dimensions form ``hd / 2`` pairs; pair ``i`` at position ``m`` is rotated by
    the angle ``m * theta_i``, with ``theta_i = base^(-2i / hd)``: fast-turning pairs for
    fine position, slow ones for coarse. A rotation keeps lengths, and the dot product of a query
    rotated by ``m * theta`` with a key rotated by ``n * theta`` depends only on ``m - n``.

    The pairs here are *half-split*, ``(x_i, x_{i + hd/2})``, as Hugging Face's Llama and Qwen
    code has them; the paper and Meta's original Llama code pair neighbours, ``(x_{2i}, x_{2i+1})``
    (*interleaved*). Both are the same rotation with the head's dimensions listed in another order.
    """

    def __init__(self, head_dim: int, base: float):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
        # theta_i = base^(-2i/hd), i = 0 .. hd/2 - 1, computed as Hugging Face computes it.
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        self.register_buffer("inv_freq", 1.0 / (base**exponents), persistent=False)  # (hd/2,)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``x`` (B, heads, T, hd) at ``positions``, (T,) or (B, T) (one row per sequence), rotated."""
        angles = positions.float()[..., None] * self.inv_freq.float()  # (..., T, hd/2): m * theta_i
        angles = torch.cat((angles, angles), dim=-1)  # (..., T, hd): pair i's angle at i, i + hd/2
        if angles.dim() == 3:
            angles = angles[:, None]  # (B, 1, T, hd): the same positions for every head
        return (x * angles.cos() + rotate_half(x) * angles.sin()).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves: each pair (a, b) becomes (-b, a), a quarter turn.
    So x cos + rotate_half(x) sin = (a cos - b sin, b cos + a sin), pair by pair."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


# --8<-- [end:rope]


# --8<-- [start:kv_cache]
class KVCache:
    """The keys and values one attention layer has computed so far during generation.

    A token's key and value depend only on the tokens up to it, so they never change once computed.
    Keeping them lets each new token cost one row of attention instead of re-running the prefix.
    With grouped-query attention only the ``n_kv_heads`` key/value heads are kept.

    The storage is allocated once, at the first write (when the batch size, head size, dtype and
    device are known), for ``max_length`` positions: the layer's context length when not given.
    Each later token is written into its own slot, in place. Growing the tensors with ``torch.cat``
    instead copies every cached position at every step: n steps copy 1 + 2 + ... + n positions.
    A fixed buffer also makes forgetting cheap: ``rewind`` moves the end back, and the next write
    overwrites what was there (speculative decoding rewinds past the draft tokens it rejects).

    Prompts of different lengths run as one batch when each is aligned to the right and padded on
    the left: ``padding[b]`` is how many slots row ``b`` begins with that hold no token. Those slots
    are hidden from every query, and row ``b``'s positions count from its first real token, so each
    row computes what it would compute alone.
    """

    def __init__(self, max_length: int | None = None, padding: torch.Tensor | None = None):
        self.max_length = max_length
        self.padding = padding  # (B,) int64, or None: no row is padded
        self.length = 0  # slots written so far
        # (B, KV, max_length, hd) each, allocated at the first write
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    @property
    def k(self) -> torch.Tensor | None:
        """The keys written so far, (B, KV, length, hd): a view of the buffer, not a copy."""
        return None if self.keys is None else self.keys[:, :, : self.length]

    @property
    def v(self) -> torch.Tensor | None:
        return None if self.values is None else self.values[:, :, : self.length]

    def append(
        self, k: torch.Tensor, v: torch.Tensor, context_length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new positions' keys and values, (B, KV, T, hd), into the next T slots; return
        every key and value written so far, (B, KV, length, hd)."""
        if self.keys is None:
            B, KV, _, hd = k.shape
            shape = (B, KV, self.max_length or context_length, hd)
            self.keys, self.values = k.new_empty(shape), v.new_empty(shape)
        end = self.length + k.shape[2]
        if end > self.keys.shape[2]:
            raise ValueError(f"the cache holds {self.keys.shape[2]} positions; {end} do not fit")
        self.keys[:, :, self.length : end] = k  # in place: nothing already cached moves
        self.values[:, :, self.length : end] = v
        self.length = end
        return self.k, self.v

    def rewind(self, length: int) -> None:
        """Forget every slot from ``length`` on; the next write goes there."""
        self.length = min(self.length, length)

    def positions(self, T: int, device: torch.device) -> torch.Tensor:
        """The positions of the next ``T`` tokens to be written: (T,), or (B, T) when rows are
        padded, each counted from its row's first real token (padding slots get 0)."""
        slots = torch.arange(self.length, self.length + T, device=device)  # (T,)
        if self.padding is None:
            return slots
        return (slots - self.padding.to(device)[:, None]).clamp(min=0)  # (B, T)

    def mask(self, T: int) -> torch.Tensor:
        """True where one of the ``T`` newest queries must not look: (T, length), or
        (B, 1, T, length) when rows are padded. A query never sees a later slot, nor a padding
        slot other than its own (a padding query sees itself, so that its softmax has a term)."""
        device = self.keys.device
        future = causal_mask(T, device, start=self.length - T)  # (T, length)
        if self.padding is None:
            return future
        keys = torch.arange(self.length, device=device)  # (length,): the slots
        queries = keys[self.length - T :, None]  # (T, 1): the newest T slots
        padding = keys < self.padding.to(device)[:, None, None]  # (B, 1, length)
        return (future | (padding & (keys != queries)))[:, None]  # (B, 1, T, length)


def attend_cached(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Attention of ``T`` new queries over ``start + T`` cached keys, in inference mode.

    ``mask`` (from ``KVCache.mask``) hides, for query ``i`` at slot ``start + i``, every later
    slot and the padding. The core is the plain reference, so cached decoding computes exactly
    what the eager path computes.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    weights = causal_softmax(grouped_scores(q, k), scale, mask)  # (B, H, T, start + T)
    return grouped_mix(weights, v)  # (B, H, T, hd)


# --8<-- [end:kv_cache]


# --8<-- [start:causal_softmax]
def causal_mask(T: int, device: torch.device | str | None = None, start: int = 0) -> torch.Tensor:
    """(T, start + T), True where query ``i`` (at position ``start + i``) must not look: the keys
    after it. Built for each call, at the size the scores have, so a long context costs no
    (context_length, context_length) buffer in every layer."""
    return torch.ones(T, start + T, dtype=torch.bool, device=device).triu(diagonal=start + 1)


def causal_softmax(scores: torch.Tensor, scale: float, mask: torch.Tensor) -> torch.Tensor:
    """The plain reference: scale, hide the future with -inf, softmax over each row.

    Each of the three steps reads and writes a full ``(..., T, T)`` tensor. With ``exp(-inf) = 0``
    the masked positions get exactly zero weight, and the rows still sum to one.
    """
    scores = scores * scale
    scores = scores.masked_fill(mask, float("-inf"))
    return torch.softmax(scores, dim=-1)


# --8<-- [end:causal_softmax]
