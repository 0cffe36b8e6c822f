"""Typical wrong answers to the generating chapter's exercises."""

import torch


def top_k_filter(logits, k):
    # No clamp: torch.topk refuses a k larger than the vocabulary.
    kth_best = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth_best, float("-inf"))


def top_p_filter(logits, p):
    # Keeps the tokens while the running total is at most p: drops the token that crosses p (and,
    # when the top token alone exceeds p, every token).
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    keep_sorted = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1) <= p
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return logits.masked_fill(~keep, float("-inf"))


@torch.no_grad()
def greedy_generate(model, idx, max_new_tokens, context_length):
    # Never crops: once the sequence is longer than the context, the model has no position for it.
    for _ in range(max_new_tokens):
        next_id = model(idx)[:, -1].argmax(dim=-1, keepdim=True)
        idx = torch.cat([idx, next_id], dim=1)
    return idx
