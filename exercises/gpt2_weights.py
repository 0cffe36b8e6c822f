"""Your turn: loading GPT-2. Check with ``uv run python -m exercises gpt2-weights``."""

import torch


def split_qkv(c_attn_weight: torch.Tensor, c_attn_bias: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """GPT-2's fused query/key/value projection as our three ``nn.Linear`` layers.

    ``c_attn_weight`` is (E, 3E) in ``Conv1D`` layout, (in, out): ``y = x @ W + b``; along its
    output dimension it holds ``[query | key | value]``. ``c_attn_bias`` is (3E,). Return
    ``(W_query, W_key, W_value, b_query, b_key, b_value)``: three (E, E) weights in ``nn.Linear``
    layout, (out, in), and three (E,) biases.
    """
    raise NotImplementedError


def parameter_count(
    vocab_size: int,
    context_length: int,
    emb_dim: int,
    n_layers: int,
    qkv_bias: bool = True,
    tie_weights: bool = True,
) -> int:
    """The number of parameters of our ``GPTModel`` with this shape, without building it.

    Count every tensor: the two embeddings; per block the query, key and value projections (with
    biases when ``qkv_bias``), the output projection, the feed-forward's two layers (E -> 4E ->
    E) with their biases, and two LayerNorms (a scale and a shift each); the final LayerNorm; the
    output head (E -> vocab, no bias), unless ``tie_weights`` shares it with the token embedding.
    GPT-2 small (50257, 1024, 768, 12 layers) has 124,439,808.
    """
    raise NotImplementedError


def config_from_shapes(state_dict: dict[str, torch.Tensor]) -> dict[str, int]:
    """Read a GPT-2 checkpoint's configuration from its tensors alone (a bare safetensors file
    has no config.json): a dict with ``vocab_size``, ``context_length``, ``emb_dim``,
    ``n_layers`` and ``n_heads``.

    The keys are Hugging Face's: ``wte.weight`` (vocab, E), ``wpe.weight`` (context, E), and the
    blocks' ``h.{i}.ln_1.weight``, ``h.{i}.attn.c_attn.weight``, ... for i = 0 .. n_layers - 1.
    A ``GPT2LMHeadModel`` state dict puts ``transformer.`` in front of all of them. The number
    of heads is not in any shape: GPT-2's heads have 64 dimensions, so it is E // 64.
    """
    raise NotImplementedError
