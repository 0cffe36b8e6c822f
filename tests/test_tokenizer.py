"""The BPE tokenizer against tiktoken (same ranks, pattern and specials -> same ids), against a naive
trainer, and against OpenAI's real GPT-2 files."""

import json
import subprocess
import sys
from collections import Counter

import pytest
import regex
import tiktoken
import tiktoken.load
from conftest import REPO
from hypothesis import example, given, settings
from hypothesis import strategies as st
from tiktoken_ext.openai_public import r50k_pat_str

from src.data import load_corpus
from src.errors import UserError
from src.tokenizer import BPETokenizer, get_tokenizer

EOT = "<|endoftext|>"

# Text of every kind a tokenizer can trip on.
VARIED = "\n".join(
    [
        "Hello, world! It's a test: we'll see, they're sure, I've, you'd, she'm. DON'T SHOUT'S",
        "Grüße aus Köln; façade, naïve, coöperate. Ελληνικά κείμενα. Русский текст, ёлка.",
        "العربية نص عربي. עברית כאן. हिन्दी पाठ यहाँ है। 中文文本，日本語のテキスト。한국어 텍스트.",
        "ภาษาไทย ไม่มีช่องว่าง. Ꭰ Cherokee, ᚠᚢᚦ runes, 𝔉𝔯𝔞𝔨𝔱𝔲𝔯 math letters.",
        "Emoji: 😀 👍🏽 👨‍👩‍👧‍👦 🇩🇪🇯🇵 ❤️ 🏳️‍🌈 and ZWJ\u200dinside, BOM\ufeffhere.",
        "Combining: e\u0301 a\u0308\u0304 n\u0303o Z\u0351\u0362a\u036a\u0337l\u0353g\u0339o\u0336.",
        "Spaces:  two   three    four\ttab\t\ttabs \t mixed\u00a0nbsp\u3000ideographic\u2028sep",
        "Newlines:\n\n\nthree\r\nCRLF\r\n\r\n  indented\n\t\ttabbed\n   \n",
        "Digits: 0 42 3.14159 1,000,000 2024-11-24 12:30 0x1F 1e-9 ١٢٣ ٤٥٦ ⅷ ½ ²³",
        "def f(x):\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n\n\nif __name__ == '__main__':",
        "Control: \x00\x01\x07\x1b[31mred\x1b[0m \x7f \x85 end",
        "Punctuation runs: ...!!!??? --- ___ *** ((())) <<>> ''' \"\"\" ``` ~~~ @@ ## $$",
        f"{EOT}starts, middle{EOT}glued{EOT}{EOT} twice, ends{EOT}",
        "trailing spaces   \n  \n\t",
    ]
)


@pytest.fixture(scope="module")
def tok() -> BPETokenizer:
    # The default corpus plus the varied text, so the learned merges cover several scripts.
    return BPETokenizer.train(load_corpus().text[:200_000] + VARIED * 3, vocab_size=2048)


@pytest.fixture(scope="module")
def reference(tok) -> tiktoken.Encoding:
    return tiktoken.Encoding(
        "trained",
        pat_str=tok.pattern,
        mergeable_ranks=tok.mergeable_ranks,
        special_tokens=tok.special_tokens,
    )


def test_trained_ids_equal_tiktoken_on_varied_text(tok, reference):
    assert tok.n_vocab == reference.n_vocab == 2048
    assert tok.eot_token == reference.eot_token == 2047
    for text in [VARIED, *VARIED.split("\n"), VARIED.replace(EOT, "")]:
        ids = tok.encode(text, allowed_special="all")
        assert ids == reference.encode(text, allowed_special="all")
        assert tok.decode(ids) == text
        # Special-token text treated as ordinary text.
        assert tok.encode(text, disallowed_special=()) == reference.encode(
            text, disallowed_special=()
        )
    assert EOT not in tok.decode(tok.encode(VARIED, disallowed_special=())[:5])


@pytest.mark.parametrize(
    "allowed, disallowed",
    [
        (set(), "all"),
        ("all", "all"),
        ({EOT}, "all"),
        (set(), ()),
        (set(), {EOT}),
        ({EOT}, ()),
        ({"<|pad|>", "<|unknown|>"}, ()),
    ],
)
def test_special_token_rules_match_tiktoken(allowed, disallowed):
    specials = ["<|endoftext|>", "<|pad|>", "<|end|>"]
    tok = BPETokenizer.train(VARIED, 300, special_tokens=specials)
    ref = tiktoken.Encoding(
        "t",
        pat_str=tok.pattern,
        mergeable_ranks=tok.mergeable_ranks,
        special_tokens=tok.special_tokens,
    )
    for text in [
        "plain text",
        f"a{EOT}b",
        "x<|pad|>y<|end|>",
        "<|end|><|endoftext|>",
        "<|end",
        "<|unknown|>",
    ]:
        try:
            expected = ref.encode(text, allowed_special=allowed, disallowed_special=disallowed)
        except ValueError:
            with pytest.raises(ValueError, match="special token"):
                tok.encode(text, allowed_special=allowed, disallowed_special=disallowed)
        else:
            assert (
                tok.encode(text, allowed_special=allowed, disallowed_special=disallowed) == expected
            )


def test_disallowed_special_text_raises_a_clear_error(tok):
    with pytest.raises(
        ValueError, match=r"contains the special token '<\|endoftext\|>'.*allowed_special"
    ):
        tok.encode(f"some text {EOT} more")


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_decode_inverts_encode_on_any_text(tok, text):
    assert tok.decode(tok.encode(text, disallowed_special=())) == text


# Any code point (surrogates included), mixed with the characters the split pattern cares about
# most, so whitespace runs, contractions and special-token text turn up often.
ANY_CHAR = st.characters(codec=None, exclude_categories=())
PATTERN_CHARS = st.sampled_from([*" \t\n\r\x0b\x0c\x85\xa0\u3000'sdmtlvre09aZé😀\u0301.,!", EOT])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(ANY_CHAR, PATTERN_CHARS), max_size=40).map("".join))
@example("lone \ud800 surrogate, \U00010940 Unicode 16 vs 17, tab\t\n")
def test_ids_equal_tiktoken_on_any_text(tok, reference, text):
    assert tok.encode(text, disallowed_special=()) == reference.encode(text, disallowed_special=())


def test_unicode_classes_agree_with_tiktoken_on_every_code_point():
    """The split pattern's classes must mean the same code points in `regex` and in tiktoken's
    engine. A pattern of one class, with only byte tokens, makes tiktoken return exactly the
    characters that class matches (text between matches is skipped)."""
    every = "".join(chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000)
    byte_ranks = {bytes([b]): b for b in range(256)}
    for cls in [r"\p{L}", r"\p{N}", r"\s", r"[^\s\p{L}\p{N}]"]:
        probe = tiktoken.Encoding(
            "probe", pat_str=cls, mergeable_ranks=byte_ranks, special_tokens={}
        )
        theirs = probe.decode(probe.encode(every, disallowed_special=()))
        assert "".join(regex.findall(cls, every)) == theirs, cls


def test_decode_replaces_invalid_utf8_like_tiktoken(tok, reference):
    ids = tok.encode("日本語 😀 ꙮ")
    decoded = [tok.decode(ids[:cut]) for cut in range(1, len(ids))]
    assert decoded == [reference.decode(ids[:cut]) for cut in range(1, len(ids))]
    assert any("\ufffd" in text for text in decoded)  # some cuts do fall inside a character


def _naive_train(text: str, vocab_size: int) -> dict[bytes, int]:
    """BPE by the documented rule, recounting every pair from scratch for every merge."""
    from src.tokenizer import BYTE_ORDER, GPT2_PATTERN

    vocab = [bytes([b]) for b in BYTE_ORDER]
    ranks = {t: i for i, t in enumerate(vocab)}
    words = Counter(
        tuple(ranks[bytes([b])] for b in w.encode()) for w in regex.findall(GPT2_PATTERN, text)
    )
    while len(vocab) < vocab_size:
        counts = Counter()
        for word, n in words.items():
            for pair in zip(word, word[1:], strict=False):
                counts[pair] += n
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], p))  # most frequent, then smallest ids
        token = vocab[best[0]] + vocab[best[1]]
        if token not in ranks:
            ranks[token] = len(vocab)
            vocab.append(token)
        merged = Counter()
        for word, n in words.items():
            out, i = [], 0
            while i < len(word):
                if word[i : i + 2] == best:
                    out.append(ranks[token])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += n
        words = merged
    return ranks


def test_training_equals_a_naive_trainer():
    text = load_corpus().text[:30_000] + VARIED
    tok = BPETokenizer.train(text, vocab_size=600, special_tokens=())
    assert tok.mergeable_ranks == _naive_train(text, 600)


def test_training_merges_the_most_frequent_pair_and_breaks_ties_by_smallest_ids():
    # Pre-tokens: "ab" x1, " cd" x2 -> pairs (a,b):1, (' ',c):2, (c,d):2. In GPT-2's byte order
    # a=64, b=65, c=66, d=67 and the space is 220, so the tie (220,66)/(66,67) goes to (c,d).
    tok = BPETokenizer.train("ab cd cd", vocab_size=259, special_tokens=())
    learned = sorted((r, t) for t, r in tok.mergeable_ranks.items() if r >= 256)
    assert learned == [(256, b"cd"), (257, b" cd"), (258, b"ab")]
    # Nothing left to merge: training stops early with a smaller vocabulary.
    assert BPETokenizer.train("ab cd cd", vocab_size=300, special_tokens=()).n_vocab == 259


def test_vocab_size_below_bytes_plus_specials_is_rejected():
    with pytest.raises(ValueError, match="vocab_size=256 is too small.*256 byte tokens \\+ 1"):
        BPETokenizer.train("some text", vocab_size=256)


def test_save_writes_readable_json_and_load_restores_it(tok, tmp_path):
    path = tmp_path / "tok.json"
    tok.save(path)
    model = json.loads(path.read_text("utf-8"))
    assert model["pattern"] == tok.pattern and model["special_tokens"] == {EOT: 2047}
    assert "Ġthe" in model["tokens"]  # " the", with GPT-2's printable stand-in for the space
    loaded = BPETokenizer.load(path)
    assert loaded.mergeable_ranks == tok.mergeable_ranks and loaded.fingerprint == tok.fingerprint
    assert loaded.encode(VARIED, allowed_special="all") == tok.encode(VARIED, allowed_special="all")


def test_load_rejects_a_file_that_is_not_a_tokenizer(tmp_path):
    bad = tmp_path / "other.json"
    bad.write_text('{"hello": 1}')
    with pytest.raises(ValueError, match="not a tokenizer saved by BPETokenizer.save"):
        BPETokenizer.load(bad)


def test_gpt2_files_written_from_a_trained_tokenizer_round_trip(tok, tmp_path):
    encoder, merges = tmp_path / "encoder.json", tmp_path / "vocab.bpe"
    tok.save_gpt2_files(encoder, merges)
    # tiktoken's own reader of the format rebuilds exactly our ranks ...
    assert (
        tiktoken.load.data_gym_to_mergeable_bpe_ranks(str(merges), str(encoder))
        == tok.mergeable_ranks
    )
    # ... and our reader gives a tokenizer that encodes exactly like the original.
    loaded = BPETokenizer.from_gpt2_files(encoder, merges)
    assert loaded.special_tokens == tok.special_tokens
    assert loaded.encode(VARIED, allowed_special="all") == tok.encode(VARIED, allowed_special="all")


def _real_gpt2(folder):
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
        str(folder / "vocab.bpe"), str(folder / "encoder.json")
    )
    return tiktoken.Encoding(
        "gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={EOT: 50256},
        explicit_n_vocab=50257,
    )


def test_real_gpt2_files_give_tiktokens_ids(reference_data):
    ours = BPETokenizer.from_gpt2_files(
        reference_data / "gpt2" / "encoder.json", reference_data / "gpt2" / "vocab.bpe"
    )
    theirs = _real_gpt2(reference_data / "gpt2")
    assert ours.n_vocab == 50257 and ours.eot_token == 50256
    assert ours.encode("Hello world") == [15496, 995]
    for text in [VARIED, *VARIED.split("\n")]:
        assert ours.encode(text, allowed_special="all") == theirs.encode(
            text, allowed_special="all"
        )
    story = (reference_data / "the-verdict.txt").read_text("utf-8")
    ids = ours.encode(story)
    assert ids == theirs.encode(story) and len(ids) == 5145
    assert ours.decode(ids) == story


def test_get_tokenizer_resolves_directories_and_saved_files(tok, tmp_path):
    tok.save(tmp_path / "saved.json")
    tok.save_gpt2_files(tmp_path / "encoder.json", tmp_path / "vocab.bpe")
    for spec in [tmp_path / "saved.json", tmp_path]:
        got = get_tokenizer(str(spec))
        assert isinstance(got, BPETokenizer) and got.mergeable_ranks == tok.mergeable_ranks
    with pytest.raises(UserError, match="no tokenizer 'nowhere/tok.json'"):
        get_tokenizer("nowhere/tok.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="must hold GPT-2's encoder.json and vocab.bpe"):
        get_tokenizer(str(tmp_path / "empty"))


def test_get_tokenizer_gpt2_offline_says_how_to_proceed(monkeypatch):
    def offline(name):
        raise ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(UserError, match="offline.*directory holding GPT-2's encoder.json"):
        get_tokenizer("gpt2")


def test_benchmark_runs_and_reports_the_ratio(tmp_path):
    out = tmp_path / "bench"
    result = subprocess.run(
        [
            sys.executable,
            "benchmarks/tokenizer.py",
            "--repeats",
            "1",
            "--vocab-size",
            "1024",
            "--gpt2-dir",
            str(tmp_path / "absent"),
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    (row,) = json.loads(out.with_suffix(".json").read_text())["encode"]
    assert row["n_vocab"] == 1024 and row["ratio_cold"] > 0
    table = out.with_suffix(".md").read_text()  # what the Tokens chapter includes
    assert "tiktoken / ours, warm" in table and f"{row['ratio_warm']:.2f}x" in table


# ---------------------------------------------------------------------------------------------
# Hugging Face tokenizer.json files: ours when it represents them exactly, tokenizers otherwise

QWEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def hf_trained(tmp_path, split: str = "gpt2", normalizer=None):
    """A byte-level BPE trained with Hugging Face's tokenizers on the corpus, saved as
    tokenizer.json: special tokens first, as its trainer numbers them."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split == "gpt2")
    steps = {
        "gpt2": byte_level,
        "qwen": pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN_PATTERN), "isolated"), byte_level]),
        "digits": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                           pre_tokenizers.ByteLevel(add_prefix_space=False)]),
    }  # fmt: skip
    tokenizer.pre_tokenizer = steps[split]
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1200, special_tokens=[EOT, "<|im_start|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tokenizer.train_from_iterator([load_corpus().text[:400_000]], trainer)
    tokenizer.normalizer = normalizer
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    return tokenizer


@pytest.mark.parametrize("split", ["gpt2", "qwen"])
def test_a_hf_byte_level_bpe_is_ours_with_the_same_ids(tmp_path, split, capsys):
    reference = hf_trained(tmp_path, split)
    ours = get_tokenizer(str(tmp_path))  # a folder holding tokenizer.json
    assert isinstance(ours, BPETokenizer) and "note:" not in capsys.readouterr().err
    assert ours.special_tokens == {EOT: 0, "<|im_start|>": 1}  # before the bytes, as trained
    text = VARIED + load_corpus().text[400_000:500_000]
    ids = ours.encode(text, allowed_special="all")
    assert ids == reference.encode(text, add_special_tokens=False).ids
    assert ours.decode(ids) == text
    ours.save(tmp_path / "ours.json")  # ids with a gap at the start survive a round trip
    again = BPETokenizer.load(tmp_path / "ours.json")
    assert (
        again.encode(text, allowed_special="all") == ids and again.fingerprint == ours.fingerprint
    )


@pytest.mark.parametrize(
    "split, normalize, reason",
    [("qwen", True, "it normalises text first (NFC)"), ("digits", False, "Digits, ByteLevel")],
)
def test_a_tokenizer_json_ours_cannot_represent_runs_through_tokenizers(tmp_path, capsys, split,
                                                                        normalize, reason):  # fmt: skip
    from tokenizers import normalizers

    from src.tokenizer import HFTokenizer

    reference = hf_trained(tmp_path, split, normalizers.NFC() if normalize else None)
    path = tmp_path / "tokenizer.json"
    tokenizer = get_tokenizer(str(path))
    assert isinstance(tokenizer, HFTokenizer)
    note = capsys.readouterr().err
    assert reason in note and "tokenizing with the tokenizers package" in note
    ids = tokenizer.encode(VARIED)
    assert ids == reference.encode(VARIED, add_special_tokens=False).ids
    # Bytes, token by token: a character split across two tokens comes back whole when joined.
    joined = b"".join(tokenizer.decode_bytes([i]) for i in ids).decode("utf-8")
    assert joined == reference.decode(ids, skip_special_tokens=False)
    assert tokenizer.eot_token == 0 and tokenizer.n_vocab == reference.get_vocab_size()
    tokenizer.save(tmp_path / "saved.json")
    assert get_tokenizer(str(tmp_path / "saved.json")).fingerprint == tokenizer.fingerprint
    with pytest.raises(UserError, match="always reads special-token text"):
        tokenizer.encode(EOT, allowed_special=(), disallowed_special=())
