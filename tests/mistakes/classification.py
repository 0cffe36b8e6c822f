"""Typical wrong answers to the classification chapter's exercises."""

import torch


def pad_batch(batch, pad_id):
    # Pads on the left: each text's last token lands at the end of the row, but every token now sits
    # at another position than it had alone, and lengths no longer say where a text ends.
    T = max(len(ids) for ids, _ in batch)
    ids = torch.tensor([[pad_id] * (T - len(tokens)) + tokens for tokens, _ in batch])
    lengths = torch.tensor([len(tokens) for tokens, _ in batch])
    return ids, lengths, torch.tensor([label for _, label in batch])


def last_token_logits(logits, lengths):
    # The last column of the padded batch: a padding position for every text shorter than the row.
    return logits[:, -1]


def confusion_matrix(predicted, true, num_classes):
    # Transposed: rows are the prediction and columns the truth.
    matrix = [[0] * num_classes for _ in range(num_classes)]
    for t, p in zip(true.tolist(), predicted.tolist(), strict=True):
        matrix[p][t] += 1
    return matrix
