"""Typical wrong answers to the gpt2-weights chapter's exercises."""


def split_qkv(c_attn_weight, c_attn_bias):
    # Splits along the right dimension but forgets the transpose: every shape fits (E, E is square),
    # and the model computes x @ W.T where GPT-2 computed x @ W.
    q, k, v = c_attn_weight.chunk(3, dim=1)
    return (q, k, v, *c_attn_bias.chunk(3))


def parameter_count(vocab_size, context_length, emb_dim, n_layers, qkv_bias=True, tie_weights=True):
    # Counts the matrices and the biases but forgets the LayerNorms' scales and shifts.
    E = emb_dim
    block = 12 * E * E + (3 * E if qkv_bias else 0) + E + 4 * E + E
    head = 0 if tie_weights else vocab_size * E
    return (vocab_size + context_length) * E + n_layers * block + head


def config_from_shapes(state_dict):
    # Counts the blocks by their tensors (12 per block): wrong as soon as a block holds more.
    shapes = {k.removeprefix("transformer."): v.shape for k, v in state_dict.items()}
    vocab_size, emb_dim = shapes["wte.weight"]
    n_layers = sum(k.startswith("h.") for k in shapes) // 12
    return dict(vocab_size=vocab_size, context_length=shapes["wpe.weight"][0], emb_dim=emb_dim,
                n_layers=n_layers, n_heads=emb_dim // 64)  # fmt: skip
