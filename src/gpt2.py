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

``load_pretrained("gpt2")`` downloads OpenAI's published weights once (small, medium, large or xl,
from the ``openai-community`` repositories on the Hugging Face Hub, safetensors only, so loading
never runs code from the file) into the Hugging Face cache, and returns our model carrying them.
It also accepts a local safetensors file, or a folder holding ``model.safetensors`` and
``config.json`` as ``save_pretrained`` writes them.
"""

import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from types import SimpleNamespace

import torch

from src.checkpoints import read_safetensors
from src.errors import UserError
from src.model import GPTConfig, GPTModel

# Buffers that some versions of transformers store next to the weights; they hold no learned values.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")


# --8<-- [start:config]
def config_from_hf(hf_config, **overrides) -> GPTConfig:
    """Our config for a Hugging Face ``GPT2Config`` (GPT-2 has qkv biases and a tied head)."""
    if getattr(hf_config, "n_inner", None) not in (None, 4 * hf_config.n_embd):
        raise UserError(f"n_inner={hf_config.n_inner} is not supported; ours is 4 * n_embd")
    if hf_config.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
        raise UserError(f"activation {hf_config.activation_function!r} is not GELU's tanh form")
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
            f"{ours}.ff.fc.weight": (f"{theirs}.mlp.c_fc.weight", conv1d),
            f"{ours}.ff.fc.bias": (f"{theirs}.mlp.c_fc.bias", keep),
            f"{ours}.ff.proj.weight": (f"{theirs}.mlp.c_proj.weight", conv1d),
            f"{ours}.ff.proj.bias": (f"{theirs}.mlp.c_proj.bias", keep),
        }
    return sources


# --8<-- [end:mapping]


# --8<-- [start:load]
def load_gpt2_state_dict(model: GPTModel, state_dict: Mapping[str, torch.Tensor]) -> GPTModel:
    """Copy a Hugging Face GPT-2 state dict into ``model`` in place, and return the model.

    Raises ``UserError`` (a ``ValueError``) naming the first key that is missing, unexpected, or of the wrong shape,
    before any weight is changed.
    """
    theirs = {k.removeprefix("transformer."): v for k, v in state_dict.items()}
    theirs = {k: v for k, v in theirs.items() if not k.endswith(_IGNORED_SUFFIXES)}
    if "lm_head.weight" not in theirs and "wte.weight" in theirs:
        theirs["lm_head.weight"] = theirs["wte.weight"]  # GPT2Model: the head is tied to wte
    return copy_mapped(model, theirs, _gpt2_sources(model.cfg), "GPT-2")


def copy_mapped(model: GPTModel, theirs: Mapping[str, torch.Tensor], sources: dict,
                family: str) -> GPTModel:  # fmt: skip
    """Copy ``theirs`` into ``model`` by ``sources`` (our name -> (their key, transform)), after
    checking every name and shape; the Llama loader (``src/llama.py``) shares it."""
    ours = model.state_dict(keep_vars=True)
    converted = {}
    for name, param in ours.items():
        if name not in sources:
            raise UserError(f"our parameter {name!r} has no {family} counterpart")
        key, transform = sources[name]
        if key not in theirs:
            raise UserError(f"{family} state dict has no key {key!r} (needed for our {name!r})")
        value = transform(theirs[key])
        if value.shape != param.shape:
            raise UserError(
                f"shape mismatch at {key!r}: {family} gives {tuple(value.shape)} for our "
                f"{name!r}, which has {tuple(param.shape)}; does the config match the checkpoint?"
            )
        converted[name] = value
    unused = sorted(set(theirs) - {sources[name][0] for name in ours})
    if unused:
        raise UserError(
            f"{family} state dict has keys our model does not use, first {unused[0]!r} "
            "(a bias needs qkv_bias=True or bias=True)"
        )

    with torch.no_grad():
        for name, value in converted.items():
            ours[name].copy_(value)
    return model


# --8<-- [end:load]


# --8<-- [start:download]
GPT2_REPOS = {
    "gpt2": "openai-community/gpt2",  # 124M
    "gpt2-medium": "openai-community/gpt2-medium",  # 355M
    "gpt2-large": "openai-community/gpt2-large",  # 774M
    "gpt2-xl": "openai-community/gpt2-xl",  # 1558M
}
WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"


def download_gpt2(name: str, cache_dir: Path | None = None) -> Path:
    """The folder holding ``config.json`` and ``model.safetensors`` of OpenAI's GPT-2 ``name``.

    The first call downloads them into the Hugging Face cache (``~/.cache/huggingface``, or
    ``cache_dir``); later calls find them there.
    """
    if name not in GPT2_REPOS:
        raise UserError(f"unknown GPT-2 model {name!r}; choose one of {', '.join(GPT2_REPOS)}")
    return download_from_hub(name, GPT2_REPOS[name], (CONFIG_FILE, WEIGHTS_FILE), cache_dir)


def download_from_hub(name: str, repo: str, files: tuple[str, ...], cache_dir: Path | None) -> Path:
    """The folder of ``files`` from the Hub repository ``repo``: downloaded once, then cached."""
    from huggingface_hub import hf_hub_download  # needed only for downloads

    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)  # its warnings on each retry would bury the one line below
    try:
        paths = [hf_hub_download(repo, f, cache_dir=cache_dir) for f in files]
    except Exception as err:  # no network, a proxy refusing, a hub error: all end the same way
        raise UserError(
            f"could not download {name} from https://huggingface.co/{repo} and it is not cached "
            f"({type(err).__name__}); connect to the internet once so it is cached, or download "
            f"{', '.join(files)} from that page into a folder and pass it with --weights"
        ) from None
    finally:
        hub_log.setLevel(level)
    return Path(paths[0]).parent


# --8<-- [end:download]


# --8<-- [start:load_pretrained]
def load_pretrained(name_or_path: str | Path, **overrides) -> GPTModel:
    """Our ``GPTModel`` carrying GPT-2 weights, in eval mode.

    ``name_or_path``: a name from ``GPT2_REPOS`` (downloaded and cached), a folder with
    ``model.safetensors`` and ``config.json``, or a ``.safetensors`` file. A file with no
    ``config.json`` beside it gets its config from the tensor shapes (heads of size 64, as in all
    four GPT-2 sizes). ``overrides`` change config fields, e.g. ``drop_rate=0.0``.
    """
    if str(name_or_path) in GPT2_REPOS:
        folder = download_gpt2(str(name_or_path))
        weights, config = folder / WEIGHTS_FILE, folder / CONFIG_FILE
    else:
        path = Path(name_or_path)
        if path.is_dir():
            weights, config = path / WEIGHTS_FILE, path / CONFIG_FILE
        elif path.is_file():
            weights, config = path, path.with_name(CONFIG_FILE)
        else:
            raise UserError(
                f"{path}: no such file or folder; expected one of {', '.join(GPT2_REPOS)}, "
                f"a .safetensors file, or a folder holding {WEIGHTS_FILE} and {CONFIG_FILE}"
            )
        if not weights.is_file():
            raise UserError(f"{path} holds no {WEIGHTS_FILE}")
    state = read_safetensors(weights)
    hf_config = (
        read_config(config, _HF_DEFAULTS) if config.is_file() else _config_from_shapes(state)
    )
    model = GPTModel(config_from_hf(hf_config, **overrides))
    return load_gpt2_state_dict(model, state).eval()


# GPT2Config's defaults for the fields config_from_hf reads, where a config.json leaves them out.
_HF_DEFAULTS = dict(n_inner=None, activation_function="gelu_new", resid_pdrop=0.1)


def read_config(path: Path, defaults: dict) -> SimpleNamespace:
    """A Hugging Face ``config.json`` as attributes, ``defaults`` filling the fields it leaves out."""
    try:
        config = json.loads(path.read_text("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path} is not a JSON config: {err}") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} is not a JSON object")
    return SimpleNamespace(**(defaults | config))


def _config_from_shapes(state: Mapping[str, torch.Tensor]) -> SimpleNamespace:
    state = {k.removeprefix("transformer."): v for k, v in state.items()}
    if "wte.weight" not in state or "wpe.weight" not in state:
        raise UserError("this safetensors file has no wte/wpe embeddings: not a GPT-2 checkpoint")
    vocab_size, n_embd = state["wte.weight"].shape
    n_layer = len({k.split(".")[1] for k in state if k.startswith("h.")})
    return SimpleNamespace(
        **_HF_DEFAULTS,
        vocab_size=vocab_size,
        n_positions=state["wpe.weight"].shape[0],
        n_embd=n_embd,
        n_head=n_embd // 64,
        n_layer=n_layer,
    )


# --8<-- [end:load_pretrained]
