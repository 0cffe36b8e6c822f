"""Typical wrong answers to the compute chapter's exercises."""


def flops_per_token(n_layers, emb_dim, context_length, vocab_size):
    # The rule of thumb 6N: the weights' multiplies only, attention's products with the keys and
    # values left out.
    N = 12 * n_layers * emb_dim**2 + emb_dim * vocab_size
    return 6 * N


def newton_schulz(G, steps=5):
    # Iterates on G as it is: its singular values are not in (0, 1], and the polynomial takes any
    # above about 1.5 further away from 1 at every step.
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G if G.shape[0] <= G.shape[1] else G.T
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X if G.shape[0] <= G.shape[1] else X.T


def optimal_size(C, E, A, B, alpha, beta):
    # The exponents swapped: N_opt ~ C^(alpha / (alpha + beta)).
    G = (alpha * A / (beta * B)) ** (1 / (alpha + beta))
    N = G * (C / 6) ** (alpha / (alpha + beta))
    return N  # and D_opt = C / (6 N)
