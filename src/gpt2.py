"""OpenAI's GPT-2 weights in our model.

Our ``GPTModel`` has the same architecture as GPT-2, so its published weights fit it once the names
and layouts are translated. Two layout differences matter:

- GPT-2 was written with a ``Conv1D`` layer that stores its weight as ``(in_features, out_features)``,
  the transpose of ``nn.Linear``'s ``(out_features, in_features)``; every such weight is transposed.
- GPT-2 computes query, key and value with one fused projection ``c_attn`` of width ``3 * emb_dim``;
  ours has three separate projections, so ``c_attn`` is split in three along its output dimension.

The state dict can come from Hugging Face's ``GPT2LMHeadModel`` (keys start with ``transformer.``,
plus ``lm_head.weight``) or ``GPT2Model`` (no prefix, no head; GPT-2 ties the head to the token
embedding, so the embedding serves as the head).
"""

from collections.abc import Callable, Mapping

import torch

from src.model import GPTConfig, GPTModel

# Buffers that some versions of transformers store next to the weights; they hold no learned values.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")


# --8<-- [start:config]
def config_from_hf(hf_config, **overrides) -> GPTConfig:
    """Our config for a Hugging Face ``GPT2Config`` (GPT-2 has qkv biases and a tied head)."""
    if getattr(hf_config, "n_inner", None) not in (None, 4 * hf_config.n_embd):
        raise ValueError(f"n_inner={hf_config.n_inner} is not supported; ours is 4 * n_embd")
    if hf_config.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"activation {hf_config.activation_function!r} is not GELU's tanh form")
    fields = dict(
        vocab_size=hf_config.vocab_size,
        context_length=hf_config.n_positions,
        emb_dim=hf_config.n_embd,
        n_heads=hf_config.n_head,
        n_layers=hf_config.n_layer,
        drop_rate=hf_config.resid_pdrop,
        qkv_bias=True,
        tie_weights=True,
    )
    return GPTConfig(**(fields | overrides))


# --8<-- [end:config]


# --8<-- [start:mapping]
def _gpt2_sources(cfg: GPTConfig) -> dict[str, tuple[str, Callable[[torch.Tensor], torch.Tensor]]]:
    """For each of our parameter names: the GPT-2 key it comes from and how to transform it."""
    E = cfg.emb_dim
    keep = lambda t: t  # noqa: E731
    conv1d = lambda t: t.t()  # noqa: E731  (in, out) -> (out, in)

    def qkv(part: int, is_weight: bool):
        # c_attn holds [query | key | value] along its output dimension.
        if is_weight:
            return lambda t: t[:, part * E : (part + 1) * E].t()
        return lambda t: t[part * E : (part + 1) * E]

    sources = {
        "tok_emb.weight": ("wte.weight", keep),
        "pos_emb.weight": ("wpe.weight", keep),
        "final_norm.scale": ("ln_f.weight", keep),
        "final_norm.shift": ("ln_f.bias", keep),
        "out_head.weight": ("lm_head.weight", keep),
    }
    for i in range(cfg.n_layers):
        ours, theirs = f"trf_blocks.{i}", f"h.{i}"
        for j, name in enumerate(("W_query", "W_key", "W_value")):
            sources[f"{ours}.att.{name}.weight"] = (f"{theirs}.attn.c_attn.weight", qkv(j, True))
            sources[f"{ours}.att.{name}.bias"] = (f"{theirs}.attn.c_attn.bias", qkv(j, False))
        sources |= {
            f"{ours}.att.out_proj.weight": (f"{theirs}.attn.c_proj.weight", conv1d),
            f"{ours}.att.out_proj.bias": (f"{theirs}.attn.c_proj.bias", keep),
            f"{ours}.norm1.scale": (f"{theirs}.ln_1.weight", keep),
            f"{ours}.norm1.shift": (f"{theirs}.ln_1.bias", keep),
            f"{ours}.norm2.scale": (f"{theirs}.ln_2.weight", keep),
            f"{ours}.norm2.shift": (f"{theirs}.ln_2.bias", keep),
            f"{ours}.ff.layers.0.weight": (f"{theirs}.mlp.c_fc.weight", conv1d),
            f"{ours}.ff.layers.0.bias": (f"{theirs}.mlp.c_fc.bias", keep),
            f"{ours}.ff.layers.2.weight": (f"{theirs}.mlp.c_proj.weight", conv1d),
            f"{ours}.ff.layers.2.bias": (f"{theirs}.mlp.c_proj.bias", keep),
        }
    return sources


# --8<-- [end:mapping]


# --8<-- [start:load]
def load_gpt2_state_dict(model: GPTModel, state_dict: Mapping[str, torch.Tensor]) -> GPTModel:
    """Copy a Hugging Face GPT-2 state dict into ``model`` in place, and return the model.

    Raises ``ValueError`` naming the first key that is missing, unexpected, or of the wrong shape,
    before any weight is changed.
    """
    theirs = {k.removeprefix("transformer."): v for k, v in state_dict.items()}
    theirs = {k: v for k, v in theirs.items() if not k.endswith(_IGNORED_SUFFIXES)}
    if "lm_head.weight" not in theirs and "wte.weight" in theirs:
        theirs["lm_head.weight"] = theirs["wte.weight"]  # GPT2Model: the head is tied to wte

    ours = model.state_dict(keep_vars=True)
    sources = _gpt2_sources(model.cfg)
    converted = {}
    for name, param in ours.items():
        if name not in sources:
            raise ValueError(f"our parameter {name!r} has no GPT-2 counterpart")
        key, transform = sources[name]
        if key not in theirs:
            raise ValueError(f"GPT-2 state dict has no key {key!r} (needed for our {name!r})")
        value = transform(theirs[key])
        if value.shape != param.shape:
            raise ValueError(
                f"shape mismatch at {key!r}: GPT-2 gives {tuple(value.shape)} for our {name!r}, "
                f"which has {tuple(param.shape)}; does the config match the checkpoint?"
            )
        converted[name] = value
    unused = sorted(set(theirs) - {sources[name][0] for name in ours})
    if unused:
        raise ValueError(
            f"GPT-2 state dict has keys our model does not use, first {unused[0]!r} "
            "(a qkv bias needs qkv_bias=True)"
        )

    with torch.no_grad():
        for name, value in converted.items():
            ours[name].copy_(value)
    return model


# --8<-- [end:load]
