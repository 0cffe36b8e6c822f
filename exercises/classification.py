"""Your turn: finetuning for classification. Check with ``uv run python -m exercises classification``."""

import torch


def pad_batch(
    batch: list[tuple[list[int], int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch of ``(token ids, label id)`` pairs as tensors: ``(ids, lengths, labels)``.

    ``ids`` (B, T) int64, T the longest text of the batch: each text from position 0, padded on the
    right with ``pad_id``. ``lengths`` (B,) int64: each text's number of tokens. ``labels`` (B,)
    int64. With the pads after the text, causal attention keeps them from changing anything the
    text's own positions compute.
    """
    raise NotImplementedError


def last_token_logits(logits: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Each text's logits at its last real token: ``logits`` (B, T, C), ``lengths`` (B,) int64
    with 1 <= length <= T; returns (B, C). Row ``b``'s last real token is at position
    ``lengths[b] - 1``: the only position that has seen the whole text."""
    raise NotImplementedError


def confusion_matrix(
    predicted: torch.Tensor, true: torch.Tensor, num_classes: int
) -> list[list[int]]:
    """How the predictions fall: ``matrix[t][p]`` counts the examples of true class ``t`` that were
    predicted as class ``p``; ``predicted`` and ``true`` are (N,) int64 in 0..num_classes-1.
    Returns a list of ``num_classes`` lists of ``num_classes`` ints (rows: truth; columns:
    prediction), every class included, even one that never occurs."""
    raise NotImplementedError
