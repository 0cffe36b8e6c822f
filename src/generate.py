"""Generating text: turn a model that scores the next token into one that writes.

The model gives logits for the next token at every position; generation repeatedly takes the last
position's logits, picks a token, appends it, and feeds the longer sequence back in. *How* the token
is picked decides the character of the text:

- greedy (``temperature=0``): always the most likely token; deterministic, often repetitive;
- temperature: divide the logits by ``temperature`` before the softmax; below 1 sharpens the
  distribution, above 1 flattens it;
- top-k: sample only among the ``k`` most likely tokens, so the long tail of unlikely tokens can
  never be drawn;
- top-p (nucleus): sample only among the most likely tokens whose probabilities add up to ``p``;
  the candidate set is small where the model is sure and wide where it is not.

Feeding the whole sequence back in for every new token repeats work: the keys and values of the
earlier tokens do not change. The *KV cache* keeps them, so after the prompt each step runs the
model on one token. Greedy decoding gives the same tokens with and without it.

Run it on a trained checkpoint, or on OpenAI's GPT-2 weights::

    uv run python -m src.generate --checkpoint runs/default --prompt "Once upon a time"
    uv run python -m src.generate --pretrained gpt2 --prompt "Once upon a time"
"""

import codecs
import math
import sys
import time
from collections.abc import Iterator

import torch

from src.attention import KVCache
from src.errors import UserError


# --8<-- [start:filters]
def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """(..., V) logits with all but the ``k`` largest of each row set to -inf."""
    kth_best = torch.topk(logits, min(k, logits.shape[-1])).values[..., -1:]  # (..., 1)
    return logits.masked_fill(logits < kth_best, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """(..., V) logits with all but the nucleus set to -inf: the most probable tokens whose
    probabilities, added in that order, first reach ``p``. The most likely token always stays."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (..., V)
    probs = torch.softmax(sorted_logits, dim=-1)
    # Drop a token when the more likely ones before it already reach p.
    mass_before = torch.cumsum(probs, dim=-1) - probs
    drop = torch.zeros_like(mass_before, dtype=torch.bool).scatter(-1, order, mass_before >= p)
    return logits.masked_fill(drop, float("-inf"))  # drop is back in vocabulary order


# --8<-- [end:filters]


# --8<-- [start:sample]
def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Settings that cannot sample: refused before the first token, in the user's own terms."""
    if not (math.isfinite(temperature) and temperature >= 0):
        raise UserError(f"temperature must be a number >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise UserError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise UserError(f"top_p must be in (0, 1], got {top_p}")


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token per row from next-token logits (B, vocab_size); returns (B, 1)."""
    if temperature == 0.0:
        return logits.argmax(dim=-1, keepdim=True)  # greedy
    logits = logits / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)


# --8<-- [end:sample]


# --8<-- [start:stream]
@torch.no_grad()
def stream(
    model: torch.nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    context_length: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, (B, 1), as soon as it is chosen.

    Stops early once every row has produced ``eos_id`` (rows that finished earlier keep
    receiving ``eos_id``). With ``use_cache`` the prompt runs once to fill a ``KVCache`` per
    block and every later step feeds only the newest token. Once the sequence outgrows
    ``context_length`` the window slides, the positions of every token change, and the cache is
    rebuilt from the window at each step: exactly what the uncached path computes.
    """
    check_sampling(temperature, top_k, top_p)  # now, not at the first token
    if max_new_tokens < 0:
        raise UserError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    args = (temperature, top_k, top_p, eos_id, generator)
    return _tokens(model, idx, max_new_tokens, context_length, *args, use_cache)


def _tokens(model, idx, max_new_tokens, context_length, temperature, top_k, top_p, eos_id,
            generator, use_cache) -> Iterator[torch.Tensor]:  # fmt: skip
    finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
    cache = None
    for _ in range(max_new_tokens):
        if cache is not None and idx.shape[1] <= context_length:
            logits = model(idx[:, -1:], kv_cache=cache)  # only the newest token
        else:
            cache = [KVCache() for _ in model.trf_blocks] if use_cache else None
            logits = model(idx[:, -context_length:], kv_cache=cache)
        idx_next = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)  # (B, 1)
        if eos_id is not None:
            idx_next = idx_next.masked_fill(finished[:, None], eos_id)
            finished |= idx_next[:, 0] == eos_id
        idx = torch.cat([idx, idx_next], dim=1)  # (B, T + 1)
        yield idx_next
        if eos_id is not None and finished.all():
            return


# --8<-- [end:stream]


# --8<-- [start:generate]
def generate(
    model: torch.nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    context_length: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> torch.Tensor:
    """Extend ``idx`` (B, T) by up to ``max_new_tokens`` tokens; returns (B, T + new)."""
    new = stream(
        model, idx, max_new_tokens, context_length,
        temperature, top_k, top_p, eos_id, generator, use_cache,
    )  # fmt: skip
    return torch.cat([idx, *new], dim=1)


# --8<-- [end:generate]


# --8<-- [start:cli]
# The command line. It needs the checkpoint and weight loaders, which sit above this chapter, so it
# imports them when it runs: the library above imports nothing but the model's own modules.
def build_parser():
    from src.cli import Parser, add_model_source, count, positive_int

    p = Parser(
        prog="python -m src.generate",
        description="Continue a prompt with a trained checkpoint, printing tokens as they come.",
    )
    add_model_source(p, required=True)
    a = p.add_argument
    a("--prompt", default="", help="text to continue ('' starts from end-of-text)")
    a("--max-new-tokens", type=count, default=200, help="tokens to generate at most")
    a("--temperature", type=float, default=0.8,
      help="0 is greedy; below 1 sharpens, above 1 flattens the distribution")  # fmt: skip
    a("--top-k", type=positive_int, help="sample among the k most likely tokens")
    a(
        "--top-p",
        type=float,
        help="sample among the most likely tokens whose probabilities sum to p",
    )
    a("--no-kv-cache", action="store_true",
      help="recompute the whole sequence for every token (to compare speed)")  # fmt: skip
    a("--seed", type=int, default=123, help="seed of the sampling generator")
    a("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto")
    return p


def write(args) -> int:
    """Stream the continuation of ``--prompt`` to stdout, and its speed to stderr."""
    from src.cli import load_model_source
    from src.training import resolve_device

    check_sampling(args.temperature, args.top_k, args.top_p)
    device = resolve_device(args.device)
    model, tokenizer, _ = load_model_source(args, device, drop_rate=0.0)
    model.eval()
    ids = tokenizer.encode(args.prompt, allowed_special="all") or [tokenizer.eot_token]
    if None in ids:
        raise UserError(
            "--prompt is empty and this tokenizer has no end-of-text token to start from"
        )
    context_length = model.cfg.context_length
    idx = torch.tensor([ids[-context_length:]], device=device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    print(args.prompt, end="", flush=True)
    # Tokens arrive one at a time, and a character can span two of them: an incremental UTF-8
    # decoder holds back an unfinished character until its last byte arrives.
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    start, n = time.perf_counter(), 0
    for token in stream(
        model, idx, args.max_new_tokens, context_length, args.temperature, args.top_k,
        args.top_p, tokenizer.eot_token, generator, use_cache=not args.no_kv_cache,
    ):  # fmt: skip
        n += 1
        if token.item() == tokenizer.eot_token:
            break
        print(utf8.decode(tokenizer.decode_bytes([token.item()])), end="", flush=True)
    print(utf8.decode(b"", final=True), end="")  # an unfinished character at the end: U+FFFD
    seconds = max(time.perf_counter() - start, 1e-9)
    cache = "off" if args.no_kv_cache else "on"
    print(f"\n\n[{n} tokens in {seconds:.2f} s, {n / seconds:.1f} tokens/s, KV cache {cache}]",
          file=sys.stderr)  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    from src.cli import run_command

    return run_command(build_parser(), write, argv)


# --8<-- [end:cli]


if __name__ == "__main__":
    sys.exit(main())
