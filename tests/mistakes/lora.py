"""Typical wrong answers to the LoRA chapter's exercises."""


def lora_forward(x, weight, bias, A, B, alpha):
    # Scales the update by alpha instead of alpha / rank: rank times too large.
    return x @ weight.T + bias + alpha * (x @ A.T) @ B.T


def merge_lora_weight(weight, A, B, alpha):
    # Folds in the transpose of the update, (in, out): fits only a square weight, and is wrong there.
    return weight + (alpha / A.shape[0]) * (A.T @ B.T)


def lora_parameter_count(emb_dim, n_layers, rank, targets):
    # Treats every layer as emb_dim x emb_dim: the feed-forward's layers are four times wider.
    return n_layers * len(targets) * rank * 2 * emb_dim
