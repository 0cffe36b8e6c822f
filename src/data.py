"""Batches of tokens: from a corpus on disk to the (input, target) tensors a training step eats.

The pipeline runs once per corpus and tokenizer, and every later run reuses its results:

    source -> Corpus (text + sha256) -> tokenizer (trained once, cached)
           -> token file (uint16/uint32, cached, checked) -> train/val split by position
           -> windows of context_length + 1 tokens -> the batch of optimizer step s

A language model learns to predict token ``t + 1`` from tokens ``0..t``, so a training example is a
window of ``context_length`` tokens and the same window shifted by one: every position in it is a
prediction target at once.

**One batching rule.** Which windows form a batch depends on the step number alone: epoch ``e``
visits the windows in a permutation drawn from ``(seed, e)``, and step ``s`` takes the next
``batch_size`` of them. A resumed run, a run on several processes, and an experiment all see the
same batches, with nothing to save but the step.

The default corpus needs no network and commits no third-party prose: it is the reference text of
Python's own documentation (``pydoc_data.topics``, what ``help("if")`` prints), which ships with every
Python that can run this project. Your own text works too: a ``.txt`` file, a directory of them, or an
``https://`` URL with its checksum.
"""

import sys
import urllib.parse
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import numpy as np
import regex
import torch
from tqdm import tqdm

from src.errors import UserError
from src.files import cache_dir, download, sha256, write_atomically
from src.tokenizer import BPETokenizer, tokenizer_fingerprint


# --8<-- [start:corpus]
@dataclass(frozen=True)
class Corpus:
    name: str
    text: str
    fingerprint: str  # sha256 of the UTF-8 text: the cache key of everything derived from it


def load_corpus(source: str | None = None, cache: str | Path | None = None) -> Corpus:
    """``None``/``"default"``: Python's documentation topics; a ``.txt`` file; a directory of
    ``.txt`` files (sorted by name, joined by blank lines); or ``"https://...#sha256=HEX"``
    (downloaded once into ``cache/downloads``, checked against the hash every time)."""
    if source in (None, "default"):
        import pydoc_data.topics

        topics = pydoc_data.topics.topics
        name, text = "python-docs", "\n\n".join(topics[key] for key in sorted(topics))
    elif "://" in source:
        name = Path(urllib.parse.urlsplit(source).path).stem or "download"
        text = _download_text(source, Path(cache or cache_dir()))
    else:
        path = Path(source)
        if path.is_dir():
            files = sorted(path.glob("*.txt"))
            if not files:
                raise UserError(f"{path} holds no .txt files")
            name, text = path.name, "\n\n".join(_read_text(f) for f in files)
        elif path.is_file():
            name, text = path.stem, _read_text(path)
        else:
            raise UserError(f"corpus {source!r} not found: no such file or directory")
    if not text.strip():
        raise UserError(f"corpus {source or 'default'!r} is empty")
    # The name goes into cache file names: keep it to safe characters.
    return Corpus(regex.sub(r"[^\w.-]", "_", name), text, sha256(text.encode("utf-8")))


# --8<-- [end:corpus]


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(
            f"{path} is not UTF-8 text (invalid byte at offset {err.start}); "
            "convert it, e.g. with iconv -t UTF-8"
        ) from None
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror}") from None


def _download_text(url: str, cache: Path) -> str:
    address, _, fragment = url.partition("#")
    if not regex.fullmatch(r"sha256=[0-9a-fA-F]{64}", fragment):
        raise UserError(f"a URL corpus needs its checksum: {address}#sha256=<64 hex digits>")
    expected = fragment.removeprefix("sha256=").lower()
    path = cache / "downloads" / f"{expected}.txt"
    download(address, expected, path)
    return _read_text(path)


# --8<-- [start:cached]
def train_tokenizer_cached(
    corpus: Corpus,
    vocab_size: int,
    cache: str | Path,
    special_tokens: tuple[str, ...] = ("<|endoftext|>",),
) -> BPETokenizer:
    """Train a BPE tokenizer on ``corpus``, or load the one trained before with the same inputs.
    A cached file that is damaged is trained again, with a note."""
    key = sha256(f"{corpus.fingerprint} {vocab_size} {special_tokens}".encode())[:16]
    path = Path(cache) / "tokenizers" / f"{corpus.name}-{vocab_size}-{key}.json"
    if path.is_file():
        try:
            return BPETokenizer.load(path)
        except UserError as err:
            print(f"note: {err}; training the tokenizer again", file=sys.stderr)
    tokenizer = BPETokenizer.train(corpus.text, vocab_size, special_tokens)
    tokenizer.save(path)  # atomic: processes of one run may race here
    return tokenizer


def fingerprint_of(tokenizer) -> str:
    """Our tokenizer's fingerprint (``BPETokenizer``, ``HFTokenizer``), or the same hash of a
    ``tiktoken.Encoding``'s parts."""
    if hasattr(tokenizer, "fingerprint"):
        return tokenizer.fingerprint
    return tokenizer_fingerprint(
        tokenizer._pat_str, tokenizer._mergeable_ranks, tokenizer._special_tokens
    )


def tokenize_cached(corpus: Corpus, tokenizer, cache: str | Path) -> np.memmap:
    """The corpus's token ids as a read-only memmap, tokenized once and kept in a file keyed by
    the corpus *and* the tokenizer, so a changed tokenizer can never read stale ids. Text that
    spells a special token (``<|endoftext|>`` between documents) is encoded as that token."""
    dtype = np.dtype(np.uint16 if tokenizer.n_vocab <= 2**16 else np.uint32)
    key = f"{corpus.fingerprint[:16]}-{fingerprint_of(tokenizer)[:16]}"
    path = Path(cache) / "tokens" / f"{corpus.name}-{key}.{dtype.name}"
    if path.is_file():
        try:
            return read_token_file(path, dtype)
        except UserError as err:
            print(f"note: {err}; tokenizing the corpus again", file=sys.stderr)
    chunks = _chunks(corpus.text)
    with tqdm(total=len(corpus.text), unit="char", unit_scale=True, desc="tokenizing",
              disable=len(chunks) < 4) as progress:  # fmt: skip
        parts = []
        for chunk in chunks:
            parts.append(np.array(tokenizer.encode(chunk, allowed_special="all"), dtype))
            progress.update(len(chunk))
    ids = np.concatenate(parts)
    write_atomically(path, _TOKEN_MAGIC + len(ids).to_bytes(8, "little")
                     + bytes.fromhex(sha256(ids.tobytes())) + ids.tobytes())  # fmt: skip
    return read_token_file(path, dtype)


# --8<-- [end:cached]


# --8<-- [start:token_file]
_TOKEN_MAGIC = b"GPTTOKS1" + bytes(16)  # 24 bytes, then the count (8) and the sha256 (32)
_HEADER = len(_TOKEN_MAGIC) + 8 + 32  # 64: the ids that follow stay aligned


def read_token_file(path: Path, dtype: np.dtype) -> np.memmap:
    """The ids of a token file, after checking its length and its sha256 against its header.

    A file cut short by a full disk or a stray edit would otherwise be used silently: a run would
    train on a fraction of its corpus, or on garbage."""
    with open(path, "rb") as f:
        header = f.read(_HEADER)
        payload = f.read()
    if header[: len(_TOKEN_MAGIC)] != _TOKEN_MAGIC:
        raise UserError(f"the token cache {path} is damaged or from an older version")
    count = int.from_bytes(header[len(_TOKEN_MAGIC) : -32], "little")
    if len(payload) != count * dtype.itemsize or sha256(payload) != header[-32:].hex():
        raise UserError(f"the token cache {path} is damaged ({len(payload):,} bytes of "
                        f"{count * dtype.itemsize:,}, or not the bytes it was written with)")  # fmt: skip
    return np.memmap(path, dtype=dtype, mode="r", offset=_HEADER, shape=(count,))


# --8<-- [end:token_file]


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
        raise UserError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    n_train = len(tokens) - int(len(tokens) * val_fraction)
    return tokens[:n_train], tokens[n_train:]


# --8<-- [end:split]


# --8<-- [start:dataset]
class GPTDataset:
    """Sliding windows over the token ids: window ``i`` starts at ``i * stride``.

    ``stride == context_length`` tiles the corpus (every token is a target once per epoch); a smaller
    stride overlaps windows, giving more examples that share most of their tokens.
    """

    def __init__(self, tokens: np.ndarray, context_length: int, stride: int):
        if context_length < 1 or stride < 1:
            raise UserError(
                f"context_length and stride must be positive, got {context_length}, {stride}"
            )
        if len(tokens) < context_length + 1:
            raise UserError(
                f"the corpus is shorter than one context window: {len(tokens)} tokens, "
                f"need at least context_length + 1 = {context_length + 1}"
            )
        self.tokens, self.context_length, self.stride = tokens, context_length, stride

    def __len__(self) -> int:
        return (len(self.tokens) - self.context_length - 1) // self.stride + 1

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = i * self.stride
        window = torch.from_numpy(
            self.tokens[start : start + self.context_length + 1].astype(np.int64)
        )
        return window[:-1], window[1:]  # (T,) inputs, (T,) targets: the same tokens shifted by one

    def batch(self, which: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets (B, T) of the windows numbered ``which``."""
        inputs, targets = zip(*(self[i] for i in which.tolist()), strict=True)
        return torch.stack(inputs), torch.stack(targets)


# --8<-- [end:dataset]


# --8<-- [start:batches]
def step_batch(step: int, n: int, batch_size: int, seed: int) -> torch.Tensor:
    """The example numbers of optimizer step ``step``'s batch, out of ``n`` examples.

    Epoch ``e`` visits the examples in a permutation drawn from ``(seed, e)`` alone; step ``s`` takes
    the ``s``-th slice of ``batch_size`` of them (an epoch's last partial batch is dropped). The batch
    of a step is a function of the step, so nothing but the step needs saving to resume.
    """
    if not 1 <= batch_size <= n:
        raise UserError(f"a batch of {batch_size} needs at least as many examples; there are {n}")
    steps_per_epoch = n // batch_size
    epoch, k = divmod(step, steps_per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return order[k * batch_size : (k + 1) * batch_size]


# --8<-- [end:batches]
