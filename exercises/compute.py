"""Your turn: compute and scaling laws. Check with ``uv run python -m exercises compute``."""

import torch


def flops_per_token(n_layers: int, emb_dim: int, context_length: int, vocab_size: int) -> int:
    """The matrix-multiply FLOPs of one training step (forward and backward pass) per token of a
    full window of ``context_length`` tokens, for our GPT model (no biases, 4x feed-forward, the
    head untied), counting 2 FLOPs per multiply-add.

    Count the forward pass first: per block the four attention projections, the two feed-forward
    layers, and attention's two products with T keys and T values; then the output head. The
    backward pass does two multiplies of the same size for each one of the forward pass.
    (Not ``src.flops``: the checker compares with what ``FlopCounterMode`` counts in a real
    forward and backward pass of ``GPTModel``.)
    """
    raise NotImplementedError


def newton_schulz(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """``G`` (rows, cols) with every singular value moved near 1, as Muon does it: divide by the
    Frobenius norm (plus 1e-7) so that every singular value is at most 1; work on the wide
    orientation (transpose when rows > cols, transpose back at the end); then ``steps`` times
    ``A = X X^T`` and ``X = a X + (b A + c A A) X`` with (a, b, c) = (3.4445, -4.7750, 2.0315).
    Returns a tensor of G's shape.
    """
    raise NotImplementedError


def optimal_size(C: float, E: float, A: float, B: float, alpha: float, beta: float) -> float:
    """N_opt, a float: the model size that minimises Chinchilla's law
    ``L(N, D) = E + A / N**alpha + B / D**beta`` at a fixed compute ``C = 6 N D``; the tokens it
    should see are then D_opt = C / (6 N_opt).

    Derive it: put D = C / (6 N) into L, set dL/dN to zero, and solve for N.
    """
    raise NotImplementedError
