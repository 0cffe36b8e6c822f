"""Your turn: text to tokens. Check with ``uv run python -m exercises tokens``."""


def merge(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """``ids`` with every occurrence of ``pair`` replaced by ``new_id``.

    Scan left to right; occurrences do not overlap: ``merge([1, 1, 1], (1, 1), 9) == [9, 1]``.
    This is the step BPE training repeats for every new token.
    """
    raise NotImplementedError


def most_frequent_pair(ids: list[int]) -> tuple[int, int] | None:
    """The pair of adjacent ids that occurs most often in ``ids``, counting every position
    (``[5, 5, 5]`` holds ``(5, 5)`` twice). On a tie, the smallest pair (compared as tuples).
    None when there are fewer than two ids. This is the pair BPE training merges next.
    """
    raise NotImplementedError


def encode_word(word: bytes, ranks: dict[bytes, int]) -> list[int]:
    """The ids of one pre-token, as the tokenizer encodes it.

    Start from the single bytes of ``word``. Repeatedly join the adjacent pair whose joined bytes
    have the lowest rank in ``ranks`` (the leftmost such pair among equals), until no adjacent pair
    joins into a known token. Return the ranks of the parts. ``ranks`` holds every single byte.
    """
    raise NotImplementedError
