"""Generating text: turn a model that scores the next token into one that writes.

The model gives logits for the next token at every position; generation repeatedly takes the last
position's logits, picks a token, appends it, and feeds the longer sequence back in. *How* the token
is picked decides the character of the text:

- greedy (``temperature=0``): always the most likely token; deterministic, often repetitive;
- temperature: divide the logits by ``temperature`` before the softmax; below 1 sharpens the
  distribution, above 1 flattens it;
- top-k: sample only among the ``k`` most likely tokens, so the long tail of unlikely tokens can
  never be drawn.
"""

import torch


# --8<-- [start:generate]
@torch.no_grad()
def generate(
    model: torch.nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    context_length: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Extend ``idx`` (B, T) by up to ``max_new_tokens`` tokens; stop early once every row has
    produced ``eos_id`` (rows that finished earlier keep receiving ``eos_id``)."""
    finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
    for _ in range(max_new_tokens):
        logits = model(idx[:, -context_length:])[:, -1, :]  # (B, vocab_size), last position only
        if top_k is not None:
            kth_best = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]  # (B, 1)
            logits = logits.masked_fill(logits < kth_best, float("-inf"))
        if temperature > 0.0:
            probs = torch.softmax(logits / temperature, dim=-1)
            idx_next = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
        else:
            idx_next = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
        if eos_id is not None:
            idx_next = idx_next.masked_fill(finished[:, None], eos_id)
            finished |= idx_next[:, 0] == eos_id
        idx = torch.cat([idx, idx_next], dim=1)  # (B, T + 1)
        if eos_id is not None and finished.all():
            break
    return idx


# --8<-- [end:generate]
