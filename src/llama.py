"""Llama, Qwen2 and Qwen3 weights in our model.

With its modern switches on, our ``GPTModel`` is the decoder of Llama-style models: RMSNorm before
each sub-layer, rotary positions on q and k, grouped key/value heads, a SwiGLU feed-forward layer.
Hugging Face's ``LlamaForCausalLM``, ``Qwen2ForCausalLM`` and ``Qwen3ForCausalLM`` differ from it,
and from each other, in a few details, which ``config_from_hf`` reads from their configs:

| | Llama (SmolLM2) | Qwen2 (Qwen2.5) | Qwen3 |
| --- | --- | --- | --- |
| biases | none (or all, ``attention_bias``) | on q, k and v only | none |
| QK-norm | no | no | yes, RMSNorm over each head |
| head size | ``hidden_size / num_attention_heads`` | the same | its own ``head_dim`` (128) |

The weights need no transposes (every layer is an ``nn.Linear``, as ours) and no splits (q, k and v
are separate projections): only new names. Rotary embeddings come in two conventions; Hugging
Face's code pairs dimension ``i`` with ``i + head_dim / 2``, and so does ours.

``load_pretrained`` takes a name from ``LLAMA_REPOS`` (downloaded once from the Hugging Face Hub),
or a folder as ``save_pretrained`` writes it: ``config.json``, the weights in ``model.safetensors``
(or shards listed in ``model.safetensors.index.json``), and usually the model's own
``tokenizer.json``, which ``load_tokenizer`` reads.
"""

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from src.checkpoints import read_safetensors
from src.errors import UserError
from src.gpt2 import CONFIG_FILE, WEIGHTS_FILE, copy_mapped, download_from_hub, read_config
from src.model import GPTConfig, GPTModel
from src.tokenizer import load_tokenizer_json

FAMILIES = ("llama", "qwen2", "qwen3")
INDEX_FILE, TOKENIZER_FILE = "model.safetensors.index.json", "tokenizer.json"
# Buffers that older checkpoints store next to the weights; they hold no learned values.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


# --8<-- [start:config]
def config_from_hf(hf_config, **overrides) -> GPTConfig:
    """Our config for a Hugging Face ``LlamaConfig``, ``Qwen2Config`` or ``Qwen3Config`` (or their
    ``config.json`` read as attributes). What our model cannot compute is refused, by name."""
    family = getattr(hf_config, "model_type", None)
    if family not in FAMILIES:
        raise UserError(f"model_type {family!r} is not one of {', '.join(FAMILIES)}")
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        raise UserError(f"activation {hf_config.hidden_act!r} is not SwiGLU's SiLU")
    if getattr(hf_config, "use_sliding_window", False) or any(
        kind != "full_attention" for kind in getattr(hf_config, "layer_types", None) or []
    ):
        raise UserError("sliding-window attention is not supported; every layer attends to all")
    qkv_bias, bias = _biases(family, hf_config)
    heads, width = hf_config.num_attention_heads, hf_config.hidden_size
    head_dim = getattr(hf_config, "head_dim", None) or width // heads
    fields = dict(
        vocab_size=hf_config.vocab_size,
        context_length=hf_config.max_position_embeddings,
        emb_dim=width,
        n_heads=heads,
        n_kv_heads=getattr(hf_config, "num_key_value_heads", None) or heads,
        head_dim=None if head_dim * heads == width else head_dim,
        n_layers=hf_config.num_hidden_layers,
        drop_rate=0.0,  # these models are trained without dropout (attention_dropout is 0)
        qkv_bias=qkv_bias,
        bias=bias,
        tie_weights=bool(getattr(hf_config, "tie_word_embeddings", False)),
        norm="rmsnorm",
        norm_eps=hf_config.rms_norm_eps,
        pos_emb="rope",
        rope_theta=_rope_theta(hf_config),
        ff="swiglu",
        ff_hidden_dim=hf_config.intermediate_size,
        qk_norm=family == "qwen3",
    )
    return GPTConfig(**(fields | overrides))


def _biases(family: str, hf_config) -> tuple[bool, bool]:
    """(qkv_bias, bias) of a family: Qwen2 has biases on q, k and v alone; Llama and Qwen3 have
    one switch, ``attention_bias``, and our ``bias`` covers the output projection and the MLP,
    so the MLP must agree (Qwen3's MLP never has one)."""
    if family == "qwen2":
        return True, False
    attention_bias = bool(getattr(hf_config, "attention_bias", False))
    mlp_bias = bool(getattr(hf_config, "mlp_bias", False)) if family == "llama" else False
    if attention_bias != mlp_bias:
        raise UserError(f"attention_bias={attention_bias} with mlp_bias={mlp_bias} is not "
                        "supported: our bias switch covers both")  # fmt: skip
    return attention_bias, attention_bias


def _rope_theta(hf_config) -> float:
    """The rotary base, from ``rope_theta`` or (newer configs) ``rope_parameters``. Rotary
    variants that rescale the angles (Llama 3's, YaRN) are refused."""
    params = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None)
    params = params or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise UserError(f"rotary embeddings of type {kind!r} are not supported, only the default")
    return float(params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))


# --8<-- [end:config]


# --8<-- [start:mapping]
# Our names inside block i -> Hugging Face's inside model.layers.i. Every tensor keeps its layout.
BLOCK_NAMES = {
    "norm1.scale": "input_layernorm.weight",
    "att.W_query": "self_attn.q_proj",
    "att.W_key": "self_attn.k_proj",
    "att.W_value": "self_attn.v_proj",
    "att.q_norm.scale": "self_attn.q_norm.weight",
    "att.k_norm.scale": "self_attn.k_norm.weight",
    "att.out_proj": "self_attn.o_proj",
    "norm2.scale": "post_attention_layernorm.weight",
    "ff.gate": "mlp.gate_proj",
    "ff.fc": "mlp.up_proj",
    "ff.proj": "mlp.down_proj",
}


def hf_name(ours: str) -> str:
    """The Hugging Face name of our parameter ``ours``: ``trf_blocks.3.att.W_key.bias`` ->
    ``model.layers.3.self_attn.k_proj.bias``."""
    top = {"tok_emb.weight": "model.embed_tokens.weight", "final_norm.scale": "model.norm.weight",
           "out_head.weight": "lm_head.weight"}  # fmt: skip
    if ours in top:
        return top[ours]
    _, i, rest = ours.split(".", 2)
    for name, theirs in BLOCK_NAMES.items():
        if rest == name or rest.startswith(name + "."):
            return f"model.layers.{i}.{theirs}{rest[len(name) :]}"
    raise UserError(f"our parameter {ours!r} has no Llama counterpart")


# --8<-- [end:mapping]


# --8<-- [start:load]
def load_llama_state_dict(model: GPTModel, state_dict: Mapping[str, torch.Tensor]) -> GPTModel:
    """Copy a Hugging Face Llama, Qwen2 or Qwen3 state dict (of the ``...ForCausalLM``, or of the
    bare ``...Model`` without the ``model.`` prefix) into ``model`` in place, and return it.

    Raises ``UserError`` (a ``ValueError``) naming the first key that is missing, unexpected, or
    of the wrong shape, before any weight is changed. A tied model's file may leave out
    ``lm_head.weight``: the head is the embedding."""
    theirs = {k if k.startswith(("model.", "lm_head.")) else f"model.{k}": v
              for k, v in state_dict.items() if not k.endswith(_IGNORED_SUFFIXES)}  # fmt: skip
    head, embedding = theirs.get("lm_head.weight"), theirs.get("model.embed_tokens.weight")
    tied = model.cfg.tie_weights and embedding is not None
    if tied and head is None:
        theirs["lm_head.weight"] = embedding
    elif tied and not torch.equal(head, embedding):
        raise UserError("the state dict has an lm_head.weight of its own, but the config ties "
                        "the head to the embedding (tie_word_embeddings)")  # fmt: skip
    keep = lambda t: t  # noqa: E731
    sources = {name: (hf_name(name), keep) for name in model.state_dict()}
    return copy_mapped(model, theirs, sources, "Llama")


# --8<-- [end:load]


# --8<-- [start:download]
LLAMA_REPOS = {
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M",  # Llama architecture, 135M
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B",  # Qwen2 architecture, 494M
    "qwen3-0.6b": "Qwen/Qwen3-0.6B",  # Qwen3 architecture, 596M
}


def download_llama(name: str, cache_dir: Path | None = None) -> Path:
    """The folder holding ``config.json``, ``model.safetensors`` and ``tokenizer.json`` of the
    model ``name``, downloaded into the Hugging Face cache on first use."""
    if name not in LLAMA_REPOS:
        raise UserError(f"unknown model {name!r}; choose one of {', '.join(LLAMA_REPOS)}")
    return download_from_hub(name, LLAMA_REPOS[name], (CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE),
                             cache_dir)  # fmt: skip


# --8<-- [end:download]


# --8<-- [start:load_pretrained]
def model_folder(name_or_path: str | Path) -> Path:
    """The folder a name (downloaded, or found in the cache) or a path stands for."""
    if str(name_or_path) in LLAMA_REPOS:
        return download_llama(str(name_or_path))
    path = Path(name_or_path)
    if not path.is_dir():
        raise UserError(f"{path}: no such folder; expected one of {', '.join(LLAMA_REPOS)}, or "
                        f"a folder holding {CONFIG_FILE} and {WEIGHTS_FILE}")  # fmt: skip
    return path


def is_llama_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder whose ``config.json`` names one of ``FAMILIES``."""
    config = Path(path) / CONFIG_FILE
    return config.is_file() and read_config(config, {"model_type": None}).model_type in FAMILIES


def load_pretrained(name_or_path: str | Path, **overrides) -> GPTModel:
    """Our ``GPTModel`` carrying a Llama, Qwen2 or Qwen3 model's weights, in eval mode.
    ``overrides`` change config fields, e.g. ``attn_impl="sdpa"``."""
    folder = model_folder(name_or_path)
    if not (folder / CONFIG_FILE).is_file():
        raise UserError(f"{folder} holds no {CONFIG_FILE}, which says the model's shape")
    try:
        cfg = config_from_hf(read_config(folder / CONFIG_FILE, {"model_type": None}), **overrides)
    except AttributeError as err:  # a config.json that leaves out a size
        raise UserError(f"{folder / CONFIG_FILE} lacks a field: {err}") from None
    return load_llama_state_dict(GPTModel(cfg), _read_weights(folder)).eval()


def load_tokenizer(name_or_path: str | Path):
    """The model's own tokenizer, from its ``tokenizer.json`` (see ``load_tokenizer_json``)."""
    path = model_folder(name_or_path) / TOKENIZER_FILE
    if not path.is_file():
        raise UserError(f"{path.parent} holds no {TOKENIZER_FILE}; pass --tokenizer")
    return load_tokenizer_json(path)


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of ``model.safetensors``, or of the shards its index lists."""
    if (folder / WEIGHTS_FILE).is_file():
        return read_safetensors(folder / WEIGHTS_FILE)
    if not (folder / INDEX_FILE).is_file():
        raise UserError(f"{folder} holds no {WEIGHTS_FILE} (nor {INDEX_FILE})")
    try:
        shards = sorted(
            set(json.loads((folder / INDEX_FILE).read_text("utf-8"))["weight_map"].values())
        )
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
        raise UserError(f"{folder / INDEX_FILE} is not a safetensors index: {err}") from None
    state = {}
    for shard in shards:
        state |= read_safetensors(folder / Path(shard).name)
    return state


# --8<-- [end:load_pretrained]
