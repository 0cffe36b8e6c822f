"""The scaling-laws lab (``experiments/scaling.py``): its fits recover a law they are given, and
its grid runs, is written down, and continues after an interruption."""

import importlib.util
import json
import math
from dataclasses import replace

import numpy as np
import pytest
from conftest import REPO

spec = importlib.util.spec_from_file_location("scaling", REPO / "experiments" / "scaling.py")
scaling = importlib.util.module_from_spec(spec)
spec.loader.exec_module(scaling)

pytestmark = pytest.mark.usefixtures("one_thread")
LAW = {"E": 1.5, "A": 50.0, "B": 80.0, "alpha": 0.4, "beta": 0.3}  # known, a made-up law


def synthetic_runs(noise: float) -> list[dict]:
    """An IsoFLOP grid whose losses follow ``LAW``, each off by a relative ``noise`` at most."""
    rng = np.random.default_rng(0)
    runs = []
    for C in (1e11, 3e11, 1e12, 3e12, 1e13):
        N_opt, _ = scaling.optimal_allocation(LAW, C)
        for N in N_opt * np.geomspace(1 / 8, 8, 7):
            D = C / (6 * N)
            loss = LAW["E"] + LAW["A"] / N ** LAW["alpha"] + LAW["B"] / D ** LAW["beta"]
            runs.append({"budget": C, "C": C, "N": N, "D": D,
                         "val_loss": loss * (1 + noise * rng.uniform(-1, 1))})  # fmt: skip
    return runs


def test_the_optimal_allocation_spends_the_budget_where_the_law_is_lowest():
    C = 1e12
    N_opt, D_opt = scaling.optimal_allocation(LAW, C)
    assert 6 * N_opt * D_opt == pytest.approx(C)
    law = lambda N: LAW["E"] + LAW["A"] / N ** LAW["alpha"] + LAW["B"] / (C / 6 / N) ** LAW["beta"]  # noqa: E731
    assert law(N_opt) < min(law(N_opt * 0.9), law(N_opt * 1.1))


@pytest.mark.slow
def test_the_parametric_fit_recovers_a_known_law():
    runs = synthetic_runs(noise=0.003)
    fit = scaling.fit_law(
        [r["N"] for r in runs], [r["D"] for r in runs], [r["val_loss"] for r in runs]
    )
    assert fit["alpha"] == pytest.approx(LAW["alpha"], abs=0.03)
    assert fit["beta"] == pytest.approx(LAW["beta"], abs=0.03)
    assert fit["E"] == pytest.approx(LAW["E"], abs=0.05)


def test_the_isoflop_parabolas_recover_the_exponents():
    minima = scaling.isoflop_minima(synthetic_runs(noise=0.003))
    assert len(minima) == 5
    a, _ = scaling.power_law([m["C"] for m in minima], [m["N_opt"] for m in minima])
    b, _ = scaling.power_law([m["C"] for m in minima], [m["D_opt"] for m in minima])
    true_a = LAW["beta"] / (LAW["alpha"] + LAW["beta"])  # 0.43
    assert a == pytest.approx(true_a, abs=0.03) and b == pytest.approx(1 - true_a, abs=0.03)


def first_runs(design, n_train):
    """The runs each budget of ``design`` starts from, before any window is widened."""
    return [run for options in scaling.sizes(design, n_train).values()
            for run in (options[i] for i in scaling.first_window(options, design))]  # fmt: skip


def test_the_plan_spends_each_budget_and_reads_no_token_twice():
    for design in (scaling.QUICK, scaling.FULL):
        runs = first_runs(design, n_train=13_000_000)
        assert len(runs) >= 10 and len({r["budget"] for r in runs}) >= 3
        tokens_per_step = design.batch_size * design.context_length
        for r in runs:
            assert r["C"] == pytest.approx(r["budget"], rel=0.05)  # whole steps: a little off
            assert r["D"] == r["steps"] * tokens_per_step <= 13_000_000
    runs = first_runs(scaling.FULL, n_train=13_000_000)
    assert all(sum(r["budget"] == budget for r in runs) >= 5 for budget in scaling.FULL.budgets)


def test_a_window_widens_towards_a_minimum_at_its_edge():
    # losses of the window's sizes, smallest model first; 10 sizes fit the budget in all
    assert scaling.widened(range(2, 6), [3.0, 3.1, 3.2, 3.3], 10) == range(1, 6)
    assert scaling.widened(range(2, 6), [3.3, 3.2, 3.1, 3.0], 10) == range(2, 7)
    assert scaling.widened(range(2, 6), [3.2, 3.0, 3.1, 3.3], 10) == range(2, 6)  # inside
    assert scaling.widened(range(0, 4), [3.0, 3.1, 3.2, 3.3], 10) == range(0, 4)  # none smaller
    assert scaling.widened(range(6, 10), [3.3, 3.2, 3.1, 3.0], 10) == range(6, 10)  # none larger


TINY = scaling.Design(budgets=(3e8,), depths=(1, 2, 3), sizes_per_budget=3, vocab_size=300,
                      context_length=16, batch_size=2, min_steps=2, eval_windows=4)  # fmt: skip


@pytest.fixture
def tiny_lab(tmp_path, monkeypatch):
    """The lab's code on a tiny design: three models of a few steps on 40 KB of text."""
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(topics[k] for k in sorted(topics))[:40_000])
    monkeypatch.setenv("GPT_CACHE_DIR", str(tmp_path / "cache"))
    trained = []
    train_run = scaling.train_run

    def counted(run, *args):
        trained.append(run["depth"])
        return train_run(run, *args)

    monkeypatch.setattr(scaling, "train_run", counted)
    return replace(TINY, data=str(corpus)), trained


@pytest.mark.slow
def test_the_lab_writes_its_results_and_continues_where_it_stopped(tmp_path, tiny_lab):
    design, trained = tiny_lab
    out = tmp_path / "lab"
    runs = scaling.run_grid(design, out, jobs=1)
    assert sorted(trained) == [1, 2, 3] and len(runs) == 3
    result = scaling.analyse(runs)
    assert set(result) >= {"runs", "fit", "a", "b", "tokens_per_param"}
    assert set(result["fit"]) == {"E", "A", "B", "alpha", "beta"}
    for r in result["runs"]:
        assert {"N", "D", "C", "val_loss"} <= set(r) and math.isfinite(r["val_loss"])
        assert r["C"] == pytest.approx(r["D"] * scaling.training_flops_per_token(
            scaling.model_config(r["depth"], design)))  # fmt: skip
    json.dumps(result, allow_nan=False)  # plain JSON
    scaling.plot(result, out / "scaling.png")
    assert (out / "scaling.png").read_bytes()[:4] == b"\x89PNG"
    # An interrupted lab: one run's file is missing. Only that run is trained again.
    files = sorted((out / "runs").glob("*.json"))
    assert len(files) == 3
    files[1].unlink()
    trained.clear()
    again = scaling.run_grid(design, out, jobs=1)
    assert len(trained) == 1 and len(again) == 3
    assert [r["val_loss"] for r in again] == pytest.approx([r["val_loss"] for r in runs], rel=1e-5)
    # The Break it (experiments/compute.py): the same runs on a sliver of the data, repeated. The
    # lab's runs come from the cache; only the starved ones train.
    trained.clear()
    table = scaling.too_little_data(design, out, jobs=1, distinct=64)
    assert sorted(trained) == [1, 2, 3] and len(table.splitlines()) == 2 + 3
    assert len(list((out / "runs").glob("*.json"))) == 6
