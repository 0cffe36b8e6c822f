"""The accounting against independent references: PyTorch's FLOP counter on the real model, the
parameters of the real model, and the memory a real training step holds."""

import json

import pytest
import torch

from experiments.accounting import counted  # FlopCounterMode on the real model, per token
from src import flops
from src.flops import (
    PeakMemory,
    matmul_parameters,
    parameter_count,
    peak_matmul_flops,
    six_n_flops_per_token,
    training_flops_per_token,
    training_memory,
)
from src.model import PRESETS, GPTConfig, GPTModel, count_parameters
from src.training import adamw, cross_entropy

pytestmark = pytest.mark.usefixtures("one_thread")
BIG = {"gpt2-large", "gpt2-xl"}  # a few seconds each, even on the meta device
CONFIGS = [
    pytest.param(name, {}, id=name, marks=[pytest.mark.slow] if name in BIG else [])
    for name in PRESETS
] + [
    pytest.param("cpu-tiny", {"qkv_bias": True, "tie_weights": True}, id="cpu-tiny-bias-tied"),
    pytest.param("cpu-small", {"attn_impl": "sdpa", "context_length": 100}, id="cpu-small-sdpa"),
    # The modern switches one by one on the default model, and cpu-llama (all of them) through SDPA.
    pytest.param("cpu-small", {"ff": "swiglu"}, id="cpu-small-swiglu"),
    pytest.param("cpu-small", {"n_kv_heads": 1}, id="cpu-small-multi-query"),
    pytest.param("cpu-small", {"head_dim": 96, "qk_norm": True}, id="cpu-small-wide-heads-qk-norm"),
    pytest.param(
        "cpu-small", {"norm": "rmsnorm", "pos_emb": "rope", "bias": False}, id="cpu-small-rms-rope"
    ),
    pytest.param("cpu-llama", {"attn_impl": "sdpa"}, id="cpu-llama-sdpa"),
]


@pytest.mark.parametrize("name, overrides", CONFIGS)
def test_flops_per_token_equal_the_flop_counter(name, overrides):
    cfg = GPTConfig.from_preset(name, **overrides)
    assert training_flops_per_token(cfg) == pytest.approx(counted(cfg), rel=0.01)


@pytest.mark.parametrize("name, overrides", CONFIGS)
def test_parameter_counts_equal_the_model(name, overrides):
    cfg = GPTConfig.from_preset(name, **overrides)
    with torch.device("meta"):
        model = GPTModel(cfg)
    assert parameter_count(cfg) == count_parameters(model)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert matmul_parameters(cfg) == linear


def test_six_n_leaves_out_attention_over_the_context():
    cfg = PRESETS["gpt2-small"]
    missing = training_flops_per_token(cfg) - six_n_flops_per_token(cfg)
    assert missing == 12 * cfg.n_layers * cfg.context_length * cfg.emb_dim
    assert missing / training_flops_per_token(cfg) == pytest.approx(0.133, abs=0.001)


def test_peak_memory_counts_new_storages_until_they_die():
    with PeakMemory() as m:
        a = torch.empty(1000)  # 4,000 bytes
        b = torch.empty(2000)  # 8,000
        a.add_(1)  # in place: no new memory
        view = b.view(2, 1000)  # a view: none either
        del a
        c = torch.empty(500)  # 2,000, after a's 4,000 were freed
    assert (m.peak, m.now) == (12_000, 10_000)
    assert view.shape == (2, 1000) and c.numel() == 500


def measured_step(cfg: GPTConfig, batch_size: int, checkpointing: bool) -> int:
    """Bytes a real second training step holds at its fullest: the weights and AdamW's moments
    that exist before it, and the most it allocates on top."""
    from src.train import checkpoint_blocks

    model = GPTModel(cfg)
    optimizer = adamw(model, 1e-3, 0.1)
    if checkpointing:
        checkpoint_blocks(model)
    x, y = (torch.randint(0, cfg.vocab_size, (batch_size, cfg.context_length)) for _ in range(2))

    def step():
        cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # the first step creates AdamW's moments
    held = sum(p.nbytes for p in model.parameters())
    held += sum(v.nbytes for s in optimizer.state.values() for v in s.values())
    with PeakMemory() as peak:
        step()
    return held + peak.peak


@pytest.mark.parametrize(
    "overrides, batch_size, checkpointing",
    [({}, 8, False), ({"drop_rate": 0.1}, 8, False), ({}, 8, True),
     ({"tie_weights": True, "qkv_bias": True}, 4, False),
     ({"vocab_size": 4096, "emb_dim": 256, "n_heads": 4, "context_length": 16}, 1, False)],
    ids=["plain", "dropout", "checkpointing", "tied-bias", "weights-dominate"],
)  # fmt: skip
def test_memory_estimate_matches_a_measured_step(overrides, batch_size, checkpointing):
    cfg = GPTConfig.from_preset("cpu-tiny", **overrides)
    estimate = training_memory(cfg, batch_size, checkpointing)
    assert estimate.peak == pytest.approx(measured_step(cfg, batch_size, checkpointing), rel=0.05)


def test_checkpointing_saves_most_of_the_activations():
    cfg = GPTConfig.from_preset("cpu-small")
    plain, kept = (training_memory(cfg, 8, c).activations for c in (False, True))
    assert kept < plain / 4


def test_peak_rate_is_measured_once_per_device_and_dtype(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT_CACHE_DIR", str(tmp_path))
    cpu = torch.device("cpu")
    measured = []
    monkeypatch.setattr(flops, "_measure_matmul", lambda d, t: measured.append(t) or 1e10)
    assert peak_matmul_flops(cpu, torch.float32) == 1e10
    assert peak_matmul_flops(cpu, torch.float32) == 1e10
    peak_matmul_flops(cpu, torch.bfloat16)
    assert measured == [torch.float32, torch.bfloat16]  # each once
    cached = json.loads((tmp_path / "peak-matmul.json").read_text())
    assert sorted(k.split(", ")[-2] for k in cached) == ["bfloat16", "float32"]
    (tmp_path / "peak-matmul.json").write_text("{not json")
    assert peak_matmul_flops(cpu, torch.float32) == 1e10 and len(measured) == 3  # measured anew


def test_the_measured_peak_is_a_real_rate(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT_CACHE_DIR", str(tmp_path))
    rate = peak_matmul_flops(torch.device("cpu"), torch.float32)
    assert 1e8 < rate < 1e14  # a CPU thread: somewhere between 0.1 GFLOP/s and 100 TFLOP/s


def test_the_memory_estimate_refuses_a_block_it_does_not_count():
    with pytest.raises(ValueError, match="GPT-2's block only"):
        training_memory(GPTConfig.from_preset("cpu-llama"), 8)
