"""The efficiency experiments' own arithmetic (``experiments/efficiency.py``): when a run reaches a
target; and what the chapter's Break-it optimizer (``experiments/compute.py``) steps."""

import importlib.util

import pytest
from conftest import REPO

from experiments import compute
from src.model import GPTConfig, GPTModel

spec = importlib.util.spec_from_file_location("efficiency", REPO / "experiments" / "efficiency.py")
efficiency = importlib.util.module_from_spec(spec)
spec.loader.exec_module(efficiency)


def rows(evals: dict[int, float], tokens_per_sec: float = 2048.0) -> list[dict]:
    """Metrics rows of a run of 40 steps, one second each, evaluated where ``evals`` says."""
    out = []
    for step in range(41):
        row = {"step": step, "tokens_per_sec": tokens_per_sec}
        if step in evals:
            row["val_loss"] = evals[step]
        out.append(row)
    return out


def test_the_step_a_target_is_reached_is_interpolated_between_evaluations():
    run = rows({0: 9.0, 10: 6.0, 20: 5.0, 30: 4.5, 40: 4.4})
    step, seconds = efficiency.to_target(run, 4.75)
    assert step == pytest.approx(25.0)  # halfway from 5.0 at step 20 to 4.5 at step 30
    assert seconds == pytest.approx(25.0)  # 25 steps of 8 x 256 tokens at 2,048 tokens/s
    assert efficiency.to_target(run, 4.0) == (None, None)  # never reached


def test_muon_everywhere_puts_the_embeddings_and_the_head_under_muon():
    model = GPTModel(GPTConfig.from_preset("cpu-tiny"))
    matrices, vectors = compute.muon_everywhere(model, 1e-3, 0.1).param_groups
    assert matrices["muon"] and not vectors["muon"]
    names = {id(p): n for n, p in model.named_parameters()}
    muon_names = {names[id(p)] for p in matrices["params"]}
    assert {"tok_emb.weight", "pos_emb.weight", "out_head.weight"} <= muon_names
