"""Your turn: generating text. Check with ``uv run python -m exercises generating``."""

import torch


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest logits of each row and set the others to ``-inf``.

    ``logits`` is (V,) or (B, V); returns the same shape, the kept logits unchanged. A ``k`` larger
    than V keeps every token. Sampling from the result can never draw a token of the long tail.
    """
    raise NotImplementedError


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of most probable tokens whose total probability
    reaches ``p`` (0 < p <= 1), and set the other logits to ``-inf``.

    ``logits`` is (V,) or (B, V), each row on its own; returns the same shape, the kept logits
    unchanged and in their places. Go down the tokens from the most probable, adding up their
    probabilities (the softmax of the row); the token whose probability makes the total reach
    ``p`` is kept, the ones after it are not. At least one token always stays.
    """
    raise NotImplementedError


def greedy_generate(
    model: torch.nn.Module, idx: torch.Tensor, max_new_tokens: int, context_length: int
) -> torch.Tensor:
    """Extend the prompts ``idx`` (B, T) int64 by ``max_new_tokens`` tokens, always taking the
    most likely next token; returns (B, T + max_new_tokens).

    ``model(ids)`` maps (B, t) ids to (B, t, V) logits, for t up to ``context_length``. At each
    step, run the model on the sequence so far (at most its last ``context_length`` tokens: the
    model knows no later positions), take the logits of the last position, and append the argmax.
    """
    raise NotImplementedError
