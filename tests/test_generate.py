"""Generation: the KV cache changes nothing but speed; each sampling rule does what it says; a
batch of padded prompts writes what each prompt writes alone; speculative decoding writes what the
target writes alone, token for token when greedy, in distribution when sampling."""

import os
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import src.generate
from benchmarks.inference import ConcatKVCache
from src.attention import KVCache
from src.errors import UserError
from src.generate import (
    accept_or_resample,
    generate,
    left_pad,
    sample_next,
    speculative_generate,
    speculative_rounds,
    stream,
)
from src.model import LLAMA_STYLE, GPTConfig, GPTModel

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


def test_cli_draft_writes_the_same_greedy_text_and_quantize_says_so(checkpoint, capsys):
    args = ["--checkpoint", str(checkpoint), "--prompt", "The ", "--temperature", "0",
            "--max-new-tokens", "30"]  # fmt: skip
    _, alone, _ = run_generate(capsys, *args)
    # The checkpoint drafting for itself: every draft token is the target's own argmax.
    code, drafted, said = run_generate(capsys, *args, "--draft", str(checkpoint))
    assert code == 0 and drafted == alone, said
    assert "draft tokens accepted 100% (4 per round)" in said
    code, _, said = run_generate(capsys, *args, "--quantize", "int4", "--group-size", "32")
    assert code == 0 and "weights int4, a scale per 32 weights" in said
    code, _, said = run_generate(capsys, *args, "--group-size", "32")
    assert code == 2 and "--group-size needs --quantize" in said


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


# --- the preallocated cache ------------------------------------------------------------------


class CopySizes(TorchDispatchMode):
    """Records the number of elements every copying operation writes (cat, copy_, clone, ...)."""

    COPIES = {"aten.cat.default", "aten.stack.default", "aten.copy_.default",
              "aten.clone.default", "aten._to_copy.default"}  # fmt: skip

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if str(func) in self.COPIES:
            self.sizes.append(out.numel())
        return out


def largest_copy_per_step(model, cache_class, steps: int) -> list[int]:
    """Decode ``steps`` tokens through ``cache_class``; the largest copy of each step."""
    cache = [cache_class(steps + 5) for _ in model.trf_blocks]
    ids, largest = torch.zeros(1, 5, dtype=torch.long), []
    with torch.no_grad():
        model(ids, kv_cache=cache)
        for _ in range(steps):
            with CopySizes() as copies:
                model(ids[:, -1:], kv_cache=cache)
            largest.append(max(copies.sizes, default=0))
    return largest


def test_a_decoding_step_copies_nothing_that_grows_with_the_position():
    model = tiny_model(context_length=256)
    largest = largest_copy_per_step(model, KVCache, 200)
    assert max(largest) == largest[0] <= 64  # one token's key or value (2 heads x 32), at most
    # The check sees the copies that do grow: a cache grown by torch.cat copies the whole prefix.
    grown = largest_copy_per_step(model, ConcatKVCache, 200)
    assert grown == [(6 + step) * 64 for step in range(200)]  # every step: the whole prefix


@pytest.mark.slow
def test_generating_1000_tokens_copies_nothing_that_grows_with_the_position():
    model = tiny_model(context_length=1024)
    with CopySizes() as copies:
        steps = stream(model, torch.zeros(1, 5, dtype=torch.long), 1000, 1024)
        largest = []
        for _ in steps:
            largest.append(max(copies.sizes, default=0))
            copies.sizes.clear()
    assert len(largest) == 1000 and max(largest[1:]) <= 64  # after the prefill: one token's k, v


def test_the_cache_is_one_buffer_written_in_place():
    model = tiny_model(context_length=64)
    cache = [KVCache() for _ in model.trf_blocks]
    with torch.no_grad():
        model(torch.zeros(2, 5, dtype=torch.long), kv_cache=cache)
        buffer = cache[0].keys.data_ptr()
        for _ in range(30):
            model(torch.zeros(2, 1, dtype=torch.long), kv_cache=cache)
    assert cache[0].keys.shape == (2, 2, 64, 32)  # allocated for the whole context at once
    assert cache[0].keys.data_ptr() == buffer and cache[0].k.shape == (2, 2, 35, 32)


def test_rewind_forgets_and_the_next_write_overwrites():
    model = tiny_model()
    idx = torch.randint(0, 97, (1, 12))
    cache = [KVCache() for _ in model.trf_blocks]
    with torch.no_grad():
        model(idx[:, :8], kv_cache=cache)
        model(torch.randint(0, 97, (1, 3)), kv_cache=cache)  # three tokens to be taken back
        for c in cache:
            c.rewind(8)
        again = model(idx[:, 8:], kv_cache=cache)
        torch.testing.assert_close(again, model(idx)[:, 8:], rtol=1e-5, atol=1e-5)


# --- a batch of prompts of different lengths -------------------------------------------------

BATCH_MODELS = {
    "gpt2": dict(),
    "llama": dict(**LLAMA_STYLE, n_heads=4, n_kv_heads=2),  # grouped heads, rotary positions
}


@pytest.mark.parametrize("kind", list(BATCH_MODELS))
@pytest.mark.parametrize("new", [10, 30], ids=["within", "past-the-window"])
def test_a_padded_batch_writes_what_each_prompt_writes_alone(kind, new):
    model = tiny_model(**BATCH_MODELS[kind])
    prompts = [[5, 17, 3], [8, 1, 90, 44, 2, 61, 7], [33], [12, 12, 40, 9]]
    idx, padding = left_pad(prompts, pad_id=0)
    assert idx.shape == (4, 7) and padding.tolist() == [4, 0, 6, 3]
    batch = generate(model, idx, new, 24, padding=padding)
    for row, prompt in enumerate(prompts):
        alone = generate(model, torch.tensor([prompt]), new, 24)[0]
        assert torch.equal(batch[row, padding[row] :], alone), row


def test_padding_needs_the_cache_and_every_prompt_a_token():
    model = tiny_model()
    idx, padding = left_pad([[1, 2], [3]], pad_id=0)
    with pytest.raises(UserError, match="need the KV cache"):
        generate(model, idx, 3, 24, use_cache=False, padding=padding)
    with pytest.raises(UserError, match="at least one token"):
        left_pad([[1, 2], []], pad_id=0)


# --- speculative decoding --------------------------------------------------------------------


def draft_model(**kw) -> GPTModel:
    """A smaller model than ``tiny_model``: one layer, half as wide."""
    torch.manual_seed(1)
    return tiny_model(n_layers=1, emb_dim=32, **kw)


@pytest.mark.parametrize("kind", list(BATCH_MODELS))
@pytest.mark.parametrize("draft_tokens", [1, 2, 4, 8])
def test_greedy_speculative_decoding_writes_what_the_target_writes(kind, draft_tokens):
    target, draft = tiny_model(**BATCH_MODELS[kind]), draft_model()
    for prompt_len, new in [(1, 10), (5, 17), (3, 40), (24, 6)]:  # the last two pass the window
        idx = torch.randint(0, 97, (2, prompt_len))
        expected = generate(target, idx, new, 24, temperature=0.0)
        got = speculative_generate(target, draft, idx, new, 24, draft_tokens=draft_tokens)
        assert torch.equal(got, expected), (prompt_len, new)


def test_greedy_speculative_decoding_stops_where_generate_stops():
    target, draft = tiny_model(), draft_model()
    idx = torch.randint(0, 97, (3, 4))
    plain = generate(target, idx, 15, 24)
    eos = plain[1, 9].item()  # a token row 1 writes: it ends there, the others perhaps later
    expected = generate(target, idx, 15, 24, eos_id=eos)
    assert torch.equal(speculative_generate(target, draft, idx, 15, 24, eos_id=eos), expected)


def test_a_draft_equal_to_the_target_is_always_accepted():
    target = tiny_model()
    rounds = list(speculative_rounds(target, target, torch.tensor([[4, 5, 6]]), 16, 24, 4))
    assert [(tokens.shape[1], k) for tokens, k in rounds] == [(5, 4), (5, 4), (5, 4), (1, 0)]


def test_speculative_decoding_refuses_what_cannot_work():
    target = tiny_model()
    with pytest.raises(UserError, match="same tokenizer"):
        other = GPTModel(GPTConfig.from_preset("cpu-tiny", vocab_size=50, context_length=24))
        speculative_generate(target, other, torch.tensor([[1]]), 3, 24)
    with pytest.raises(UserError, match="draft_tokens must be >= 1"):
        speculative_generate(target, target, torch.tensor([[1]]), 3, 24, draft_tokens=0)
    with pytest.raises(UserError, match="temperature"):
        speculative_generate(target, target, torch.tensor([[1]]), 3, 24, temperature=-1.0)


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-square test of ``counts`` against the exact ``probs``: the probability of a
    statistic at least this large if the counts were drawn from ``probs``. Cells expected fewer
    than 5 times are pooled into one. Drawing a token of probability 0 is impossible: p = 0."""
    counts, probs = counts.double().flatten(), probs.double().flatten()
    if counts[probs == 0].sum() > 0:
        return 0.0
    expected = probs * counts.sum()
    small = (expected < 5) & (probs > 0)
    big = ~small & (probs > 0)
    observed = torch.cat([counts[big], counts[small].sum()[None]])
    expected = torch.cat([expected[big], expected[small].sum()[None]])
    observed, expected = observed[expected > 0], expected[expected > 0]
    statistic = ((observed - expected) ** 2 / expected).sum()
    dof = torch.tensor((len(observed) - 1) / 2, dtype=torch.float64)
    return torch.special.gammaincc(dof, statistic / 2).item()  # the chi-square survival function


def test_the_chi_square_test_itself():
    # Known quantiles: chi2(1) exceeds 3.841 and chi2(5) exceeds 11.07 with probability 0.05.
    assert chi_square_p_value(torch.tensor([60, 40]), torch.tensor([0.5, 0.5])) == pytest.approx(
        0.0455, abs=1e-3)  # fmt: skip
    five = torch.special.gammaincc(torch.tensor(2.5), torch.tensor(11.07 / 2)).item()
    assert five == pytest.approx(0.05, abs=1e-3)


SIGNIFICANCE = 1e-3  # a distribution test fails when its p-value is below this


def accept_every_draft(p, q, drafted, generator):
    """The rule broken: keep every draft token, then draw one from the target."""
    return len(drafted), torch.multinomial(p[-1], 1, generator=generator)


def emitted_by_the_rule(rule, p, q, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` rounds of one rule on fixed distributions: counts of the first emitted token, and of
    the second among rounds that kept the first draft token."""
    g = torch.Generator().manual_seed(0)
    first, second = torch.zeros(p.shape[1]), torch.zeros(p.shape[1])
    for _ in range(n):
        drafted = torch.multinomial(q, 1, generator=g)[:, 0]  # (k,): the draft's proposals
        kept, after = rule(p, q, drafted, g)
        tokens = torch.cat([drafted[:kept], after])
        first[tokens[0]] += 1
        if kept >= 1:
            second[tokens[1]] += 1
    return first, second


def test_the_rejection_rule_gives_the_targets_distribution():
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(2 * torch.randn(3, 6, generator=g), dim=-1)  # the target at 3 positions
    q = torch.softmax(2 * torch.randn(2, 6, generator=g), dim=-1)  # a draft unlike it
    assert (p[:2] - q).abs().sum(-1).min() > 0.5  # total variation above 0.25 at each position
    first, second = emitted_by_the_rule(accept_or_resample, p, q, 5000)
    assert chi_square_p_value(first, p[0]) > SIGNIFICANCE
    assert chi_square_p_value(second, p[1]) > SIGNIFICANCE
    first, second = emitted_by_the_rule(accept_every_draft, p, q, 5000)
    assert chi_square_p_value(first, p[0]) < 1e-30  # what the draft proposes, not the target
    assert chi_square_p_value(first, q[0]) > SIGNIFICANCE


def peaked_model(seed: int, vocab_size: int = 6) -> GPTModel:
    """A random model of a tiny vocabulary whose next-token distributions are far from uniform."""
    torch.manual_seed(seed)
    cfg = GPTConfig.from_preset("cpu-tiny", vocab_size=vocab_size, context_length=8, emb_dim=16,
                                n_layers=1)  # fmt: skip
    model = GPTModel(cfg).eval()
    with torch.no_grad():
        model.out_head.weight.mul_(10.0)  # logits about a unit apart
    return model


def exact_first_two(target, prompt, sampling) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's own distribution of the first new token, (V,), and of the first two, (V, V)."""
    from src.generate import sampling_probs

    with torch.no_grad():
        first = sampling_probs(target(prompt)[0, -1], *sampling)
        V = first.shape[0]
        longer = torch.cat([prompt.expand(V, -1), torch.arange(V)[:, None]], dim=1)
        second = sampling_probs(target(longer)[:, -1], *sampling)  # (V, V): given each first
    return first, first[:, None] * second


@pytest.mark.slow
@pytest.mark.parametrize("sampling", [(1.0, None, None), (0.8, 4, 0.9)],
                         ids=["temperature-1", "top-k-top-p"])  # fmt: skip
def test_speculative_sampling_draws_from_the_targets_distribution(sampling, monkeypatch):
    target, draft = peaked_model(0), peaked_model(1)
    prompt = torch.tensor([[0, 3]])
    first, pairs = exact_first_two(target, prompt, sampling)
    n = 2000

    def sample() -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        out = speculative_generate(target, draft, prompt.expand(n, -1), 3, 8, draft_tokens=2,
                                   temperature=sampling[0], top_k=sampling[1],
                                   top_p=sampling[2], generator=g)  # fmt: skip
        return out[:, 2:4]  # the first two new tokens of every row

    new = sample()
    counts = torch.bincount(new[:, 0], minlength=6)
    assert chi_square_p_value(counts, first) > SIGNIFICANCE
    assert chi_square_p_value(torch.bincount(new[:, 0] * 6 + new[:, 1], minlength=36),
                              pairs) > SIGNIFICANCE  # fmt: skip
    # The negative control: without the rejection rule the same test fails.
    monkeypatch.setattr(src.generate, "accept_or_resample", accept_every_draft)
    broken = sample()
    assert chi_square_p_value(torch.bincount(broken[:, 0], minlength=6), first) < SIGNIFICANCE
