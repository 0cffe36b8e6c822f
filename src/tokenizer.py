"""Text to token ids: a byte-level BPE tokenizer, trained from scratch, equal to tiktoken.

A model reads integers, not text. The simplest mapping, one id per word, fails on the first word it
has never seen; one id per character makes sequences long and leaves every word to be assembled by
the model. Byte-pair encoding (BPE) sits between the two:

1. Start from the 256 possible bytes, so *every* string can be encoded (UTF-8 turns any text into
   bytes): there is no unknown token.
2. Training repeatedly finds the most frequent pair of adjacent tokens in the corpus and makes it a
   new token, until the vocabulary has the requested size. Frequent words end up as one token, rare
   words as a few pieces.
3. Before any of this, a regular expression splits the text into *pre-tokens* (words, numbers,
   punctuation runs, whitespace), and merges never cross their boundaries, so " dog" and "dog." do
   not spawn tokens that glue a word to its punctuation.

The model of the tokenizer is GPT-2's, in the form tiktoken uses: a table ``mergeable_ranks`` from a
token's bytes to its id (its *rank*: lower ranks were learned earlier), the split pattern, and the
special tokens such as ``<|endoftext|>``. Encoding a pre-token starts from its bytes and repeatedly
merges the adjacent pair whose concatenation has the lowest rank. With the same three parts,
``tiktoken.Encoding`` produces exactly our ids, which the tests check on text of every kind.
"""

import hashlib
import heapq
import json
import sys
from collections import Counter
from collections.abc import Collection, Iterable
from itertools import pairwise
from pathlib import Path
from typing import Literal

import regex
import tiktoken

from src.errors import UserError
from src.files import write_atomically

# --8<-- [start:pattern]
# GPT-2's split pattern as tiktoken writes it: contractions, letters, digits, other symbols, each
# with at most one leading space; then whitespace: `\s++$` takes it all at the end of the text,
# `\s+(?!\S)` leaves the last space of a run to the word that follows (" dog" keeps its space).
# A possessive `++` never gives characters back, which spares the engine useless backtracking.
# Python's `re` lacks `\p{L}`/`\p{N}`; the `regex` package has them.
GPT2_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)
# --8<-- [end:pattern]
ENDOFTEXT = "<|endoftext|>"


# --8<-- [start:bytes]
def _gpt2_byte_order() -> list[int]:
    """The 256 bytes in GPT-2's order: the printable ones first, then the rest.

    GPT-2 gives every byte a printable stand-in character, so its files can store any byte string as
    text (space becomes 'Ġ', newline 'Ċ'). Printable bytes stand for themselves; the other 68 take the
    characters 256, 257, ... in byte order. Ranks 0-255 follow this order in GPT-2, and in ours too,
    so a tokenizer we train can be written as valid GPT-2 files.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    return printable + [b for b in range(256) if b not in printable]


BYTE_ORDER = _gpt2_byte_order()
# The first 188 bytes in this order are the printable ones.
BYTE_TO_CHAR = {b: chr(b) if i < 188 else chr(256 + i - 188) for i, b in enumerate(BYTE_ORDER)}
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


def bytes_to_printable(token: bytes) -> str:
    return "".join(BYTE_TO_CHAR[b] for b in token)


def printable_to_bytes(text: str) -> bytes:
    try:
        return bytes(CHAR_TO_BYTE[c] for c in text)
    except KeyError as err:
        raise ValueError(f"{text!r} is not a GPT-2 byte string (bad character {err})") from None


# --8<-- [end:bytes]


# --8<-- [start:tokenizer]
def tokenizer_fingerprint(pattern: str, ranks: dict[bytes, int], special: dict[str, int]) -> str:
    """A stable sha256 of everything that decides the ids: pattern, ranks and special tokens."""
    h = hashlib.sha256(pattern.encode())
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        h.update(rank.to_bytes(4, "little") + len(token).to_bytes(2, "little") + token)
    h.update(json.dumps(sorted(special.items())).encode())
    return h.hexdigest()


class BPETokenizer:
    """Byte-level BPE with tiktoken's model: ``mergeable_ranks``, ``pattern``, ``special_tokens``."""

    def __init__(
        self,
        mergeable_ranks: dict[bytes, int],
        special_tokens: dict[str, int] | None = None,
        pattern: str = GPT2_PATTERN,
    ):
        special_tokens = dict(special_tokens or {})
        # A rank is also the token's id. Ours are 0..n-1 with the special tokens after them;
        # tiktoken's model allows any distinct ids, and tokenizers trained with Hugging Face's
        # tokenizers put their special tokens first, so any distinct ids are accepted.
        ids = [*mergeable_ranks.values(), *special_tokens.values()]
        if len(set(ids)) != len(ids) or min(ids, default=0) < 0:
            raise ValueError("every token and special token needs its own id >= 0")
        if any(bytes([b]) not in mergeable_ranks for b in range(256)):
            raise ValueError("a byte-level vocabulary needs a token for each of the 256 bytes")
        self.mergeable_ranks = dict(mergeable_ranks)
        self.special_tokens = special_tokens
        self.pattern = pattern
        self._split = regex.compile(pattern)
        self._decoder = {rank: token for token, rank in self.mergeable_ranks.items()}
        self._decoder |= {i: s.encode("utf-8") for s, i in special_tokens.items()}
        self._no_rank = max(self.mergeable_ranks.values()) + 1  # above every rank: "not a token"
        self._cache: dict[str, list[int]] = {}  # pre-token -> ids; text repeats its words a lot

    @property
    def n_vocab(self) -> int:
        """Number of ids, special tokens included (the model's ``vocab_size``)."""
        return max(self._decoder) + 1

    @property
    def eot_token(self) -> int | None:
        return self.special_tokens.get(ENDOFTEXT)

    @property
    def fingerprint(self) -> str:
        return tokenizer_fingerprint(self.pattern, self.mergeable_ranks, self.special_tokens)

    # --8<-- [end:tokenizer]

    # --8<-- [start:train]
    @classmethod
    def train(
        cls,
        text: str,
        vocab_size: int,
        special_tokens: Iterable[str] = (ENDOFTEXT,),
        pattern: str = GPT2_PATTERN,
    ) -> "BPETokenizer":
        """Learn ``vocab_size - 256 - len(special_tokens)`` merges from ``text``.

        Ties: among equally frequent pairs, the one whose two ids are smallest (compared as a tuple)
        wins, so training is deterministic. If every pre-token has become a single token first,
        training stops early with a smaller vocabulary (``n_vocab`` says how large).
        """
        special_tokens = list(dict.fromkeys(special_tokens))
        if vocab_size < 256 + len(special_tokens):
            raise UserError(
                f"vocab_size={vocab_size} is too small: need at least 256 byte "
                f"tokens + {len(special_tokens)} special = {256 + len(special_tokens)}"
            )
        # Pre-tokenize once and keep only the distinct words with their counts: a corpus of a
        # million words has a few tens of thousands of distinct ones, and all work below is on those.
        counts = Counter()
        for chunk in _split_specials(text, special_tokens):
            counts.update(regex.findall(pattern, chunk))
        vocab = [bytes([b]) for b in BYTE_ORDER]  # rank -> bytes
        ranks = {token: rank for rank, token in enumerate(vocab)}
        byte_rank = [ranks[bytes([b])] for b in range(256)]
        words = [[byte_rank[b] for b in w.encode("utf-8")] for w in counts]
        freq = list(counts.values())

        pair_count, where = cls._count_pairs(words, freq)
        # Max-heap by count (negated), ties to the smaller pair. Entries go stale when a count
        # changes; a stale entry is skipped when popped, and the fresh count was pushed anew.
        heap = [(-n, pair) for pair, n in pair_count.items()]
        heapq.heapify(heap)

        n_ranks = vocab_size - len(special_tokens)
        while len(vocab) < n_ranks and heap:
            neg_n, pair = heapq.heappop(heap)
            if pair_count.get(pair) != -neg_n:
                continue  # stale
            token = vocab[pair[0]] + vocab[pair[1]]
            new_id = ranks.get(token)
            if new_id is None:  # (a pair could spell a token learned from another split: reuse it)
                new_id = ranks[token] = len(vocab)
                vocab.append(token)
            changed = cls._merge_everywhere(pair, new_id, words, freq, pair_count, where)
            for p in changed:
                if pair_count[p] > 0:
                    heapq.heappush(heap, (-pair_count[p], p))
                else:
                    del pair_count[p]
                    where.pop(p, None)
        special = {s: len(vocab) + i for i, s in enumerate(special_tokens)}
        return cls(ranks, special, pattern)

    @staticmethod
    def _count_pairs(words: list[list[int]], freq: list[int]) -> tuple[Counter, dict]:
        """pair -> how often it occurs, and pair -> which words contain it."""
        pair_count: Counter = Counter()
        where: dict[tuple[int, int], set[int]] = {}
        for wi, word in enumerate(words):
            for pair in pairwise(word):
                pair_count[pair] += freq[wi]
                where.setdefault(pair, set()).add(wi)
        return pair_count, where

    @staticmethod
    def _merge_everywhere(pair, new_id, words, freq, pair_count, where) -> set:
        """Replace ``pair`` by ``new_id`` in every word that holds it, and update the counts of the
        pairs around it. Returns the pairs whose counts changed."""
        changed = set()
        for wi in where.pop(pair):
            old = words[wi]
            new = _merge(old, pair, new_id)
            n = freq[wi]
            for p in pairwise(old):  # the word's pairs before the merge ...
                pair_count[p] -= n
                changed.add(p)
            for p in pairwise(new):  # ... and after it
                pair_count[p] += n
                where.setdefault(p, set()).add(wi)
                changed.add(p)
            words[wi] = new
        return changed

    # --8<-- [end:train]

    # --8<-- [start:encode]
    def encode(
        self,
        text: str,
        allowed_special: Literal["all"] | Collection[str] = (),
        disallowed_special: Literal["all"] | Collection[str] = "all",
    ) -> list[int]:
        """Token ids of ``text``. Special-token text becomes its special id only when allowed; when
        disallowed (by default: every special token not allowed) it raises, as in tiktoken, because
        user text that spells ``<|endoftext|>`` must not silently end a document."""
        if allowed_special == "all":
            allowed_special = set(self.special_tokens)
        if disallowed_special == "all":
            disallowed_special = set(self.special_tokens) - set(allowed_special)
        if disallowed_special:
            found = _special_regex(disallowed_special).search(text)
            if found:
                raise ValueError(
                    f"the text contains the special token {found.group()!r}; pass it in "
                    "allowed_special to encode it as that token, or leave it out of "
                    "disallowed_special to encode it as ordinary text"
                )
        # Lone surrogates cannot be UTF-8 encoded; like tiktoken, replace them with U+FFFD.
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        ids = []
        allowed = set(allowed_special) & set(self.special_tokens)
        for i, chunk in enumerate(_split_specials(text, allowed)):
            if i % 2:
                ids.append(self.special_tokens[chunk])
            else:
                ids.extend(self._encode_ordinary(chunk))
        return ids

    def _encode_ordinary(self, text: str) -> list[int]:
        ids: list[int] = []
        cache = self._cache
        for piece in self._split.findall(text):
            piece_ids = cache.get(piece)
            if piece_ids is None:
                if len(cache) >= 1 << 20:  # bound the memory a huge corpus can take
                    cache.clear()
                piece_ids = cache[piece] = self._bpe(piece.encode("utf-8"))
            ids += piece_ids
        return ids

    def _bpe(self, piece: bytes, max_rank: int | None = None) -> list[int]:
        """Merge the adjacent pair with the lowest-ranked concatenation until none is in the
        vocabulary (or below ``max_rank``); among equal ranks the leftmost pair goes first."""
        ranks = self.mergeable_ranks
        if max_rank is None and piece in ranks:  # a whole known pre-token is one token
            return [ranks[piece]]
        parts = [piece[i : i + 1] for i in range(len(piece))]
        limit = self._no_rank if max_rank is None else max_rank
        while len(parts) > 1:
            best, best_rank = -1, limit
            for i in range(len(parts) - 1):
                rank = ranks.get(parts[i] + parts[i + 1], limit)
                if rank < best_rank:
                    best, best_rank = i, rank
            if best < 0:
                break
            parts[best : best + 2] = [parts[best] + parts[best + 1]]
        return [ranks[p] for p in parts]

    # --8<-- [end:encode]

    # --8<-- [start:decode]
    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``. A slice of ids can end inside a multi-byte character; its bytes are not
        valid UTF-8 and become U+FFFD, as in tiktoken."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The raw bytes of ``ids``: what a stream of tokens must be decoded from, since one token
        can hold part of a character."""
        return b"".join(self._decoder[i] for i in ids)

    # --8<-- [end:decode]

    # --8<-- [start:save]
    def save(self, path: str | Path) -> None:
        """Write a JSON file a person can read: tokens in rank order, in GPT-2's printable form,
        and the fingerprint, so that a damaged file is caught when it is loaded."""
        ranks = sorted(self.mergeable_ranks.values())
        model = {
            "format": "byte-level-bpe",
            "version": 1,
            "pattern": self.pattern,
            "special_tokens": self.special_tokens,
            "fingerprint": self.fingerprint,
            "tokens": [bytes_to_printable(self._decoder[r]) for r in ranks],
        }
        if ranks != list(range(len(ranks))):  # ids with gaps (special tokens first): list them
            model["ranks"] = ranks
        write_atomically(path, json.dumps(model, ensure_ascii=False, indent=0) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "BPETokenizer":
        """The tokenizer ``save`` wrote; a file that is not one, or is damaged, is a ``UserError``."""
        try:
            model = json.loads(Path(path).read_text("utf-8"))
            if not isinstance(model, dict) or model.get("format") != "byte-level-bpe":
                raise ValueError("it is not a tokenizer saved by BPETokenizer.save")
            numbers = model.get("ranks", range(len(model["tokens"])))
            ranks = {
                printable_to_bytes(t): r for r, t in zip(numbers, model["tokens"], strict=True)
            }
            tokenizer = cls(ranks, model["special_tokens"], model["pattern"])
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
            raise UserError(f"cannot read a tokenizer from {path}: {err}") from None
        if model.get("fingerprint", tokenizer.fingerprint) != tokenizer.fingerprint:
            raise UserError(f"{path} is damaged: its tokens do not match its fingerprint")
        return tokenizer

    # --8<-- [end:save]

    # --8<-- [start:gpt2_files]
    @classmethod
    def from_gpt2_files(cls, encoder_json: str | Path, vocab_bpe: str | Path) -> "BPETokenizer":
        """Load OpenAI's GPT-2 format: ``encoder.json`` maps printable token strings to ids, and
        ``vocab.bpe`` lists the merges in rank order. A token that is neither a byte nor a merge
        result (``<|endoftext|>``) is special."""
        try:
            encoder = json.loads(Path(encoder_json).read_text("utf-8"))
            lines = Path(vocab_bpe).read_text("utf-8").splitlines()
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise UserError(
                f"cannot read GPT-2's files {encoder_json}, {vocab_bpe}: {err}"
            ) from None
        merges = [line.split(" ") for line in lines[1:] if line]  # line 0 is "#version: ..."
        if not isinstance(encoder, dict) or any(len(m) != 2 for m in merges):
            raise UserError(f"{vocab_bpe}: every line after the first must be two tokens")
        ranks: dict[bytes, int] = {}
        for s in [BYTE_TO_CHAR[b] for b in BYTE_ORDER] + [a + b for a, b in merges]:
            if s not in encoder:
                raise UserError(f"{vocab_bpe} and {encoder_json} disagree: {s!r} has no id")
            ranks[printable_to_bytes(s)] = encoder[s]
        merged = {bytes_to_printable(t) for t in ranks}
        special = {s: i for s, i in encoder.items() if s not in merged}
        try:
            return cls(ranks, special, GPT2_PATTERN)
        except ValueError as err:
            raise UserError(f"{encoder_json}: {err}") from None

    def save_gpt2_files(self, encoder_json: str | Path, vocab_bpe: str | Path) -> None:
        """Write ``encoder.json`` and ``vocab.bpe``. Each token's merge is recovered by encoding its
        bytes with only the ranks below its own: that must leave exactly two parts."""
        if any(self.mergeable_ranks[bytes([b])] != i for i, b in enumerate(BYTE_ORDER)):
            raise ValueError("GPT-2 files need the 256 byte tokens at ranks 0-255 in GPT-2's order")
        lines = ["#version: 0.2"]
        for rank in range(256, len(self.mergeable_ranks)):
            parts = self._bpe(self._decoder[rank], max_rank=rank)
            if len(parts) != 2:
                raise ValueError(f"token {rank} is not a merge of two earlier tokens")
            lines.append(" ".join(bytes_to_printable(self._decoder[p]) for p in parts))
        encoder = {bytes_to_printable(t): r for t, r in self.mergeable_ranks.items()}
        encoder |= self.special_tokens
        Path(encoder_json).write_text(json.dumps(encoder, ensure_ascii=False), "utf-8")
        Path(vocab_bpe).write_text("\n".join(lines) + "\n", "utf-8")

    # --8<-- [end:gpt2_files]

    # --8<-- [start:tokenizer_json]
    @classmethod
    def from_tokenizer_json(cls, spec: dict) -> "BPETokenizer":
        """Our BPE equal to a Hugging Face ``tokenizer.json`` (parsed), or a ``ValueError`` that
        names the first thing in it that ours does not do exactly.

        Ours is one split pattern, then byte-level BPE by rank, with nothing before or after. So
        the file must have no normalizer, a byte-level pre-tokenizer that is one regular
        expression, and BPE merges that our rule reproduces: a merge's token must be ranked after
        every earlier merge's, and merging its bytes with only the tokens ranked below it must give
        back exactly the two parts the file lists (``save_gpt2_files`` relies on the same)."""
        model = spec.get("model") or {}
        if model.get("type") != "BPE" or model.get("byte_fallback") or model.get("dropout"):
            raise ValueError("its model is not plain BPE")
        if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
            raise ValueError("its BPE marks word pieces with a prefix or suffix")
        if spec.get("normalizer"):
            raise ValueError(f"it normalises text first ({spec['normalizer'].get('type')}), "
                             "which our BPE does not do")  # fmt: skip
        pattern = _split_pattern(spec.get("pre_tokenizer"))
        if (spec.get("decoder") or {}).get("type") != "ByteLevel":
            raise ValueError("its decoder is not byte-level")
        added = spec.get("added_tokens", [])
        if any(t.get(k) for t in added for k in ("lstrip", "rstrip", "single_word")):
            raise ValueError("an added token strips spaces around it or must be a whole word")
        special = {t["content"]: t["id"] for t in added}
        vocab = {s: i for s, i in model["vocab"].items() if s not in special}
        ranks = {printable_to_bytes(s): i for s, i in vocab.items()}
        merges = [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]
        made = [vocab.get(a + b) for a, b in merges]
        if None in made or made != sorted(set(made)) or len(ranks) != 256 + len(merges):
            raise ValueError("its merges are not its tokens in id order, one merge per token")
        tokenizer = cls(ranks, special, pattern)
        for (a, b), rank in zip(merges, made, strict=True):
            if tokenizer._bpe(printable_to_bytes(a + b), max_rank=rank) != [vocab[a], vocab[b]]:
                raise ValueError(
                    f"merging by rank does not rebuild token {rank} from {a!r} + {b!r}"
                )
        return tokenizer

    # --8<-- [end:tokenizer_json]


def _merge(word: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """``word`` with every occurrence of ``pair`` (left to right, not overlapping) made ``new_id``."""
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == pair[0] and word[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def _special_regex(tokens: Collection[str]) -> "regex.Pattern":
    # Longest first, so a special token that contains another wins.
    return regex.compile("|".join(regex.escape(t) for t in sorted(tokens, key=len, reverse=True)))


def _split_specials(text: str, specials: Collection[str]) -> list[str]:
    """``[text, special, text, special, ..., text]``: odd positions hold special tokens."""
    if not specials:
        return [text]
    return regex.split(f"({_special_regex(specials).pattern})", text)


# --8<-- [start:split_pattern]
def _split_pattern(pre_tokenizer: dict | None) -> str:
    """The one split pattern that a byte-level pre-tokenizer of ``tokenizer.json`` applies: GPT-2's
    (``ByteLevel`` with its regex), or a ``Split`` by a regex followed by ``ByteLevel`` without one.
    In both, the pieces between matches are kept; the patterns match every character, so there
    are none, and ``findall`` gives the same pieces."""
    steps = (pre_tokenizer or {}).get("pretokenizers", [pre_tokenizer or {}])
    byte_level = steps[-1]
    if byte_level.get("type") != "ByteLevel" or byte_level.get("add_prefix_space"):
        raise ValueError("its pre-tokenizer is not byte-level without an added prefix space")
    if len(steps) == 1 and byte_level.get("use_regex", True):
        return GPT2_PATTERN
    split = steps[0]
    if (len(steps) == 2 and not byte_level.get("use_regex", True) and split.get("type") == "Split"
            and "Regex" in split.get("pattern", {}) and split.get("behavior") == "Isolated"
            and not split.get("invert")):  # fmt: skip
        return split["pattern"]["Regex"]
    raise ValueError(f"its pre-tokenizer ({', '.join(s.get('type', '?') for s in steps)}) is "
                     "not one split pattern")  # fmt: skip


# --8<-- [end:split_pattern]


# --8<-- [start:hf_tokenizer]
class HFTokenizer:
    """A ``tokenizer.json`` that our BPE cannot represent exactly, run by Hugging Face's
    ``tokenizers`` package behind the interface the commands use.

    ``tokenizers`` reads special-token text as the special token wherever it appears, so
    ``encode`` cannot be told otherwise."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer  # needed only for the tokenizers ours cannot represent

        self.text = Path(path).read_text("utf-8")
        self._tokenizer = Tokenizer.from_str(self.text)
        self.special_tokens = {t.content: i for i, t in
                               self._tokenizer.get_added_tokens_decoder().items()}  # fmt: skip
        self._byte_level = (json.loads(self.text).get("decoder") or {}).get("type") == "ByteLevel"

    @property
    def n_vocab(self) -> int:
        return max(self._tokenizer.get_vocab(with_added_tokens=True).values()) + 1

    @property
    def eot_token(self) -> int | None:
        return self.special_tokens.get(ENDOFTEXT)

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    def encode(self, text: str, allowed_special="all", disallowed_special="all") -> list[int]:
        if allowed_special != "all" and disallowed_special != "all":
            raise UserError("this tokenizer (run by the tokenizers package) always reads "
                            "special-token text as the special token")  # fmt: skip
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        ids = list(ids)
        if not self._byte_level:  # its tokens are text, not bytes: a character is never split
            return self._tokenizer.decode(ids, skip_special_tokens=False).encode("utf-8")
        names = {i: s for s, i in self.special_tokens.items()}
        return b"".join(names[i].encode("utf-8") if i in names else
                        printable_to_bytes(self._tokenizer.id_to_token(i)) for i in ids)  # fmt: skip

    def save(self, path: str | Path) -> None:
        write_atomically(path, self.text)


def load_tokenizer_json(path: str | Path) -> "BPETokenizer | HFTokenizer":
    """A Hugging Face ``tokenizer.json``: our BPE when it represents the file exactly, otherwise
    the ``tokenizers`` package, with a note on stderr saying why."""
    try:
        spec = json.loads(Path(path).read_text("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read the tokenizer {path}: {err}") from None
    try:
        return BPETokenizer.from_tokenizer_json(spec)
    except (ValueError, KeyError, TypeError, AttributeError) as why:
        print(f"note: {path}: our BPE cannot represent it exactly ({why}); tokenizing with the "
              "tokenizers package", file=sys.stderr)  # fmt: skip
        return HFTokenizer(path)


def is_tokenizer_json(path: Path) -> bool:
    """Whether ``path`` is a Hugging Face ``tokenizer.json`` (which has a ``model`` section)
    rather than a file our ``save`` wrote (which says ``"format": "byte-level-bpe"``)."""
    with open(path, "rb") as f:
        head = f.read(1 << 20)  # "model" follows the added tokens, which can fill many KB
    return b'"model"' in head and b'"byte-level-bpe"' not in head[:256]


# --8<-- [end:hf_tokenizer]


# --8<-- [start:get_tokenizer]
def get_tokenizer(spec: str):
    """``"gpt2"``: tiktoken's GPT-2 encoding; a directory with ``encoder.json`` and ``vocab.bpe``:
    our BPE from GPT-2's files; a directory with a ``tokenizer.json``, or such a file: Hugging
    Face's format (``load_tokenizer_json``); another file: our BPE saved with ``save``."""
    if spec == "gpt2":
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception as err:  # tiktoken fetches its files over HTTP on first use
            raise UserError(
                "tiktoken could not fetch GPT-2's files (offline?): connect once so they are "
                "cached, or pass a directory holding GPT-2's encoder.json and vocab.bpe "
                f"({type(err).__name__})"
            ) from None
    path = Path(spec)
    if path.is_dir() and (path / "tokenizer.json").is_file():
        return load_tokenizer_json(path / "tokenizer.json")
    if path.is_dir():
        encoder, merges = path / "encoder.json", path / "vocab.bpe"
        if not (encoder.is_file() and merges.is_file()):
            raise UserError(
                f"{path} must hold GPT-2's encoder.json and vocab.bpe, or a tokenizer.json"
            )
        return BPETokenizer.from_gpt2_files(encoder, merges)
    if path.is_file():
        return load_tokenizer_json(path) if is_tokenizer_json(path) else BPETokenizer.load(path)
    raise UserError(
        f"no tokenizer {spec!r}: expected 'gpt2', a directory with GPT-2's files or a "
        "tokenizer.json, a tokenizer.json, or a file saved by BPETokenizer.save"
    )


# --8<-- [end:get_tokenizer]
