"""Your turn: making it small and fast. Check with ``uv run python -m exercises small-and-fast``."""

import torch


def quantize_absmax(
    weight: torch.Tensor, bits: int, group_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmax quantization of a (rows, cols) float weight matrix to ``bits``-bit integers.

    Cut each row into groups of ``group_size`` consecutive weights (None: the whole row is one
    group). Each group gets one scale ``s = max |w| / q_max`` with ``q_max = 2**(bits - 1) - 1``
    (127 for int8, 7 for int4), and each weight becomes ``q = round(w / s)``, clamped to
    [-q_max, q_max]. Returns ``q`` (rows, cols) int8 and ``scales`` (rows, cols / group_size)
    float32. A group of zeros must not divide by zero: clamp every scale to at least
    ``torch.finfo(torch.float32).tiny`` (its integers are then 0).
    """
    raise NotImplementedError


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Two 4-bit integers in one byte: (..., cols) int8 in [-8, 7], cols even ->
    (..., cols / 2) uint8.

    Shift each value by 8 into [0, 15] (four bits with no sign); byte ``j`` holds column ``2j`` in
    its low four bits and column ``2j + 1`` in its high four bits.
    """
    raise NotImplementedError


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The distribution speculative sampling draws from when it rejects a draft token:
    ``max(0, p - q)``, normalised to sum to 1.

    ``p`` is the target's next-token distribution, ``q`` the draft's, (V,) or (B, V), each row on
    its own. Where the draft proposes a token less often than the target would write it, the
    residual makes up the difference; where it proposes it too often, the residual is 0.
    ``p`` and ``q`` differ in every row you are given.
    """
    raise NotImplementedError
