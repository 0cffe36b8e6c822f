"""The data pipeline: corpus sources and their errors, cached tokenizers and token files (never
stale, damage detected and repaired), the train/val split, sliding windows and the batching rule."""

import hashlib
from pathlib import Path

import numpy as np
import pytest
import tiktoken
import torch

from src.data import (
    GPTDataset,
    _chunks,
    load_corpus,
    python_stdlib_files,
    split_tokens,
    step_batch,
    tokenize_cached,
    train_tokenizer_cached,
)
from src.errors import UserError
from src.files import cache_dir
from src.tokenizer import BPETokenizer

TEXT = "The cat sat.\n\nOn the mat,  it  sat\n   again <|endoftext|> and again!\n" * 50


@pytest.fixture(scope="module")
def tok() -> BPETokenizer:
    return BPETokenizer.train(TEXT, vocab_size=300)


def test_default_corpus_is_offline_python_documentation():
    corpus = load_corpus()
    assert corpus == load_corpus("default")
    assert corpus.name == "python-docs" and len(corpus.text) > 400_000
    assert 'The "if" statement' in corpus.text
    assert corpus.fingerprint == hashlib.sha256(corpus.text.encode()).hexdigest()


def test_the_standard_library_corpus_is_its_source_in_path_order():
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    files = [f.relative_to(root).as_posix() for f in python_stdlib_files()]
    assert files == sorted(files) and len(files) > 1000
    assert "json/decoder.py" in files and "test/test_json/test_decode.py" in files
    assert not [f for f in files if "site-packages" in f or "_sysconfigdata" in f]
    corpus = load_corpus("python-stdlib")
    assert (
        corpus.name == "python-stdlib" and len(corpus.text) > 20_000_000
    )  # several million tokens
    assert corpus.text.count("<|endoftext|>") >= len(files) - 10  # one document per file
    assert "class JSONDecoder" in corpus.text
    assert corpus.fingerprint == hashlib.sha256(corpus.text.encode()).hexdigest()
    assert python_stdlib_files() == python_stdlib_files()  # the same files, the same order


def test_file_and_directory_corpora(tmp_path):
    (tmp_path / "b.txt").write_text("second", "utf-8")
    (tmp_path / "a.txt").write_text("first", "utf-8")
    (tmp_path / "ignored.md").write_text("not text", "utf-8")
    assert load_corpus(str(tmp_path / "a.txt")).text == "first"
    corpus = load_corpus(str(tmp_path))
    assert corpus.text == "first\n\nsecond" and corpus.name == tmp_path.name


def test_url_corpus_is_checked_and_cached(tmp_path):
    source = tmp_path / "story.txt"
    source.write_text("Once upon a time.", "utf-8")
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    url = f"{source.as_uri()}#sha256={digest}"
    cache = tmp_path / "cache"
    assert load_corpus(url, cache=cache).text == "Once upon a time."
    source.unlink()  # the cached copy serves from now on
    corpus = load_corpus(url, cache=cache)
    assert corpus.text == "Once upon a time." and corpus.name == "story"


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: str(p / "missing.txt"), "not found: no such file or directory"),
        (lambda p: (p / "empty.txt").write_text(" \n") and str(p / "empty.txt"), "is empty"),
        (
            lambda p: (
                (p / "latin1.txt").write_bytes("café".encode("latin-1")) and str(p / "latin1.txt")
            ),
            r"latin1.txt is not UTF-8 text \(invalid byte at offset 3\)",
        ),
        (lambda p: (p / "sub").mkdir() or str(p / "sub"), "holds no .txt files"),
        (
            lambda p: (
                (p / "x.txt").write_text("hi") and f"{(p / 'x.txt').as_uri()}#sha256={'0' * 64}"
            ),
            "checksum mismatch .* expected sha256 0{64}, got 8f434346",
        ),
        (
            lambda p: "https://example.com/corpus.txt",
            r"needs its checksum: .*#sha256=<64 hex digits>",
        ),
    ],
)
def test_bad_corpora_get_clear_errors(tmp_path, make, message):
    with pytest.raises(UserError, match=message):
        load_corpus(make(tmp_path), cache=tmp_path / "cache")


def test_cache_dir_defaults_to_home_and_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("GPT_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "gpt-from-scratch"
    monkeypatch.setenv("GPT_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert cache_dir() == tmp_path / "elsewhere"


def test_tokenizer_is_trained_once_and_then_loaded(tmp_path):
    corpus = load_corpus()
    first = train_tokenizer_cached(corpus, 512, tmp_path)
    (saved,) = (tmp_path / "tokenizers").iterdir()
    stamp = saved.stat().st_mtime_ns
    again = train_tokenizer_cached(corpus, 512, tmp_path)
    assert again.mergeable_ranks == first.mergeable_ranks and saved.stat().st_mtime_ns == stamp
    train_tokenizer_cached(corpus, 600, tmp_path)
    assert len(list((tmp_path / "tokenizers").iterdir())) == 2


def test_token_file_holds_the_encoding_and_is_reused(tmp_path, tok):
    corpus = load_corpus(str(_write(tmp_path, TEXT)))
    ids = tokenize_cached(corpus, tok, tmp_path)
    assert ids.dtype == np.uint16
    assert ids.tolist() == tok.encode(TEXT, allowed_special="all")
    (path,) = (tmp_path / "tokens").iterdir()
    stamp = path.stat().st_mtime_ns
    tokenize_cached(corpus, BPETokenizer.load(_saved(tmp_path, tok)), tmp_path)
    assert path.stat().st_mtime_ns == stamp  # the same tokenizer, loaded anew: same file


def test_token_file_is_never_stale_when_the_tokenizer_changes(tmp_path, tok):
    corpus = load_corpus(str(_write(tmp_path, TEXT)))
    tokenize_cached(corpus, tok, tmp_path)
    fewer_merges = BPETokenizer.train(TEXT, vocab_size=270)
    other_special = BPETokenizer(tok.mergeable_ranks, {"<|end|>": tok.eot_token}, tok.pattern)
    for changed in [fewer_merges, other_special]:
        assert tokenize_cached(corpus, changed, tmp_path).tolist() == changed.encode(
            TEXT, allowed_special="all"
        )
    assert len(list((tmp_path / "tokens").iterdir())) == 3


def test_token_file_from_a_tiktoken_encoding_and_wide_ids(tmp_path, tok):
    corpus = load_corpus(str(_write(tmp_path, TEXT)))
    enc = tiktoken.Encoding(
        "t",
        pat_str=tok.pattern,
        mergeable_ranks=tok.mergeable_ranks,
        special_tokens=tok.special_tokens,
    )
    assert tokenize_cached(corpus, enc, tmp_path).tolist() == enc.encode(
        TEXT, allowed_special="all"
    )
    wide = BPETokenizer(tok.mergeable_ranks, {"<|endoftext|>": 70_000}, tok.pattern)
    ids = tokenize_cached(corpus, wide, tmp_path)
    assert ids.dtype == np.uint32 and 70_000 in ids


def test_chunked_tokenization_equals_whole_text_tokenization(tok):
    text = load_corpus().text[:60_000] + TEXT + "end\n\n\n  x\n"
    chunks = _chunks(text, size=997)
    assert len(chunks) > 50 and "".join(chunks) == text
    assert sum((tok.encode(c, allowed_special="all") for c in chunks), []) == tok.encode(
        text, allowed_special="all"
    )


def test_split_is_by_position():
    tokens = np.arange(1000, dtype=np.uint16)
    train, val = split_tokens(tokens, val_fraction=0.1)
    assert train.tolist() == list(range(900)) and val.tolist() == list(range(900, 1000))
    with pytest.raises(UserError, match="val_fraction must be between 0 and 1, got 1.5"):
        split_tokens(tokens, 1.5)


@pytest.mark.parametrize(
    "n, context_length, stride", [(100, 8, 8), (100, 8, 3), (9, 8, 1), (50, 7, 20)]
)
def test_dataset_windows_are_shifted_by_one(n, context_length, stride):
    tokens = np.arange(n, dtype=np.uint16) * 7 % 251
    dataset = GPTDataset(tokens, context_length, stride)
    expected = [s for s in range(0, n, stride) if s + context_length + 1 <= n]
    assert len(dataset) == len(expected)
    for i, start in enumerate(expected):
        x, y = dataset[i]
        assert (
            x.dtype == torch.long and x.tolist() == tokens[start : start + context_length].tolist()
        )
        assert y.tolist() == tokens[start + 1 : start + context_length + 1].tolist()


def test_corpus_shorter_than_one_window_is_rejected():
    with pytest.raises(
        UserError,
        match="shorter than one context window: 8 tokens, need at least context_length \\+ 1 = 9",
    ):
        GPTDataset(np.arange(8, dtype=np.uint16), 8, 8)


def test_a_batch_stacks_the_windows_it_names():
    tokens = np.arange(1000, dtype=np.uint16)
    dataset = GPTDataset(tokens, 16, 16)
    x, y = dataset.batch(torch.tensor([3, 0, 7]))
    assert x.shape == y.shape == (3, 16) and x.dtype == torch.long
    assert x[:, 0].tolist() == [48, 0, 112] and torch.equal(y, x + 1)


def test_the_batch_of_a_step_depends_on_the_step_alone():
    n, batch_size, seed = 37, 5, 11  # 7 steps per epoch; two windows are left out of each epoch
    epoch = [step_batch(s, n, batch_size, seed) for s in range(7)]
    seen = torch.cat(epoch)
    assert len(set(seen.tolist())) == 35 and int(seen.max()) < n  # no window twice in an epoch
    assert torch.equal(step_batch(3, n, batch_size, seed), epoch[3])  # asked again: the same
    assert not torch.equal(step_batch(7, n, batch_size, seed), epoch[0])  # a new epoch, new order
    assert not torch.equal(step_batch(0, n, batch_size, seed + 1), epoch[0])  # another seed
    # The reference: one permutation per epoch from (seed, epoch), sliced in steps.
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + 1))
    assert torch.equal(step_batch(9, n, batch_size, seed), order[10:15])
    for bad in (0, n + 1):
        with pytest.raises(UserError, match=f"a batch of {bad} needs"):
            step_batch(0, n, bad, seed)


def _write(folder, text):
    path = folder / "corpus.txt"
    path.write_text(text, "utf-8")
    return path


def _saved(folder, tok):
    path = folder / "tok.json"
    tok.save(path)
    return path


@pytest.mark.parametrize("damage", ["odd", "even", "flipped", "empty"])
def test_a_damaged_token_cache_is_noticed_and_rebuilt(tmp_path, tok, damage, capsys):
    corpus = load_corpus(str(_write(tmp_path, TEXT)))
    expected = tokenize_cached(corpus, tok, tmp_path).tolist()
    (path,) = (tmp_path / "tokens").iterdir()
    data = path.read_bytes()
    damaged = {
        "odd": data[:-3],  # cut mid-token
        "even": data[: len(data) // 2],  # cut at a token boundary: readable, but a fifth of it
        "flipped": data[:-1] + bytes([data[-1] ^ 1]),
        "empty": b"",
    }[damage]
    path.write_bytes(damaged)
    assert tokenize_cached(corpus, tok, tmp_path).tolist() == expected
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "token cache" in err and "tokenizing the corpus again" in err
    assert path.read_bytes() == data  # repaired


def test_a_damaged_tokenizer_cache_is_noticed_and_retrained(tmp_path, capsys):
    corpus = load_corpus(str(_write(tmp_path, TEXT)))
    first = train_tokenizer_cached(corpus, 280, tmp_path)
    (path,) = (tmp_path / "tokenizers").iterdir()
    lines = path.read_text().splitlines()
    at = lines.index('"tokens": [') + 261  # two learned tokens, swapped: it parses, but lies
    swapped = [*lines[:at], lines[at + 1], lines[at], *lines[at + 2 :]]
    for damaged in (path.read_text()[:-40], "\n".join(swapped), "{}"):
        path.write_text(damaged)
        again = train_tokenizer_cached(corpus, 280, tmp_path)
        assert again.mergeable_ranks == first.mergeable_ranks
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "training the tokenizer again" in err, err
