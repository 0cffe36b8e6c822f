"""Your turn: finetuning to follow instructions. Check with ``uv run python -m exercises instructions``."""

import torch

PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)


def format_prompt(entry: dict[str, str]) -> str:
    """The Alpaca prompt for one entry ``{"instruction", "input", "output"}``: all the model sees
    before it starts to respond. Exactly this string, with the ``PREAMBLE`` above::

        f"{PREAMBLE}\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"

    where the part ``\n\n### Input:\n{input}`` is left out when the input is empty. The output
    is not part of the prompt: it is what the model learns to write after it.
    """
    raise NotImplementedError


def collate(
    batch: list[tuple[list[int], int]], pad_id: int, mask_prompt: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets (B, T) int64 for a batch of ``(ids, prompt_length)`` pairs.

    ``ids`` is prompt + response + one end-of-text token; its first ``prompt_length`` ids are the
    prompt. T is the longest ``len(ids) - 1`` of the batch. Row ``b``'s inputs are ``ids[:-1]``
    padded with ``pad_id``; its targets are ``ids[1:]`` (the next token at every position) padded
    with -100, which ``F.cross_entropy`` skips. ``pad_id`` is the end-of-text id, so the one
    end-of-text *target* that ends the response is kept: predicting it teaches the model to stop.
    With ``mask_prompt``, the targets that are prompt tokens are -100 too: the first target kept
    is the response's first token.
    """
    raise NotImplementedError


def token_f1(response: str, reference: str) -> float:
    """The overlap of two texts' words, as an F1 score between 0 and 1.

    Words are ``re.findall(r"\\w+", text.lower())``. The words in common count as often as they
    occur in both (``"the the cat"`` and ``"the dog"`` share one ``the``); precision is
    common / words of the response, recall common / words of the reference, F1 their harmonic
    mean, and 0 when nothing is shared. Two texts without words score 1; one without, 0.
    """
    raise NotImplementedError
