"""Loading GPT-2: the answers, and the cases each one is checked on.

References: ``split_qkv`` against the loader's own mapping (``src.gpt2._gpt2_sources``),
``parameter_count`` against counting the parameters of a ``GPTModel`` built on the meta device (no
memory), ``config_from_shapes`` against the loader's ``src.gpt2._config_from_shapes``.
"""

import torch

from exercises.checker import Case, Exercise
from src.gpt2 import _config_from_shapes, _gpt2_sources
from src.model import GPTConfig, GPTModel, count_parameters


# --8<-- [start:split_qkv]
def split_qkv(c_attn_weight: torch.Tensor, c_attn_bias: torch.Tensor) -> tuple[torch.Tensor, ...]:
    q, k, v = c_attn_weight.chunk(3, dim=1)  # (E, E) each: [query | key | value] along the outputs
    b_q, b_k, b_v = c_attn_bias.chunk(3)
    return q.t(), k.t(), v.t(), b_q, b_k, b_v  # Conv1D is (in, out), nn.Linear (out, in)


# --8<-- [end:split_qkv]


# --8<-- [start:parameter_count]
def parameter_count(
    vocab_size: int,
    context_length: int,
    emb_dim: int,
    n_layers: int,
    qkv_bias: bool = True,
    tie_weights: bool = True,
) -> int:
    E = emb_dim
    attention = 3 * (E * E + (E if qkv_bias else 0)) + (E * E + E)  # q, k, v; output projection
    feed_forward = (E * 4 * E + 4 * E) + (4 * E * E + E)  # widen, then back, each with a bias
    norms = 2 * (E + E)  # norm1 and norm2: a scale and a shift each
    embeddings = vocab_size * E + context_length * E
    head = 0 if tie_weights else vocab_size * E
    return embeddings + n_layers * (attention + feed_forward + norms) + (E + E) + head


# --8<-- [end:parameter_count]


# --8<-- [start:config_from_shapes]
def config_from_shapes(state_dict: dict[str, torch.Tensor]) -> dict[str, int]:
    shapes = {k.removeprefix("transformer."): v.shape for k, v in state_dict.items()}
    vocab_size, emb_dim = shapes["wte.weight"]
    layers = {int(k.split(".")[1]) for k in shapes if k.startswith("h.")}  # the block numbers
    return dict(
        vocab_size=vocab_size,
        context_length=shapes["wpe.weight"][0],
        emb_dim=emb_dim,
        n_layers=len(layers),
        n_heads=emb_dim // 64,  # no shape says it: GPT-2's heads have 64 dimensions
    )


# --8<-- [end:config_from_shapes]


def _split_by_the_loader(c_attn_weight, c_attn_bias):
    E = c_attn_weight.shape[0]
    sources = _gpt2_sources(
        GPTConfig(vocab_size=1, context_length=1, emb_dim=E, n_heads=1, n_layers=1)
    )
    names = [f"trf_blocks.0.att.W_{part}.{kind}" for kind in ("weight", "bias")
             for part in ("query", "key", "value")]  # fmt: skip
    return tuple(
        sources[n][1](c_attn_weight if n.endswith("weight") else c_attn_bias) for n in names
    )


def _count_by_building(
    vocab_size, context_length, emb_dim, n_layers, qkv_bias=True, tie_weights=True
):
    cfg = GPTConfig(vocab_size=vocab_size, context_length=context_length, emb_dim=emb_dim,
                    n_heads=1, n_layers=n_layers, qkv_bias=qkv_bias, tie_weights=tie_weights)  # fmt: skip
    with torch.device("meta"):  # shapes only: GPT-2 xl costs no memory
        return count_parameters(GPTModel(cfg))


def _config_by_the_loader(state_dict):
    found = _config_from_shapes(state_dict)
    return dict(vocab_size=found.vocab_size, context_length=found.n_positions,
                emb_dim=found.n_embd, n_layers=found.n_layer, n_heads=found.n_head)  # fmt: skip


def _gpt2_state(vocab, context, E, n_layers, prefix="", buffers=False):
    """The keys and shapes of a Hugging Face GPT-2 state dict, as empty tensors on the meta device."""
    shapes = {
        "wte.weight": (vocab, E),
        "wpe.weight": (context, E),
        "ln_f.weight": (E,),
        "ln_f.bias": (E,),
    }
    block = {"ln_1.weight": (E,), "ln_1.bias": (E,), "attn.c_attn.weight": (E, 3 * E),
             "attn.c_attn.bias": (3 * E,), "attn.c_proj.weight": (E, E), "attn.c_proj.bias": (E,),
             "ln_2.weight": (E,), "ln_2.bias": (E,), "mlp.c_fc.weight": (E, 4 * E),
             "mlp.c_fc.bias": (4 * E,), "mlp.c_proj.weight": (4 * E, E), "mlp.c_proj.bias": (E,)}  # fmt: skip
    if buffers:
        block |= {"attn.bias": (1, 1, context, context), "attn.masked_bias": ()}
    for i in range(n_layers):
        shapes |= {f"h.{i}.{name}": shape for name, shape in block.items()}
    state = {prefix + k: torch.empty(shape, device="meta") for k, shape in shapes.items()}
    if prefix:
        state["lm_head.weight"] = torch.empty(vocab, E, device="meta")
    return state


def _split_cases(g):
    return [
        Case("E = 2, the values 0..11 so that you can see which column went where",
             (torch.arange(12.0).view(2, 6), torch.arange(6.0))),
        Case("E = 3", (torch.randn(3, 9, generator=g), torch.randn(9, generator=g))),
        Case("E = 8", (torch.randn(8, 24, generator=g), torch.randn(24, generator=g))),
    ]  # fmt: skip


def _count_cases(g):
    return [
        Case("a tiny model (vocabulary 10, context 4, width 2, one block): every bias and every "
             "LayerNorm counts", (10, 4, 2, 1)),
        Case("no qkv biases, as our CPU presets", (10, 4, 2, 1), {"qkv_bias": False}),
        Case("an untied head adds vocab_size x emb_dim", (10, 4, 2, 1), {"tie_weights": False}),
        Case("GPT-2 small: 124,439,808", (50257, 1024, 768, 12)),
        Case("GPT-2 xl", (50257, 1024, 1600, 48)),
        Case("the book's cpu-small preset", (8192, 256, 256, 4), {"qkv_bias": False, "tie_weights": False}),
    ]  # fmt: skip


def _config_cases(g):
    return [
        Case("a GPT2Model state dict, 2 layers", (_gpt2_state(50, 16, 128, 2),)),
        Case("a GPT2LMHeadModel state dict: every key starts with transformer.",
             (_gpt2_state(50, 16, 128, 2, prefix="transformer."),)),
        Case("the attn.bias buffers that some transformers versions save: count the blocks by "
             "their numbers, not their tensors", (_gpt2_state(50, 16, 64, 6, buffers=True),)),
        Case("12 layers: as strings, 'h.11' sorts before 'h.2'", (_gpt2_state(50, 16, 64, 12),)),
        Case("GPT-2 small's shapes", (_gpt2_state(50257, 1024, 768, 12, prefix="transformer."),)),
    ]  # fmt: skip


EXERCISES = [
    Exercise(
        "split_qkv", "GPT-2's fused c_attn as three nn.Linear weights and biases",
        reference=_split_by_the_loader, cases=_split_cases,
        hint="chunk the weight in three along dim 1 (the output dimension, columns), then "
        "transpose each (E, E) part: the shapes are right with or without the transpose, the "
        "values are not",
    ),
    Exercise(
        "parameter_count", "the number of parameters of a GPT from its shape alone",
        reference=_count_by_building, cases=_count_cases,
        hint="per block: 4 E x E attention matrices, 8 E x E in the feed-forward, and vectors: "
        "biases (3E if qkv_bias, E, 4E, E) and 2 LayerNorms of 2E; plus both embeddings, "
        "the final LayerNorm (2E), and the head only if it is not tied",
    ),
    Exercise(
        "config_from_shapes", "a GPT-2 checkpoint's configuration read from its tensor shapes",
        reference=_config_by_the_loader, cases=_config_cases,
        hint="strip a leading 'transformer.'; the sizes come from wte.weight and wpe.weight; the "
        "number of layers is the number of distinct i in the keys 'h.{i}.', as integers",
    ),
]  # fmt: skip
