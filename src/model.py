"""The GPT model: a stack of identical transformer blocks between an embedding and an output head.

Token ids go in, one row of next-token logits per position comes out:

    ids (B, T) -> token embedding + position embedding -> n_layers x TransformerBlock
               -> final LayerNorm -> linear head -> logits (B, T, vocab_size)

Every block is *pre-LN*, as in GPT-2: normalise, transform, then add the result back onto the
residual stream ``x``. The residual stream carries information straight from the input to the
output, so gradients reach the first layers even in a deep stack, and LayerNorm keeps each sub-layer's
input at a scale it can handle.

The configuration uses the book's names, and the presets reproduce GPT-2's four sizes plus small
models that train in minutes on a laptop CPU.

Every field after ``tie_weights`` is a switch from GPT-2 towards the Llama-style block of today's
models (RMSNorm, rotary positions, SwiGLU, grouped-query attention, QK-norm, no biases); each
defaults to GPT-2's behaviour, so a config that does not name them is GPT-2's. The presets include
the shapes of three published models of that kind, and ``cpu-llama``, the CPU preset with every
switch on.
"""

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from src.attention import ATTN_IMPLS, KVCache, MultiHeadAttention, RMSNorm
from src.errors import UserError

NORMS, POS_EMBS, FFS = ("layernorm", "rmsnorm"), ("learned", "rope"), ("gelu", "swiglu")


# --8<-- [start:config]
@dataclass(frozen=True)
class GPTConfig:
    """Everything that determines the model's shape and behaviour."""

    vocab_size: int = 50257  # number of distinct token ids (GPT-2's BPE has 50,257)
    context_length: int = 1024  # the longest sequence the position embedding covers
    emb_dim: int = 768  # width of the residual stream
    n_heads: int = 12  # attention heads per block; emb_dim must be divisible by it
    n_layers: int = 12  # transformer blocks
    drop_rate: float = 0.1  # dropout on embeddings, attention weights and residual branches
    qkv_bias: bool = False  # biases on the query/key/value projections (GPT-2 has them)
    attn_impl: str = "eager"  # "eager" | "fused" | "sdpa" | "flash" (see src/attention.py)
    tie_weights: bool = False  # share the token embedding with the output head (GPT-2 does)
    # The modern switches (see the chapter "From GPT-2 to a modern LLM"); defaults are GPT-2's.
    norm: str = "layernorm"  # "layernorm" | "rmsnorm"
    norm_eps: float = 1e-5  # added to the variance (LayerNorm) or the mean square (RMSNorm)
    pos_emb: str = "learned"  # "learned": a vector per position | "rope": rotary, in attention
    rope_theta: float = 10000.0  # the base of the rotary angles (used with pos_emb="rope")
    ff: str = "gelu"  # "gelu": GPT-2's MLP | "swiglu": the gated MLP of Llama
    ff_hidden_dim: int | None = None  # None: 4 x emb_dim (GELU), or 8/3 x emb_dim (SwiGLU)
    n_kv_heads: int | None = None  # key/value heads; None: n_heads; 1: multi-query attention
    head_dim: int | None = None  # None: emb_dim // n_heads (Qwen3 uses a wider one)
    qk_norm: bool = False  # RMS-normalise each head's query and key (Qwen3)
    bias: bool = True  # biases on the attention output and the feed-forward layers (GPT-2 has them)
    # LayerNorm and GELU as one PyTorch kernel each (F.layer_norm, F.gelu): the same functions as
    # the written-out layers below, computed in one pass instead of one per operation.
    fused_layers: bool = False

    def __post_init__(self):
        """A shape that cannot be built is refused here, the one place that knows the fields."""
        sizes = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers")
        optional = ("ff_hidden_dim", "n_kv_heads", "head_dim")
        for name in sizes + optional:
            value = getattr(self, name)
            if value is None and name in optional:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"{name} must be a positive integer, got {value!r}")
        if self.head_dim is None and self.emb_dim % self.n_heads != 0:
            raise UserError(
                f"emb_dim ({self.emb_dim}) must be divisible by n_heads ({self.n_heads})"
            )
        if self.n_heads % (self.n_kv_heads or self.n_heads) != 0:
            raise UserError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads "
                            f"({self.n_kv_heads})")  # fmt: skip
        for name, allowed in (("attn_impl", ATTN_IMPLS), ("norm", NORMS), ("pos_emb", POS_EMBS),
                              ("ff", FFS)):  # fmt: skip
            if getattr(self, name) not in allowed:
                raise UserError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not (isinstance(self.drop_rate, (int, float)) and 0.0 <= self.drop_rate < 1.0):
            raise UserError(f"drop_rate must be in [0, 1), got {self.drop_rate!r}")
        for name in ("norm_eps", "rope_theta"):
            if not (isinstance(getattr(self, name), (int, float)) and getattr(self, name) > 0):
                raise UserError(f"{name} must be a positive number, got {getattr(self, name)!r}")
        if self.pos_emb == "rope" and self.head_size % 2:
            raise UserError(f"rotary embeddings need an even head size, got {self.head_size}")

    @property
    def head_size(self) -> int:
        """The width of one attention head."""
        return self.head_dim or self.emb_dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        """The number of key/value heads."""
        return self.n_kv_heads or self.n_heads

    @property
    def ff_width(self) -> int:
        """The feed-forward layer's hidden width. SwiGLU has three matrices where GELU's MLP has
        two, so its default width is 2/3 of 4 x emb_dim, rounded up to a multiple of 64 as Llama
        rounds it: about the parameters and FLOPs of GPT-2's MLP."""
        if self.ff_hidden_dim is not None:
            return self.ff_hidden_dim
        if self.ff == "gelu":
            return 4 * self.emb_dim
        return 64 * math.ceil((8 * self.emb_dim // 3) / 64)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "GPTConfig":
        """A named preset, with any field overridden: ``GPTConfig.from_preset("gpt2-small", drop_rate=0)``."""
        if name not in PRESETS:
            raise UserError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
        return replace(PRESETS[name], **overrides)

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, GPTConfig] = {
    # GPT-2's four sizes (Radford et al., 2019), with the book's defaults for training from scratch.
    "gpt2-small": GPTConfig(emb_dim=768, n_heads=12, n_layers=12),  # 124M with tied weights
    "gpt2-medium": GPTConfig(emb_dim=1024, n_heads=16, n_layers=24),  # 355M
    "gpt2-large": GPTConfig(emb_dim=1280, n_heads=20, n_layers=36),  # 774M
    "gpt2-xl": GPTConfig(emb_dim=1600, n_heads=25, n_layers=48),  # 1558M
    # Small models for a laptop CPU. vocab_size is set from the tokenizer when training.
    "cpu-small": GPTConfig(
        vocab_size=8192, context_length=256, emb_dim=256, n_heads=4, n_layers=4, drop_rate=0.0
    ),
    "cpu-tiny": GPTConfig(
        vocab_size=1024, context_length=64, emb_dim=64, n_heads=2, n_layers=2, drop_rate=0.0
    ),
    # The draft of cpu-small for speculative decoding: cpu-tiny's width and depth, with cpu-small's
    # vocabulary (the same tokenizer) and context (it reads as far back as the model it drafts for).
    "cpu-draft": GPTConfig(
        vocab_size=8192, context_length=256, emb_dim=64, n_heads=2, n_layers=2, drop_rate=0.0
    ),
}
# --8<-- [end:config]

# --8<-- [start:modern_presets]
# Every switch on: cpu-small's size (7.1 M parameters against 7.4 M) in the Llama style.
LLAMA_STYLE = dict(norm="rmsnorm", pos_emb="rope", ff="swiglu", qk_norm=True, bias=False)
PRESETS["cpu-llama"] = replace(PRESETS["cpu-small"], **LLAMA_STYLE, n_kv_heads=2, norm_eps=1e-6)
# The shapes of three published models (from their config.json), to train from scratch or to
# carry the weights src.llama loads. context_length is their max_position_embeddings: with
# rotary positions no table is sized by it.
PRESETS |= {
    "smollm2-135m": GPTConfig(  # HuggingFaceTB/SmolLM2-135M
        vocab_size=49152, context_length=8192, emb_dim=576, n_heads=9, n_kv_heads=3,
        n_layers=30, ff_hidden_dim=1536, rope_theta=100000.0, tie_weights=True, drop_rate=0.0,
        norm="rmsnorm", norm_eps=1e-5, pos_emb="rope", ff="swiglu", bias=False,
    ),
    "qwen2.5-0.5b": GPTConfig(  # Qwen/Qwen2.5-0.5B: biases on q, k and v only
        vocab_size=151936, context_length=32768, emb_dim=896, n_heads=14, n_kv_heads=2,
        n_layers=24, ff_hidden_dim=4864, rope_theta=1000000.0, tie_weights=True, drop_rate=0.0,
        norm="rmsnorm", norm_eps=1e-6, pos_emb="rope", ff="swiglu", bias=False, qkv_bias=True,
    ),
    "qwen3-0.6b": GPTConfig(  # Qwen/Qwen3-0.6B: QK-norm, heads of 128 on a width of 1024
        vocab_size=151936, context_length=40960, emb_dim=1024, n_heads=16, n_kv_heads=8,
        head_dim=128, n_layers=28, ff_hidden_dim=3072, rope_theta=1000000.0, tie_weights=True,
        drop_rate=0.0, norm="rmsnorm", norm_eps=1e-6, pos_emb="rope", ff="swiglu", bias=False,
        qk_norm=True,
    ),
}  # fmt: skip
# --8<-- [end:modern_presets]


# --8<-- [start:layernorm]
class LayerNorm(nn.Module):
    """Normalise each vector to zero mean and unit variance, then scale and shift it (learned)."""

    def __init__(self, emb_dim: int, eps: float = 1e-5, fused: bool = False):
        super().__init__()
        self.eps = eps  # keeps the division finite when a vector is constant
        self.fused = fused  # one PyTorch kernel for the same function
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return F.layer_norm(x, self.scale.shape, self.scale, self.shift, self.eps)
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True, unbiased=False)  # biased, as GPT-2 and nn.LayerNorm
        return self.scale * (x - mean) / torch.sqrt(var + self.eps) + self.shift


# --8<-- [end:layernorm]


# --8<-- [start:make_norm]
def make_norm(cfg: GPTConfig) -> nn.Module:
    """The normalisation the config names, over ``emb_dim`` (RMSNorm is in ``src/attention.py``)."""
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.emb_dim, cfg.norm_eps)
    return LayerNorm(cfg.emb_dim, cfg.norm_eps, fused=cfg.fused_layers)


# --8<-- [end:make_norm]


# --8<-- [start:gelu]
class GELU(nn.Module):
    """GELU, x * Phi(x), with the tanh approximation that GPT-2 was trained with."""

    def __init__(self, fused: bool = False):
        super().__init__()
        self.fused = fused  # one PyTorch kernel for the same approximation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return F.gelu(x, approximate="tanh")
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


# --8<-- [end:gelu]


# --8<-- [start:feedforward]
class FeedForward(nn.Module):
    """Position-wise MLP: widen to 4 x emb_dim, apply GELU, project back."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.emb_dim, cfg.ff_width, bias=cfg.bias)  # widen
        self.gelu = GELU(fused=cfg.fused_layers)
        self.proj = nn.Linear(
            cfg.ff_width, cfg.emb_dim, bias=cfg.bias
        )  # back to the residual stream

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.gelu(self.fc(x)))  # (B, T, emb_dim) -> (B, T, emb_dim)


# --8<-- [end:feedforward]


# --8<-- [start:swiglu]
class SwiGLU(nn.Module):
    """The gated MLP of Llama (Shazeer, 2020): one widened copy of x, passed through SiLU, decides
    how much of another copy passes, element by element; then project back.

    SiLU(z) = z * sigmoid(z) is GELU's smooth cousin. The names are GPT-2's MLP's plus one:
    ``fc`` widens (Hugging Face's ``up_proj``), ``gate`` is the new gate (``gate_proj``), ``proj``
    projects back (``down_proj``).
    """

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.emb_dim, cfg.ff_width, bias=cfg.bias)
        self.fc = nn.Linear(cfg.emb_dim, cfg.ff_width, bias=cfg.bias)
        self.proj = nn.Linear(cfg.ff_width, cfg.emb_dim, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gate(x)  # (B, T, ff_width)
        return self.proj(g * torch.sigmoid(g) * self.fc(x))  # W_down (SiLU(x W_gate) * x W_up)


# --8<-- [end:swiglu]


# --8<-- [start:block]
class TransformerBlock(nn.Module):
    """Pre-LN block: x + attention(norm(x)), then x + feedforward(norm(x))."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.att = MultiHeadAttention(
            d_in=cfg.emb_dim,
            d_out=cfg.emb_dim,
            context_length=cfg.context_length,
            n_heads=cfg.n_heads,
            drop_rate=cfg.drop_rate,
            qkv_bias=cfg.qkv_bias,
            attn_impl=cfg.attn_impl,
            n_kv_heads=cfg.n_kv_heads,
            head_dim=cfg.head_dim,
            out_bias=cfg.bias,
            rope_theta=cfg.rope_theta if cfg.pos_emb == "rope" else None,
            qk_norm=cfg.qk_norm,
            norm_eps=cfg.norm_eps,
        )
        self.ff = SwiGLU(cfg) if cfg.ff == "swiglu" else FeedForward(cfg)
        self.norm1 = make_norm(cfg)
        self.norm2 = make_norm(cfg)
        self.drop_shortcut = nn.Dropout(cfg.drop_rate)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        # (B, T, emb_dim) -> (B, T, emb_dim)
        x = x + self.drop_shortcut(self.att(self.norm1(x), kv_cache))
        x = x + self.drop_shortcut(self.ff(self.norm2(x)))
        return x


# --8<-- [end:block]


# --8<-- [start:model]
class GPTModel(nn.Module):
    """Token ids (B, T) -> next-token logits (B, T, vocab_size)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        # Rotary positions live in attention: then there is no table of positions to learn.
        self.pos_emb = (
            nn.Embedding(cfg.context_length, cfg.emb_dim) if cfg.pos_emb == "learned" else None
        )
        self.drop_emb = nn.Dropout(cfg.drop_rate)
        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg) for _ in range(cfg.n_layers)])
        self.final_norm = make_norm(cfg)
        self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)
        if cfg.tie_weights:
            # One matrix both reads tokens in and scores tokens out: saves vocab_size x emb_dim.
            self.out_head.weight = self.tok_emb.weight

    def forward(self, idx: torch.Tensor, kv_cache: list[KVCache] | None = None) -> torch.Tensor:
        """With ``kv_cache`` (one ``KVCache`` per block), ``idx`` continues the tokens already
        cached: its positions count on from the cache's length (in each row, from its first real
        token when the cache records left padding)."""
        B, T = idx.shape
        start = 0 if kv_cache is None else kv_cache[0].length
        if start + T > self.cfg.context_length:
            raise ValueError(
                f"sequence length {start + T} exceeds context_length {self.cfg.context_length}"
            )
        x = self.tok_emb(idx)  # (B, T, emb_dim)
        if self.pos_emb is not None:
            positions = (
                torch.arange(T, device=idx.device)
                if kv_cache is None
                else kv_cache[0].positions(T, idx.device)  # (T,), or (B, T) for padded rows
            )
            x = x + self.pos_emb(positions)
        x = self.drop_emb(x)
        for i, block in enumerate(self.trf_blocks):
            x = block(x, None if kv_cache is None else kv_cache[i])  # (B, T, emb_dim)
        x = self.final_norm(x)
        return self.out_head(x)  # (B, T, vocab_size)

    # --8<-- [end:model]

    # --8<-- [start:init]
    def _init_weights(self, module: nn.Module) -> None:
        """GPT-2's initialisation: N(0, 0.02) weights and zero biases; the two projections in each
        block that write into the residual stream get std 0.02 / sqrt(2 n_layers), so the stream's
        variance does not grow with depth. (``apply`` visits a block after its children, so the
        block's rule overrides the generic Linear one.)"""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, TransformerBlock):
            residual_std = 0.02 / math.sqrt(2 * self.cfg.n_layers)
            for proj in (module.att.out_proj, module.ff.proj):
                nn.init.normal_(proj.weight, mean=0.0, std=residual_std)

    # --8<-- [end:init]


# --8<-- [start:count]
def count_parameters(model: nn.Module) -> int:
    """Trainable parameters, each shared tensor counted once (tied weights count once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --8<-- [end:count]


# --8<-- [start:kv_bytes]
def kv_cache_bytes(cfg: GPTConfig, n_tokens: int, bytes_per_value: int = 2) -> int:
    """The memory a KV cache takes for ``n_tokens`` tokens of one sequence: a key and a value of
    ``head_size`` numbers per key/value head, per layer, per token (2 bytes each in bf16)."""
    return 2 * cfg.n_layers * cfg.kv_heads * cfg.head_size * n_tokens * bytes_per_value


# --8<-- [end:kv_bytes]
