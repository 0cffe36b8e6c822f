"""Typical wrong answers to the instructions chapter's exercises."""

import re

import torch


def format_prompt(entry):
    # Always writes the Input section, empty when there is no input.
    return (
        "Below is an instruction that describes a task. Write a response that appropriately "
        f"completes the request.\n\n### Instruction:\n{entry['instruction']}\n\n### Input:\n"
        f"{entry['input']}\n\n### Response:\n"
    )


def collate(batch, pad_id, mask_prompt):
    # Masks by value: every end-of-text target becomes -100, the one after the response too, so
    # the model never learns to stop. (And it forgets mask_prompt.)
    T = max(len(ids) for ids, _ in batch) - 1
    inputs = torch.tensor([ids[:-1] + [pad_id] * (T - len(ids) + 1) for ids, _ in batch])
    targets = torch.tensor([ids[1:] + [pad_id] * (T - len(ids) + 1) for ids, _ in batch])
    targets[targets == pad_id] = -100
    return inputs, targets


def token_f1(response, reference):
    # Sets instead of counts: a word repeated in the response is counted once.
    got, want = (
        set(re.findall(r"\w+", response.lower())),
        set(re.findall(r"\w+", reference.lower())),
    )
    if not got or not want:
        return float(got == want)
    common = len(got & want)
    if common == 0:
        return 0.0
    precision, recall = common / len(got), common / len(want)
    return 2 * precision * recall / (precision + recall)
