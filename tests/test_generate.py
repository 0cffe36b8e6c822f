"""Generation: the KV cache changes nothing but speed; each sampling rule does what it says."""

import os
from pathlib import Path

import pytest
import torch

from src.attention import KVCache
from src.generate import generate, sample_next, stream
from src.model import GPTConfig, GPTModel

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster

REPO = Path(__file__).resolve().parent.parent


def tiny_model(context_length: int = 24, drop_rate: float = 0.0, **kw) -> GPTModel:
    cfg = GPTConfig.from_preset(
        "cpu-tiny", vocab_size=97, context_length=context_length, drop_rate=drop_rate, **kw
    )
    return GPTModel(cfg).eval()


@pytest.mark.parametrize("attn_impl", ["eager", "sdpa"])
@pytest.mark.parametrize("qkv_bias", [False, True])
def test_cached_logits_equal_full_recompute(attn_impl, qkv_bias):
    model = tiny_model(attn_impl=attn_impl, qkv_bias=qkv_bias)
    idx = torch.randint(0, 97, (3, 20))
    full = model(idx)  # (B, T, V): the reference, no cache
    cache = [KVCache() for _ in model.trf_blocks]
    pieces = [model(idx[:, :7], kv_cache=cache)]  # a prompt, then one token at a time
    pieces += [model(idx[:, t : t + 1], kv_cache=cache) for t in range(7, 20)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache[0].length == 20


@pytest.mark.parametrize(
    "prompt_len, new", [(1, 10), (5, 40), (24, 5)], ids=["short", "slides", "full"]
)
def test_kv_cache_greedy_tokens_identical(prompt_len, new):
    # "slides" and "full" run past the context window, where the cache must be rebuilt.
    model = tiny_model()
    idx = torch.randint(0, 97, (2, prompt_len))
    cached = generate(model, idx, new, 24, use_cache=True)
    uncached = generate(model, idx, new, 24, use_cache=False)
    assert cached.shape == (2, prompt_len + new)
    assert torch.equal(cached, uncached)


def test_kv_cache_sampled_tokens_identical_with_same_generator():
    model = tiny_model()
    idx = torch.randint(0, 97, (2, 3))
    a = generate(model, idx, 30, 24, temperature=1.0, top_k=20, top_p=0.9,
                 generator=torch.Generator().manual_seed(5), use_cache=True)  # fmt: skip
    b = generate(model, idx, 30, 24, temperature=1.0, top_k=20, top_p=0.9,
                 generator=torch.Generator().manual_seed(5), use_cache=False)  # fmt: skip
    assert torch.equal(a, b)


def test_model_rejects_cache_overflow():
    model = tiny_model(context_length=8)
    cache = [KVCache() for _ in model.trf_blocks]
    model(torch.zeros(1, 8, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="exceeds context_length"):
        model(torch.zeros(1, 1, dtype=torch.long), kv_cache=cache)


def test_greedy_and_top_k_1_are_argmax():
    logits = torch.randn(4, 50)
    expected = logits.argmax(-1, keepdim=True)
    assert torch.equal(sample_next(logits), expected)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample_next(logits, temperature=1.5, top_k=1, generator=g), expected)
    assert torch.equal(sample_next(logits, temperature=1.0, top_p=1e-6, generator=g), expected)


def drawn(logits: torch.Tensor, n: int = 4000, **kw) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    samples = sample_next(logits.expand(n, -1), generator=g, **kw)[:, 0]
    return torch.bincount(samples, minlength=logits.shape[-1])


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])  # sorted: 0.5, 0.3, 0.15, 0.05
    logits = probs.log()
    counts = drawn(logits, temperature=1.0, top_p=0.7)  # 0.5 < 0.7, 0.5 + 0.3 reaches it
    assert set(counts.nonzero().flatten().tolist()) == {1, 3}
    # Within the kept set the odds are renormalised: 0.5 : 0.3.
    assert counts[1] / counts.sum() == pytest.approx(0.5 / 0.8, abs=0.03)
    counts = drawn(logits, temperature=1.0, top_p=0.85)
    assert set(counts.nonzero().flatten().tolist()) == {1, 2, 3}
    assert set(drawn(logits, temperature=1.0, top_p=1.0).nonzero().flatten().tolist()) == {
        0, 1, 2, 3,
    }  # fmt: skip


def test_temperature_matches_softmax_of_scaled_logits():
    logits = torch.tensor([[1.0, 2.0, 0.5]])
    for t in (0.5, 2.0):
        counts = drawn(logits, n=20000, temperature=t).float()
        expected = torch.softmax(logits[0] / t, dim=-1)
        torch.testing.assert_close(counts / counts.sum(), expected, atol=0.015, rtol=0)


def test_top_k_never_draws_outside_the_k_best():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0, -1.0]])
    counts = drawn(logits, temperature=2.0, top_k=2)
    assert set(counts.nonzero().flatten().tolist()) == {1, 3}


def test_stream_yields_tokens_and_stops_at_end_of_text():
    model = tiny_model()
    idx = torch.randint(0, 97, (1, 4))
    first = generate(model, idx, 1, 24)[0, -1].item()  # whatever greedy picks first
    tokens = list(stream(model, idx, 10, 24, eos_id=first))
    assert len(tokens) == 1 and tokens[0].item() == first
    assert [t.shape for t in stream(model, idx, 5, 24)] == [(1, 1)] * 5


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny trained run, made by the trainer's own CLI."""
    import pydoc_data.topics

    from src import train

    root = tmp_path_factory.mktemp("gen")
    corpus = root / "docs.txt"
    topics = pydoc_data.topics.topics
    corpus.write_text("\n\n".join(topics[k] for k in sorted(topics))[:20_000])
    os.environ["GPT_CACHE_DIR"], saved = str(root / "cache"), os.environ.get("GPT_CACHE_DIR")
    try:
        code = train.main(["--preset", "cpu-tiny", "--vocab-size", "280", "--context-length",
                           "32", "--batch-size", "4", "--max-steps", "20", "--eval-iters", "1",
                           "--data", str(corpus), "--out-dir", str(root / "run")])  # fmt: skip
    finally:
        os.environ.pop("GPT_CACHE_DIR")
        if saved is not None:
            os.environ["GPT_CACHE_DIR"] = saved
    assert code == 0
    return root / "run"


def run_generate(capsys, *args: str) -> tuple[int, str, str]:
    """The command, in this process: its exit code, what it printed and what it said."""
    from src import generate as cli

    capsys.readouterr()
    code = cli.main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_streams_same_text_with_and_without_cache(checkpoint, capsys):
    args = ["--checkpoint", str(checkpoint), "--prompt", "The ", "--temperature", "0",
            "--max-new-tokens", "30"]  # fmt: skip
    code, with_cache, said = run_generate(capsys, *args)
    assert code == 0, said
    assert with_cache.startswith("The ") and len(with_cache) > len("The ") + 10
    assert "KV cache on" in said
    code, without, said = run_generate(capsys, *args, "--no-kv-cache")
    assert code == 0 and without == with_cache and "KV cache off" in said


def test_cli_errors_are_one_line(tmp_path, checkpoint, capsys):
    for args, message in [
        (["--checkpoint", str(tmp_path)], "no checkpoint in"),
        (["--checkpoint", str(checkpoint), "--top-p", "1.5"], "top_p must be in (0, 1]"),
    ]:
        code, _, said = run_generate(capsys, *args)
        assert code != 0 and message in said and "Traceback" not in said


def test_cli_prints_characters_split_across_tokens_and_survives_invalid_bytes(
    checkpoint, monkeypatch, capsys
):
    from src import generate as cli
    from src.checkpoints import load_model

    _, tokenizer, _ = load_model(checkpoint, torch.device("cpu"))
    byte_id = {tokenizer.decode_bytes([i]): i for i in range(256, -1, -1) if i < tokenizer.n_vocab}
    # "é" split over two tokens, a lone continuation byte that no character can use, text after
    # it, and a character cut off by the end of generation.
    pieces = [b"\xc3", b"\xa9", b"\x94", b"o", b"k", b"\xe2", b"\x82"]
    ids = [byte_id[p] for p in pieces]
    monkeypatch.setattr(cli, "stream", lambda *args, **kw: iter(torch.tensor(ids)))
    assert cli.main(["--checkpoint", str(checkpoint), "--prompt", "x"]) == 0
    assert capsys.readouterr().out == "x\u00e9\ufffdok\ufffd"
