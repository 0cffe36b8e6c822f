"""Finetuning to follow instructions: the answers, and the cases each one is checked on.

References: the project's own ``src.instruct.format_prompt``, ``collate`` and ``token_f1``, which
``tests/test_instruct.py`` pins down on hand-made examples.
"""

import re
from collections import Counter

import torch

from exercises.checker import Case, Exercise
from src import instruct

# --8<-- [start:format_prompt]
PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)


def format_prompt(entry: dict[str, str]) -> str:
    text = f"{PREAMBLE}\n\n### Instruction:\n{entry['instruction']}"
    if entry["input"]:  # no input, no section
        text += f"\n\n### Input:\n{entry['input']}"
    return text + "\n\n### Response:\n"


# --8<-- [end:format_prompt]


# --8<-- [start:collate]
def collate(
    batch: list[tuple[list[int], int]], pad_id: int, mask_prompt: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(ids) for ids, _ in batch) - 1
    inputs = torch.full((len(batch), T), pad_id)
    targets = torch.full((len(batch), T), -100)  # masked by position: past each example's end
    for row, (ids, prompt_length) in enumerate(batch):
        inputs[row, : len(ids) - 1] = torch.tensor(ids[:-1])
        targets[row, : len(ids) - 1] = torch.tensor(ids[1:])  # ends with the end-of-text target
        if mask_prompt:  # target j is token j + 1: the prompt's tokens 1 .. prompt_length - 1
            targets[row, : prompt_length - 1] = -100
    return inputs, targets


# --8<-- [end:collate]


# --8<-- [start:token_f1]
def token_f1(response: str, reference: str) -> float:
    got, want = re.findall(r"\w+", response.lower()), re.findall(r"\w+", reference.lower())
    if not got or not want:
        return float(got == want)  # both empty: 1; one empty: 0
    common = sum((Counter(got) & Counter(want)).values())  # & keeps the smaller count of each word
    if common == 0:
        return 0.0
    precision, recall = common / len(got), common / len(want)
    return 2 * precision * recall / (precision + recall)


# --8<-- [end:token_f1]


def _entry(instruction, input_="", output="..."):
    return {"instruction": instruction, "input": input_, "output": output}


EOT = 99  # end-of-text and padding in the hand-made batches


def _collate_cases(g):
    a = ([1, 2, 3, 4, 5, EOT], 3)  # prompt 1 2 3, response 4 5
    b = ([6, 7, 8, EOT], 2)  # prompt 6 7, response 8
    long = [(torch.randint(0, 50, (n,), generator=g).tolist() + [EOT], n // 2) for n in (9, 4, 6)]
    return [
        Case("a longer and a shorter example; the pad is the end-of-text id: the padding "
             "targets are -100, the end-of-text target after each response is kept", ([a, b], EOT, False)),
        Case("mask_prompt: the first target kept is the response's first token", ([a, b], EOT, True)),
        Case("one example: no padding at all", ([a], EOT, False)),
        Case("random examples, prompts masked", (long, EOT, True)),
        Case("random examples", (long, EOT, False)),
    ]  # fmt: skip


EXERCISES = [
    Exercise(
        "format_prompt", "the Alpaca prompt of an entry, the Input section only when there is input",
        reference=instruct.format_prompt,
        cases=lambda g: [
            Case("no input: the ### Input section is left out entirely",
                 (_entry("Name three primes."),)),
            Case("with input", (_entry("Translate to French.", "Good morning."),)),
            Case("an input that spans lines", (_entry("Sum these.", "1\n2\n3"),)),
            Case("the output is not part of the prompt", (_entry("Say hi.", "", "Hi!"),)),
        ],  # fmt: skip
        hint="two newlines between sections, one after each header, and the prompt ends with "
        "'### Response:\\n'; leave out the whole Input section when entry['input'] is empty",
    ),
    Exercise(
        "collate", "inputs and -100-padded targets; the end-of-text target kept; the prompt masked if asked",
        reference=instruct.collate, cases=_collate_cases,
        hint="mask by position, not by value: the pad id IS the end-of-text id, so "
        "targets[targets == pad_id] = -100 also removes the one target that teaches the model to "
        "stop; with mask_prompt, target j predicts token j + 1, so mask the first prompt_length - 1",
    ),
    Exercise(
        "token_f1", "F1 of the words two texts share, each counted as often as it occurs in both",
        reference=instruct.token_f1,
        cases=lambda g: [
            Case("the same words; case and punctuation do not count: 1",
                 ("The answer is 4.", "the answer is 4")),
            Case("a repeated word counts as often as it occurs in both",
                 ("the the the cat", "the cat sat")),
            Case("half the words", ("Paris is big", "Paris is the capital of France")),
            Case("nothing in common: 0", ("yes", "no")),
            Case("an empty response: 0", ("", "42")),
            Case("two empty texts: 1", ("...", "")),
        ],  # fmt: skip
        hint="Counter(a) & Counter(b) keeps each shared word as often as it occurs in both; a set "
        "counts 'the the the' as one word; precision divides by the response's word count, recall "
        "by the reference's",
    ),
]  # fmt: skip
