"""Break it, chapter "Generating text": greedy decoding loops; a temperature that is too high.

Both start from the tiny model trained for 400 steps on the default corpus and generate from 16
prompts of 8 tokens taken from the validation split, with a seeded generator.
"""

import math

import numpy as np
import torch

from benchmarks.harness import markdown_table
from experiments.harness import TINY, corpus_tokens, evaluate, pretrained_tiny, windows
from src.generate import generate

PRETRAINING_STEPS = 400


def prompts(tokens: np.ndarray, n: int = 16, length: int = 8) -> torch.Tensor:
    """``n`` prompts of ``length`` tokens, spread evenly over ``tokens``: (n, length)."""
    starts = np.linspace(0, len(tokens) - length - 1, n).astype(int)
    return torch.tensor(np.stack([tokens[s : s + length] for s in starts]), dtype=torch.long)


def repeated_ngrams(tokens: torch.Tensor, n: int = 4) -> float:
    """Fraction of the n-grams in each row that already occurred earlier in that row."""
    repeated = total = 0
    for row in tokens.tolist():
        seen = set()
        for i in range(len(row) - n + 1):
            gram = tuple(row[i : i + n])
            repeated += gram in seen
            seen.add(gram)
            total += 1
    return repeated / total


# --8<-- [start:greedy-loops]
DECODINGS = {
    "greedy": {},  # temperature 0: always the most likely token
    "temperature 0.7": dict(temperature=0.7),
    "temperature 1.0": dict(temperature=1.0),
    "temperature 1.0, top-k 40": dict(temperature=1.0, top_k=40),
    "temperature 1.0, top-p 0.9": dict(temperature=1.0, top_p=0.9),
}
# --8<-- [end:greedy-loops]


def greedy_loops(new_tokens: int = 200) -> str:
    """Greedy decoding against sampling: how much of the generated text repeats itself."""
    model, (_, val_tokens) = pretrained_tiny(PRETRAINING_STEPS), corpus_tokens()
    start = prompts(val_tokens)
    rows = []
    for label, sampling in DECODINGS.items():
        generator = torch.Generator().manual_seed(0)
        out = generate(
            model, start, new_tokens, TINY.context_length, generator=generator, **sampling
        )
        rows.append([label, f"{repeated_ngrams(out[:, start.shape[1] :]):.0%}"])
    real = torch.tensor(val_tokens[: 16 * new_tokens].astype(np.int64)).view(16, new_tokens)
    rows.append(
        [f"(real validation text, 16 x {new_tokens} tokens)", f"{repeated_ngrams(real):.0%}"]
    )
    return markdown_table(["decoding", f"repeated 4-grams in {new_tokens} new tokens"], rows)


# --8<-- [start:high-temperature]
def sampling_log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / temperature): a high temperature flattens it towards uniform."""
    return torch.log_softmax(logits / temperature, dim=-1)


# --8<-- [end:high-temperature]


def high_temperature(temperatures: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0, 5.0)) -> str:
    """Sampling at rising temperature: entropy per token and how the model scores its own text."""
    model, (_, val_tokens) = pretrained_tiny(PRETRAINING_STEPS), corpus_tokens()
    start = prompts(val_tokens)
    new = TINY.context_length - start.shape[1]  # each row fills one context window
    rows = []
    for temperature in temperatures:
        generator = torch.Generator().manual_seed(0)
        out = generate(model, start, new, TINY.context_length, temperature=temperature,
                       generator=generator)  # fmt: skip
        with torch.no_grad():
            logits = model(out)[:, start.shape[1] - 1 : -1]  # the predictions of the new tokens
            own_loss = -torch.log_softmax(logits, dim=-1).gather(-1, out[:, start.shape[1] :, None])
            log_p = sampling_log_probs(logits, temperature)
            entropy = -(log_p.exp() * log_p).sum(-1).mean()
        rows.append([f"{temperature:g}", f"{entropy:.2f} of {math.log(TINY.vocab_size):.2f}",
                     f"{own_loss.mean():.2f}"])  # fmt: skip
    header = ["temperature", "entropy of the sampling distribution (nats)",
              "model's loss on its own samples (at temperature 1)"]  # fmt: skip
    real = evaluate(model, windows(val_tokens))
    return (
        markdown_table(header, rows)
        + f"\n\nValidation loss of the same model on real text: {real:.2f}."
    )


EXPERIMENTS = {"greedy-loops": greedy_loops, "high-temperature": high_temperature}
