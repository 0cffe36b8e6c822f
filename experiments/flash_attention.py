"""Break it, chapter "Fusing the whole attention": forget to rescale the running output; skip the
diagonal tile.

Both run the flash forward written in plain PyTorch (``tiled_attention``, tiles of 64, float64)
against the eager path in float64, with one line changed. Neither needs the compiled kernel: both
failures are properties of the algorithm, not of the C++.
"""

import torch

from benchmarks.harness import markdown_table

TILE = 64


def tiled_attention(q, k, v, scale: float, tile: int, rescale=True, diagonal=True) -> torch.Tensor:
    """The flash forward in plain PyTorch: query tiles against key tiles, a running maximum m and
    sum l (``total``) per row. ``rescale=False`` forgets to shrink the output accumulated so far
    when m grows; ``diagonal=False`` leaves out each query tile's diagonal key tile."""
    T = q.shape[-2]
    out = torch.empty_like(q)  # (..., T, hd)
    for q0 in range(0, T, tile):
        rows = torch.arange(q0, min(q0 + tile, T))
        m = torch.full(q.shape[:-2] + (len(rows),), float("-inf"), dtype=q.dtype)  # (..., rows)
        total = torch.zeros_like(m)  # l, the running sum
        o = torch.zeros(q.shape[:-2] + (len(rows), q.shape[-1]), dtype=q.dtype)  # (..., rows, hd)
        # --8<-- [start:flash-no-diagonal]
        last = q0 // tile if diagonal else q0 // tile - 1  # broken: q0 // tile - 1
        # --8<-- [end:flash-no-diagonal]
        for k0 in range(0, (last + 1) * tile, tile):
            cols = torch.arange(k0, min(k0 + tile, T))
            s = (q[..., rows, :] @ k[..., cols, :].transpose(-2, -1)) * scale  # (..., rows, cols)
            s = s.masked_fill(cols[None, :] > rows[:, None], float("-inf"))
            m_new = torch.maximum(m, s.amax(-1))
            p = torch.exp(s - m_new[..., None])
            alpha = torch.exp(m - m_new)  # exp(m - m'): 0 on the first tile
            total = total * alpha + p.sum(-1)  # l' = l exp(m - m') + sum p
            # --8<-- [start:flash-no-rescale]
            o = (o * alpha[..., None] if rescale else o) + p @ v[..., cols, :]  # broken: o + P V
            # --8<-- [end:flash-no-rescale]
            m = m_new
        out[..., rows, :] = o / total[..., None]
    return out


def attention_inputs(T: int) -> tuple[torch.Tensor, ...]:
    """Four heads of random float64 queries, keys and values of width 64, and the eager output."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, T, 64, dtype=torch.float64) for _ in range(3))
    mask = torch.ones(T, T, dtype=torch.bool).triu(1)
    scores = (q @ k.transpose(-2, -1) / 8).masked_fill(mask, float("-inf"))  # (1, 4, T, T)
    return q, k, v, torch.softmax(scores, -1) @ v


def flash_no_rescale(lengths: tuple[int, ...] = (64, 256, 1024, 4096)) -> str:
    """The flash forward with and without rescaling the accumulated output when the maximum grows."""
    rows = []
    for T in lengths:
        q, k, v, reference = attention_inputs(T)
        right = (tiled_attention(q, k, v, 1 / 8, TILE) - reference).abs()
        broken = tiled_attention(q, k, v, 1 / 8, TILE, rescale=False)
        wrong = (broken - reference).abs()
        norm = broken.norm(dim=-1) / reference.norm(dim=-1)
        rows.append([str(T), str(T // TILE), f"{right.max():.1e}", f"{wrong.max():.2f}",
                     f"{(wrong.amax(-1) > 0.01).double().mean():.0%}", f"{norm.mean():.2f}"])  # fmt: skip
    header = ["T", "key tiles of the last row", "max error, rescaled", "max error, not rescaled",
              "rows off by > 0.01", "mean output norm / correct"]  # fmt: skip
    return markdown_table(header, rows, align="rrrrrr")


def flash_no_diagonal(lengths: tuple[int, ...] = (64, 256, 1024)) -> str:
    """The flash forward with and without each query tile's diagonal key tile."""
    rows = []
    for T in lengths:
        q, k, v, reference = attention_inputs(T)
        out = tiled_attention(q, k, v, 1 / 8, TILE, diagonal=False)
        nan_rows = torch.isnan(out).any(-1)  # (1, 4, T)
        rest = (out - reference).abs().amax(-1)[~nan_rows]
        right = (tiled_attention(q, k, v, 1 / 8, TILE) - reference).abs().max()
        rows.append([str(T), f"{nan_rows[..., :TILE].double().mean():.0%}",
                     f"{nan_rows[..., TILE:].double().mean():.0%}" if T > TILE else "-",
                     f"{rest.max():.2f}" if rest.numel() else "-", f"{right:.1e}"])  # fmt: skip
    header = ["T", "NaN rows, first tile", "NaN rows, later tiles", "max error, later rows",
              "max error with the diagonal tile"]  # fmt: skip
    return markdown_table(header, rows, align="rrrrr")


EXPERIMENTS = {"flash-no-rescale": flash_no_rescale, "flash-no-diagonal": flash_no_diagonal}
