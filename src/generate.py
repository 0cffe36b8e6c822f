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
import torch.nn.functional as F

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


def sampling_probs(
    logits: torch.Tensor, temperature: float, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """The distribution a token is drawn from, (..., V): softmax of the logits divided by the
    temperature (> 0), after the top-k and top-p cuts."""
    logits = logits / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    return torch.softmax(logits, dim=-1)


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
    probs = sampling_probs(logits, temperature, top_k, top_p)
    return torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)


# --8<-- [end:sample]


# --8<-- [start:stream]
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
    padding: torch.Tensor | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, (B, 1), as soon as it is chosen.

    Stops early once every row has produced ``eos_id`` (rows that finished earlier keep
    receiving ``eos_id``). With ``use_cache`` the prompt runs once to fill a ``KVCache`` per
    block and every later step feeds only the newest token. Once the sequence outgrows
    ``context_length`` the window slides, the positions of every token change, and the cache is
    rebuilt from the window at each step: exactly what the uncached path computes.

    ``padding`` (B,): rows padded on the left to one length (``left_pad``), each row's count of
    padding tokens. The cache carries it, so it needs ``use_cache``.
    """
    check_sampling(temperature, top_k, top_p)  # now, not at the first token
    if max_new_tokens < 0:
        raise UserError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if padding is not None and not use_cache:
        raise UserError("padded prompts need the KV cache: it is what hides the padding")
    args = (temperature, top_k, top_p, eos_id, generator)
    return _tokens(model, idx, max_new_tokens, context_length, *args, use_cache, padding)


@torch.no_grad()  # on the generator itself: its body runs while the caller iterates
def _tokens(model, idx, max_new_tokens, context_length, temperature, top_k, top_p, eos_id,
            generator, use_cache, padding) -> Iterator[torch.Tensor]:  # fmt: skip
    B, T = idx.shape
    ids = idx.new_empty(B, T + max_new_tokens)  # the whole text, each new token written in place
    ids[:, :T] = idx
    finished = torch.zeros(B, dtype=torch.bool, device=idx.device)
    cache = None
    for n in range(T, T + max_new_tokens):  # n: the tokens so far
        if cache is not None and n <= context_length:
            logits = model(ids[:, n - 1 : n], kv_cache=cache)  # only the newest token
        else:
            start = max(0, n - context_length)  # the window: the last context_length tokens
            if use_cache:  # room for the window and the tokens still to come, within the context
                room = min(context_length, T + max_new_tokens - start)
                pad = None if padding is None else (padding - start).clamp(min=0)
                cache = [KVCache(room, pad) for _ in model.trf_blocks]
            logits = model(ids[:, start:n], kv_cache=cache)
        idx_next = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)  # (B, 1)
        if eos_id is not None:
            idx_next = idx_next.masked_fill(finished[:, None], eos_id)
            finished |= idx_next[:, 0] == eos_id
        ids[:, n] = idx_next[:, 0]
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
    padding: torch.Tensor | None = None,
) -> torch.Tensor:
    """Extend ``idx`` (B, T) by up to ``max_new_tokens`` tokens; returns (B, T + new)."""
    new = stream(
        model, idx, max_new_tokens, context_length,
        temperature, top_k, top_p, eos_id, generator, use_cache, padding,
    )  # fmt: skip
    return torch.cat([idx, *new], dim=1)


# --8<-- [end:generate]


# --8<-- [start:left_pad]
def left_pad(
    prompts: list[list[int]], pad_id: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths as one batch: (B, T) ids, each prompt at the right end behind
    ``pad_id`` tokens, and (B,) the number of padding tokens in each row (``padding=``).

    On the right end, every row's next token goes into the same slot of the cache, so one step
    serves the whole batch; the padding is hidden by the cache's mask."""
    if not prompts or min(len(p) for p in prompts) == 0:
        raise UserError("every prompt of a batch needs at least one token")
    T = max(len(p) for p in prompts)
    idx = torch.tensor([[pad_id] * (T - len(p)) + list(p) for p in prompts], device=device)
    return idx, torch.tensor([T - len(p) for p in prompts], device=device)


# --8<-- [end:left_pad]


# --8<-- [start:accept]
def accept_or_resample(
    p: torch.Tensor, q: torch.Tensor, drafted: torch.Tensor, generator: torch.Generator | None
) -> tuple[int, torch.Tensor]:
    """The rule of speculative sampling (Leviathan et al. 2023; Chen et al. 2023).

    ``drafted`` (k,) are the draft's tokens, drawn from its distributions ``q`` (k, V); ``p``
    (k + 1, V) are the target's at the same positions and the one after. Draft token ``x_i`` is
    kept with probability min(1, p_i(x_i) / q_i(x_i)); at the first one rejected, the token in its
    place is drawn from max(0, p_i - q_i), normalised; when all k are kept, one more is drawn from
    p_k. Returns the number kept and the token after them, (1,). Each token is then distributed
    exactly as the target's p, whatever the draft proposes: the draft only sets how many are kept.
    """
    k = drafted.shape[0]
    rows = torch.arange(k, device=drafted.device)
    ratio = p[rows, drafted] / q[rows, drafted]  # (k,) p_i(x_i) / q_i(x_i); q_i(x_i) > 0: drawn
    kept = torch.rand(k, generator=generator, device=p.device) < ratio  # probability min(1, ratio)
    n = int(kept.long().cumprod(dim=0).sum())  # the draft tokens kept before the first rejection
    if n < k:
        residual = (p[n] - q[n]).clamp(min=0)  # max(0, p - q): where the draft proposes too little
        return n, torch.multinomial(residual / residual.sum(), 1, generator=generator)
    return k, torch.multinomial(p[k], 1, generator=generator)


# --8<-- [end:accept]


# --8<-- [start:speculative]
def speculative_rounds(
    target: torch.nn.Module,
    draft: torch.nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    context_length: int,
    draft_tokens: int = 4,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[torch.Tensor, int]]:
    """Speculative decoding of one sequence ``idx`` (1, T), round by round.

    A round: the draft proposes ``k`` tokens one at a time; the target scores all of them in one
    pass; the longest acceptable run of them is kept, and the target adds one token of its own.
    Yields each round's new tokens, (1, n) with 1 <= n <= k + 1, and k (n - 1 were accepted).
    """
    check_sampling(temperature, top_k, top_p)
    if target.cfg.vocab_size != draft.cfg.vocab_size:
        raise UserError(f"the draft scores {draft.cfg.vocab_size} tokens, the model "
                        f"{target.cfg.vocab_size}: they need the same tokenizer")  # fmt: skip
    if draft_tokens < 1:
        raise UserError(f"draft_tokens must be >= 1, got {draft_tokens}")
    sampling = (temperature, top_k, top_p, generator)
    return _rounds(target, draft, idx, max_new_tokens, context_length, draft_tokens, sampling)


@torch.no_grad()
def _rounds(target, draft, idx, max_new_tokens, context_length, draft_tokens, sampling):
    window = min(context_length, draft.cfg.context_length)  # both models see every position
    room = min(window, idx.shape[1] + max_new_tokens + draft_tokens)
    target_cache = [KVCache(room) for _ in target.trf_blocks]
    draft_cache = [KVCache(room) for _ in draft.trf_blocks]
    done = 0
    while done < max_new_tokens:
        n = idx.shape[1]
        k = min(draft_tokens, max_new_tokens - done - 1, window - n)  # leave room for the target's
        if k < 0:  # the text fills the window: past it, every step moves every position
            rest = stream(target, idx, max_new_tokens - done, context_length, *sampling[:3],
                          generator=sampling[3])  # fmt: skip
            yield from ((token, 0) for token in rest)
            return
        drafted, q = _draft(draft, draft_cache, idx, k, sampling)  # (k,), (k, V)
        fresh = torch.cat([idx[:, target_cache[0].length :], drafted[None]], dim=1)
        logits = target(fresh, kv_cache=target_cache)[0, -(k + 1) :]  # (k + 1, V): one pass
        if sampling[0] == 0.0:  # greedy: keep the drafts that equal the target's own argmax
            best = logits.argmax(dim=-1)  # (k + 1,)
            kept = int((best[:k] == drafted).long().cumprod(dim=0).sum())
            after = best[kept : kept + 1]
        else:
            p = sampling_probs(logits, *sampling[:3])  # (k + 1, V)
            kept, after = accept_or_resample(p, q, drafted, sampling[3])
        new = torch.cat([drafted[:kept], after])[None]  # (1, kept + 1)
        idx = torch.cat([idx, new], dim=1)
        for cache in target_cache + draft_cache:  # forget the rejected drafts
            cache.rewind(idx.shape[1] - 1)  # everything but the newest token, fed next round
        done += new.shape[1]
        yield new, k


def _draft(draft, cache, idx, k, sampling) -> tuple[torch.Tensor, torch.Tensor]:
    """``k`` tokens from the draft, each drawn from its distribution, and those distributions
    (k, V) (when sampling; greedy needs none)."""
    temperature, top_k, top_p, generator = sampling
    tokens, probs = [], []
    fresh = idx[:, cache[0].length :]  # what the draft has not seen yet: one token, or two
    for _ in range(k):
        logits = draft(fresh, kv_cache=cache)[0, -1]  # (V,)
        if temperature == 0.0:
            token = logits.argmax(dim=-1, keepdim=True)
        else:
            probs.append(sampling_probs(logits, temperature, top_k, top_p))
            token = torch.multinomial(probs[-1], 1, generator=generator)
        tokens.append(token)
        fresh = token[None]  # (1, 1)
    drafted = torch.cat(tokens) if tokens else idx.new_empty(0)
    return drafted, torch.stack(probs) if probs else torch.empty(0, draft.cfg.vocab_size)


def speculative_generate(
    target: torch.nn.Module,
    draft: torch.nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    context_length: int,
    draft_tokens: int = 4,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``generate`` for ``target``, sped up by ``draft``; returns (B, T + new).

    Rows run one after another, as each accepts its own number of draft tokens. A row that ends
    with ``eos_id`` before the others is filled with ``eos_id``, as ``generate`` fills it."""
    if max_new_tokens < 0:
        raise UserError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    settings = (max_new_tokens, context_length, draft_tokens, temperature, top_k, top_p, generator)
    rows = [_speculative_row(target, draft, row, eos_id, settings) for row in idx]  # (T + n,) each
    longest = max(len(row) for row in rows)
    # Only a row that ended at eos_id can be shorter than the longest.
    return torch.stack([F.pad(row, (0, longest - len(row)), value=eos_id or 0) for row in rows])


def _speculative_row(target, draft, row, eos_id, settings) -> torch.Tensor:
    """One row, (T,), extended until ``max_new_tokens`` or up to its first ``eos_id``."""
    new = []
    for tokens, _ in speculative_rounds(target, draft, row[None], *settings):
        new.append(tokens[0])
        if eos_id is not None and (tokens == eos_id).any():
            break
    new = torch.cat([row.new_empty(0), *new])
    if eos_id is not None and (new == eos_id).any():
        new = new[: int((new == eos_id).nonzero()[0]) + 1]  # up to the first end-of-text
    return torch.cat([row, new])


# --8<-- [end:speculative]


# --8<-- [start:cli]
# The command line. It needs the checkpoint and weight loaders, which sit above this chapter, so it
# imports them when it runs: the library above imports nothing but the model's own modules.
def build_parser():
    from src.cli import Parser, add_model_source, add_quantization, count, positive_int

    p = Parser(
        prog="python -m src.generate",
        description="Continue a prompt with a trained checkpoint, printing tokens as they come.",
    )
    add_model_source(p, required=True)
    add_quantization(p)
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
    a("--draft", metavar="CHECKPOINT", help="speculative decoding: a smaller model trained with "
      "the same tokenizer (a run folder of python -m src.train) drafts, the model checks")  # fmt: skip
    a("--draft-tokens", type=positive_int, default=4, help="tokens the draft proposes per round")
    a("--seed", type=int, default=123, help="seed of the sampling generator")
    a("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    return p


def write(args) -> int:
    """Stream the continuation of ``--prompt`` to stdout, and its speed to stderr."""
    from src.cli import load_draft, load_model_source
    from src.training import resolve_device

    check_sampling(args.temperature, args.top_k, args.top_p)
    if args.draft and args.no_kv_cache:
        raise UserError("--draft needs the KV cache: leave out --no-kv-cache")
    device = resolve_device(args.device)
    model, tokenizer, _ = load_model_source(args, device, drop_rate=0.0)
    model.eval()
    draft = load_draft(args.draft, tokenizer, device) if args.draft else None
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
    start, n, drafts = time.perf_counter(), 0, {"proposed": 0, "accepted": 0}
    for token in _new_tokens(args, model, draft, idx, tokenizer.eot_token, generator, drafts):
        n += 1
        if token.item() == tokenizer.eot_token:
            break
        print(utf8.decode(tokenizer.decode_bytes([token.item()])), end="", flush=True)
    print(utf8.decode(b"", final=True), end="")  # an unfinished character at the end: U+FFFD
    seconds = max(time.perf_counter() - start, 1e-9)
    cache = "off" if args.no_kv_cache else "on"
    said = f"{n} tokens in {seconds:.2f} s, {n / seconds:.1f} tokens/s, KV cache {cache}"
    if getattr(model, "quantization", None):
        said += f", weights {quantization_name(model.quantization)}"
    if draft is not None:
        accepted = drafts["accepted"] / max(drafts["proposed"], 1)
        said += f", draft tokens accepted {accepted:.0%} ({args.draft_tokens} per round)"
    print(f"\n\n[{said}]", file=sys.stderr)
    return 0


def _new_tokens(args, model, draft, idx, eos_id, generator, drafts) -> Iterator[torch.Tensor]:
    """The tokens of the continuation, one at a time: from the model alone, or drafted and checked
    (``drafts`` counts the draft tokens proposed and accepted)."""
    sampling = (args.temperature, args.top_k, args.top_p)
    if draft is None:
        yield from stream(model, idx, args.max_new_tokens, model.cfg.context_length, *sampling,
                          eos_id, generator, use_cache=not args.no_kv_cache)  # fmt: skip
        return
    for tokens, proposed in speculative_rounds(model, draft, idx, args.max_new_tokens,
                                               model.cfg.context_length, args.draft_tokens,
                                               *sampling, generator):  # fmt: skip
        drafts["proposed"] += proposed
        drafts["accepted"] += tokens.shape[1] - 1
        yield from tokens[0]


def quantization_name(settings: dict) -> str:
    """How the weights were quantized: ``int4, a scale per 64 weights``, ``int8, a scale per row``."""
    group = settings["group_size"]
    return f"int{settings['bits']}, a scale per " + (f"{group} weights" if group else "row")


def main(argv: list[str] | None = None) -> int:
    from src.cli import run_command

    return run_command(build_parser(), write, argv)


# --8<-- [end:cli]


if __name__ == "__main__":
    sys.exit(main())
