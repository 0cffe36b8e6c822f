"""Batches of tokens: from a corpus on disk to the (input, target) tensors a training step eats.

The pipeline runs once per corpus and tokenizer, and every later run reuses its results:

    source -> Corpus (text + sha256) -> tokenizer (trained once, cached)
           -> token file (uint16/uint32 memmap, cached) -> train/val split by position
           -> sliding-window Dataset + DataLoader, or random-offset batches

A language model learns to predict token ``t + 1`` from tokens ``0..t``, so a training example is a
window of ``context_length`` tokens and the same window shifted by one: every position in it is a
prediction target at once.

The default corpus needs no network and commits no third-party prose: it is the reference text of
Python's own documentation (``pydoc_data.topics``, what ``help("if")`` prints), which ships with every
Python that can run this project. Your own text works too: a ``.txt`` file, a directory of them, or an
``https://`` URL with its checksum.
"""

import hashlib
import os
import urllib.parse
import urllib.request
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import numpy as np
import regex
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from src.tokenizer import BPETokenizer, tokenizer_fingerprint


class DataError(ValueError):
    """Input the pipeline cannot use; the message says what is wrong and with which file."""


def default_cache_dir() -> Path:
    """Where tokenizers, token files and downloads are kept: ``$GPT_CACHE_DIR`` or
    ``~/.cache/gpt-from-scratch``."""
    return Path(os.environ.get("GPT_CACHE_DIR") or Path.home() / ".cache" / "gpt-from-scratch")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_atomically(path: Path, data: bytes) -> None:
    """An interrupted run leaves no half-written cache file: write aside, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    tmp.replace(path)


# --8<-- [start:corpus]
@dataclass(frozen=True)
class Corpus:
    name: str
    text: str
    fingerprint: str  # sha256 of the UTF-8 text: the cache key of everything derived from it


def load_corpus(source: str | None = None, cache_dir: str | Path | None = None) -> Corpus:
    """``None``/``"default"``: Python's documentation topics; a ``.txt`` file; a directory of
    ``.txt`` files (sorted by name, joined by blank lines); or ``"https://...#sha256=HEX"``
    (downloaded once into ``cache_dir/downloads``, checked against the hash every time)."""
    if source in (None, "default"):
        import pydoc_data.topics

        topics = pydoc_data.topics.topics
        name, text = "python-docs", "\n\n".join(topics[key] for key in sorted(topics))
    elif "://" in source:
        name = Path(urllib.parse.urlsplit(source).path).stem or "download"
        text = _download(source, cache_dir)
    else:
        path = Path(source)
        if path.is_dir():
            files = sorted(path.glob("*.txt"))
            if not files:
                raise DataError(f"{path} holds no .txt files")
            name, text = path.name, "\n\n".join(_read_text(f) for f in files)
        elif path.is_file():
            name, text = path.stem, _read_text(path)
        else:
            raise DataError(f"corpus {source!r} not found: no such file or directory")
    if not text.strip():
        raise DataError(f"corpus {source or 'default'!r} is empty")
    # The name goes into cache file names: keep it to safe characters.
    return Corpus(regex.sub(r"[^\w.-]", "_", name), text, _sha256(text.encode("utf-8")))


# --8<-- [end:corpus]


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path} is not UTF-8 text (invalid byte at offset {err.start}); "
            "convert it, e.g. with iconv -t UTF-8"
        ) from None


def _download(url: str, cache_dir: str | Path | None) -> str:
    address, _, fragment = url.partition("#")
    if not fragment.startswith("sha256="):
        raise DataError(f"a URL corpus needs its checksum: {address}#sha256=<64 hex digits>")
    expected = fragment.removeprefix("sha256=").lower()
    path = Path(cache_dir or default_cache_dir()) / "downloads" / f"{expected}.txt"
    if path.is_file():
        data = path.read_bytes()
    else:
        try:
            with urllib.request.urlopen(address, timeout=60) as response:
                data = response.read()
        except OSError as err:
            raise DataError(f"cannot download {address}: {err}") from None
    actual = _sha256(data)
    if actual != expected:
        raise DataError(
            f"checksum mismatch for {address}: expected sha256 {expected}, got {actual}"
        )
    _write_atomically(path, data)
    return _read_text(path)


# --8<-- [start:cached]
def train_tokenizer_cached(
    corpus: Corpus,
    vocab_size: int,
    cache_dir: str | Path,
    special_tokens: tuple[str, ...] = ("<|endoftext|>",),
) -> BPETokenizer:
    """Train a BPE tokenizer on ``corpus``, or load the one trained before with the same inputs."""
    key = _sha256(f"{corpus.fingerprint} {vocab_size} {special_tokens}".encode())[:16]
    path = Path(cache_dir) / "tokenizers" / f"{corpus.name}-{vocab_size}-{key}.json"
    if path.is_file():
        return BPETokenizer.load(path)
    tokenizer = BPETokenizer.train(corpus.text, vocab_size, special_tokens)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")  # ranks of one run may race here
    tokenizer.save(tmp)
    tmp.replace(path)
    return tokenizer


def fingerprint_of(tokenizer) -> str:
    """Our tokenizer's fingerprint, or the same hash of a ``tiktoken.Encoding``'s parts."""
    if isinstance(tokenizer, BPETokenizer):
        return tokenizer.fingerprint
    return tokenizer_fingerprint(
        tokenizer._pat_str, tokenizer._mergeable_ranks, tokenizer._special_tokens
    )


def tokenize_cached(corpus: Corpus, tokenizer, cache_dir: str | Path) -> np.memmap:
    """The corpus's token ids as a read-only memmap, tokenized once and kept in a file keyed by
    the corpus *and* the tokenizer, so a changed tokenizer can never read stale ids. Text that
    spells a special token (``<|endoftext|>`` between documents) is encoded as that token."""
    dtype = np.uint16 if tokenizer.n_vocab <= 2**16 else np.uint32
    key = f"{corpus.fingerprint[:16]}-{fingerprint_of(tokenizer)[:16]}"
    path = Path(cache_dir) / "tokens" / f"{corpus.name}-{key}.{np.dtype(dtype).name}"
    if not path.is_file():
        chunks = _chunks(corpus.text)
        with tqdm(
            total=len(corpus.text),
            unit="char",
            unit_scale=True,
            desc="tokenizing",
            disable=len(chunks) < 4,
        ) as progress:
            parts = []
            for chunk in chunks:
                parts.append(np.array(tokenizer.encode(chunk, allowed_special="all"), dtype))
                progress.update(len(chunk))
        _write_atomically(path, np.concatenate(parts).tobytes())
    return np.memmap(path, dtype=dtype, mode="r")


# --8<-- [end:cached]


# --8<-- [start:chunks]
_SAFE_CUT = regex.compile(r"(?<=\S)\n")


def _chunks(text: str, size: int = 1 << 20) -> list[str]:
    """Pieces of about ``size`` characters that encode to exactly the ids of the whole text.

    A cut just before a newline that follows a non-space character is safe: no pre-token of the
    split pattern runs from a word across a newline, and the piece that starts at the newline only
    looks ahead. (A cut inside a run of whitespace is not: "\\n\\n" may be one token or two.)
    """
    cuts, start = [0], size
    while start < len(text):
        found = _SAFE_CUT.search(text, start)
        if not found:
            break
        cuts.append(found.start())
        start = found.start() + size
    cuts.append(len(text))
    return [text[a:b] for a, b in pairwise(cuts)]


# --8<-- [end:chunks]


# --8<-- [start:split]
def split_tokens(tokens: np.ndarray, val_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """The first ``1 - val_fraction`` of the tokens for training, the rest for validation. By
    position, not at random: random windows would put the same sentences on both sides."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    n_train = len(tokens) - int(len(tokens) * val_fraction)
    return tokens[:n_train], tokens[n_train:]


# --8<-- [end:split]


def _check_length(tokens: np.ndarray, context_length: int) -> None:
    if context_length < 1:
        raise DataError(f"context_length must be positive, got {context_length}")
    if len(tokens) < context_length + 1:
        raise DataError(
            f"the corpus is shorter than one context window: {len(tokens)} tokens, "
            f"need at least context_length + 1 = {context_length + 1}"
        )


# --8<-- [start:dataset]
class GPTDataset(Dataset):
    """Sliding windows over the token ids: window ``i`` starts at ``i * stride``.

    ``stride == context_length`` tiles the corpus (every token is a target once per epoch); a smaller
    stride overlaps windows, giving more examples that share most of their tokens.
    """

    def __init__(self, tokens: np.ndarray, context_length: int, stride: int):
        _check_length(tokens, context_length)
        if stride < 1:
            raise DataError(f"stride must be positive, got {stride}")
        self.tokens, self.context_length, self.stride = tokens, context_length, stride

    def __len__(self) -> int:
        return (len(self.tokens) - self.context_length - 1) // self.stride + 1

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = i * self.stride
        window = torch.from_numpy(
            self.tokens[start : start + self.context_length + 1].astype(np.int64)
        )
        return window[:-1], window[1:]  # (T,) inputs, (T,) targets: the same tokens shifted by one


def create_dataloader(
    tokens: np.ndarray,
    batch_size: int,
    context_length: int,
    stride: int,
    shuffle: bool = True,
    drop_last: bool = True,
    generator: torch.Generator | None = None,
) -> DataLoader:
    """Batches of ``(B, T)`` inputs and targets; pass a seeded ``generator`` for a fixed order."""
    dataset = GPTDataset(tokens, context_length, stride)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, generator=generator
    )


# --8<-- [end:dataset]


# --8<-- [start:random_batches]
def get_batch(
    tokens: np.ndarray,
    batch_size: int,
    context_length: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` windows at random offsets: ``(B, T)`` inputs and targets.

    Reads only the rows it needs from the memmap, so the corpus may be larger than RAM, and needs
    no notion of an epoch: training just draws batches.
    """
    _check_length(tokens, context_length)
    starts = torch.randint(len(tokens) - context_length, (batch_size,), generator=generator)
    rows = [tokens[s : s + context_length + 1].astype(np.int64) for s in starts.tolist()]
    batch = torch.from_numpy(np.stack(rows))  # (B, T + 1)
    return batch[:, :-1], batch[:, 1:]


class RandomBatchSampler:
    """An endless iterator of ``get_batch`` batches."""

    def __init__(
        self,
        tokens: np.ndarray,
        batch_size: int,
        context_length: int,
        generator: torch.Generator | None = None,
    ):
        _check_length(tokens, context_length)
        self.tokens, self.batch_size, self.context_length = tokens, batch_size, context_length
        self.generator = generator

    def __iter__(self):
        while True:
            yield get_batch(self.tokens, self.batch_size, self.context_length, self.generator)


# --8<-- [end:random_batches]
