"""Making it small and fast, measured: the cache, batches, quantized weights, speculative decoding.

Four measurements, each a set of candidates timed against each other in this one process
(``benchmarks.harness.median_times``: interleaved rounds, medians):

- **cache**: greedy decoding of 1,000 new tokens after a 10-token prompt, ``cpu-small`` with a
  context of 1,024 (random weights: speed does not depend on them), through a cache grown by
  ``torch.cat`` at every step, as the project's cache was, and through today's preallocated one;
- **batch**: tokens/s of ``generate`` on 1, 4 and 16 prompts of different lengths, left-padded, and
  the time of a prefill against that of decoding the same number of tokens one at a time;
- **quantization**: size, validation perplexity and tokens/s of the default run's model in float32,
  int8 and int4 (groups of 32, 64, 128, and one scale per row); GPT-2's rows with ``--gpt2``;
- **speculative**: the default model alone against the default model drafted for by the draft
  run, greedy, for 2, 4 and 8 draft tokens: acceptance, speed-up, and what one round costs.

It needs the default run (``runs/default``: ``uv run python -m src.train``) and its draft
(``runs/draft``: ``uv run python -m src.train --preset cpu-draft --out-dir runs/draft``); a run that
is missing is trained first with that command, and the script says so.

    uv run python benchmarks/inference.py                # docs/assets/inference-*.md, .json
    uv run python benchmarks/inference.py --gpt2 PATH    # with GPT-2 (a local safetensors folder)
"""

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.harness import markdown_table, median_times  # noqa: E402
from src.attention import KVCache  # noqa: E402
from src.checkpoints import find_checkpoint, load_model  # noqa: E402
from src.cli import Parser, positive_int, run_command  # noqa: E402
from src.data import GPTDataset, load_corpus, split_tokens, tokenize_cached  # noqa: E402
from src.files import cache_dir, write_atomically  # noqa: E402
from src.generate import generate, left_pad, speculative_generate, speculative_rounds  # noqa: E402
from src.gpt2 import load_pretrained  # noqa: E402
from src.model import GPTConfig, GPTModel, count_parameters  # noqa: E402
from src.quantize import model_size_bytes, quantize_model, save_quantized  # noqa: E402
from src.tokenizer import get_tokenizer  # noqa: E402
from src.training import cross_entropy  # noqa: E402

OUT = REPO / "docs" / "assets"
RUNS = {  # the runs this benchmark uses, and the command that makes each
    "target": ("runs/default", ["-m", "src.train"]),
    "draft": (
        "runs/draft",
        ["-m", "src.train", "--preset", "cpu-draft", "--out-dir", "runs/draft"],
    ),
}
SETTINGS = {  # quantization: label -> (bits, group_size); None is float32
    "float32": None,
    "int8, a scale per row": (8, None),
    "int4, groups of 32": (4, 32),
    "int4, groups of 64": (4, 64),
    "int4, groups of 128": (4, 128),
    "int4, one scale per row": (4, None),
}


def parser() -> Parser:
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=positive_int, default=3, help="timed rounds per measurement")
    p.add_argument("--threads", type=positive_int, default=2, help="CPU threads")
    p.add_argument("--gpt2", metavar="PATH", help="GPT-2 weights (a safetensors file or folder) "
                   "for the quantization table's GPT-2 rows; left out when not given")  # fmt: skip
    p.add_argument("--out", type=Path, default=OUT, help="folder of the tables and the JSON")
    return p


def ensure_run(name: str) -> tuple[GPTModel, object, str]:
    """The model and tokenizer of ``RUNS[name]``, trained first if the run is missing."""
    folder, argv = RUNS[name]
    if find_checkpoint(REPO / folder) is None:
        print(f"no checkpoint in {folder}: training it, uv run python {' '.join(argv)}", flush=True)
        subprocess.run([sys.executable, *argv], cwd=REPO, check=True)
    model, tokenizer, meta = load_model(REPO / folder, torch.device("cpu"))
    cfg = model.cfg
    used = (f"{folder} ({count_parameters(model) / 1e6:.1f} M parameters, {cfg.n_layers} layers, "
            f"emb {cfg.emb_dim}, step {meta['step']})")  # fmt: skip
    return model, tokenizer, used


# --------------------------------------------------------------------------------------------
# The cache


# --8<-- [start:concat_cache]
class ConcatKVCache(KVCache):
    """The cache as it was: ``torch.cat`` at every step, which copies every cached position."""

    def append(self, k, v, context_length):
        self.keys = k if self.keys is None else torch.cat([self.keys, k], dim=2)
        self.values = v if self.values is None else torch.cat([self.values, v], dim=2)
        self.length = self.keys.shape[2]
        return self.keys, self.values


# --8<-- [end:concat_cache]


@torch.no_grad()
def greedy_decode(model: GPTModel, prompt: torch.Tensor, n: int, cache_class) -> torch.Tensor:
    """The decoding loop of ``generate``, greedy, through a cache of ``cache_class``."""
    cache = [cache_class(prompt.shape[1] + n) for _ in model.trf_blocks]
    logits = model(prompt, kv_cache=cache)
    tokens = []
    for _ in range(n):
        tokens.append(logits[:, -1].argmax(dim=-1, keepdim=True))
        logits = model(tokens[-1], kv_cache=cache)
    return torch.cat([prompt, *tokens], dim=1)


def bench_cache(repeats: int) -> dict:
    torch.manual_seed(0)
    model = GPTModel(GPTConfig.from_preset("cpu-small", context_length=1024)).eval()
    prompt, n = torch.randint(0, 8192, (1, 10)), 1000
    outputs = {}

    def run(cache_class):
        return lambda: outputs.__setitem__(
            cache_class, greedy_decode(model, prompt, n, cache_class)
        )

    times = median_times({"cat": run(ConcatKVCache), "preallocated": run(KVCache)}, repeats, 1)
    expected = generate(model, prompt, n, 1024)
    if not all(torch.equal(out, expected) for out in outputs.values()):
        raise RuntimeError("a cache changed the greedy tokens")
    return {"new_tokens": n, "cat_s": times["cat"], "preallocated_s": times["preallocated"]}


def cache_table(r: dict) -> str:
    n = r["new_tokens"]
    rows = [[label, f"{r[key]:.2f} s", f"{n / r[key]:.0f}"]
            for label, key in (("`torch.cat` at every step (before)", "cat_s"),
                               ("preallocated, written in place", "preallocated_s"))]  # fmt: skip
    rows.append(["**speed-up**", f"**{r['cat_s'] / r['preallocated_s']:.2f}x**", ""])
    return markdown_table(["cache", f"time for {n:,} tokens", "tokens/s"], rows, align="lrr")


# --------------------------------------------------------------------------------------------
# Batches


def validation_tokens(tokenizer) -> torch.Tensor:
    """The default corpus's validation split, in ``tokenizer``'s ids."""
    corpus = load_corpus()
    _, val = split_tokens(tokenize_cached(corpus, tokenizer, cache_dir()), val_fraction=0.1)
    return torch.tensor(val.astype("int64"))


def prompts_from(tokens: torch.Tensor, lengths: list[int]) -> list[list[int]]:
    """Prompts of the given lengths, taken from evenly spaced places in ``tokens``."""
    starts = torch.linspace(0, len(tokens) - max(lengths) - 1, len(lengths)).long().tolist()
    return [tokens[s : s + n].tolist() for s, n in zip(starts, lengths, strict=True)]


def bench_batch(model: GPTModel, val: torch.Tensor, repeats: int) -> dict:
    n, context = 100, model.cfg.context_length
    candidates, batches = {}, {}
    for B in (1, 4, 16):
        lengths = [8 + (7 * i) % 17 for i in range(B)]  # 8 to 24 tokens
        batches[B] = left_pad(prompts_from(val, lengths), pad_id=0)
        candidates[B] = lambda B=B: generate(
            model, batches[B][0], n, context, padding=batches[B][1]
        )
    times = median_times(candidates, repeats, 1)
    idx, padding = batches[4]
    out = generate(model, idx, n, context, padding=padding)
    for row in range(4):  # each row as if alone
        alone = generate(model, idx[row : row + 1, padding[row] :], n, context)[0]
        if not torch.equal(out[row, padding[row] :], alone):
            raise RuntimeError("a padded row wrote something else than its prompt alone")
    result = {"new_tokens": n, "batch": {B: B * n / t for B, t in times.items()}}
    return result | prefill_against_decode(model, val, repeats)


@torch.no_grad()
def prefill_against_decode(model: GPTModel, val: torch.Tensor, repeats: int) -> dict:
    """One forward pass over a 128-token prompt, against 128 decoding steps of one token each."""
    T = 128
    prompt = val[None, :T]

    def prefill():
        model(prompt, kv_cache=[KVCache(T) for _ in model.trf_blocks])

    cache = [KVCache(2 * T) for _ in model.trf_blocks]
    model(prompt, kv_cache=cache)

    def decode():
        for c in cache:
            c.rewind(T)
        for t in range(T):
            model(val[None, T + t : T + t + 1], kv_cache=cache)

    times = median_times({"prefill": prefill, "decode": decode}, repeats, 1)
    return {"prompt_tokens": T, "prefill_s": times["prefill"], "decode_s": times["decode"]}


def batch_table(r: dict) -> str:
    one = r["batch"][1]
    rows = [[str(B), f"{rate:.0f}", f"{rate / one:.1f}x"] for B, rate in r["batch"].items()]
    batches = markdown_table(["prompts in the batch", "tokens/s (all rows)", "against one"],
                             rows, align="rrr")  # fmt: skip
    T, prefill, decode = r["prompt_tokens"], r["prefill_s"], r["decode_s"]
    rows = [["prefill: one pass over the prompt", f"{1e3 * prefill:.0f} ms", f"{T / prefill:,.0f}"],
            ["decode: one pass per token", f"{1e3 * decode:.0f} ms", f"{T / decode:,.0f}"],
            ["**prefill faster by**", f"**{decode / prefill:.0f}x**", ""]]  # fmt: skip
    phases = markdown_table(["", f"time for {T} tokens", "tokens/s"], rows, align="lrr")
    return f"{batches}\n\n{phases}"


# --------------------------------------------------------------------------------------------
# Quantization


@torch.no_grad()
def perplexity_of(model: GPTModel, val: torch.Tensor) -> float:
    """exp of the mean next-token loss over every window of the validation split."""
    T = model.cfg.context_length
    data = GPTDataset(val.numpy(), T, stride=T)
    total = 0.0
    for start in range(0, len(data), 8):
        x, y = data.batch(torch.arange(start, min(start + 8, len(data))))
        total += cross_entropy(model(x), y).item() * len(x)
    return math.exp(total / len(data))


def bench_quantization(model: GPTModel, val: torch.Tensor, repeats: int, new_tokens: int) -> dict:
    models = {label: model if s is None else quantize_model(model, *s)
              for label, s in SETTINGS.items()}  # fmt: skip
    prompt = val[None, :16]
    times = median_times(
        {label: lambda m=m: generate(m, prompt, new_tokens, m.cfg.context_length)
         for label, m in models.items()}, repeats, 1)  # fmt: skip
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, m in models.items():
            file = None if label == "float32" else save_quantized(m, Path(tmp) / "m.safetensors")
            rows[label] = {"bytes": model_size_bytes(m), "perplexity": perplexity_of(m, val),
                           "file_bytes": file.stat().st_size if file else None,
                           "tokens_per_s": new_tokens / times[label]}  # fmt: skip
    return rows


def gpt2_quantization(path: str | None, repeats: int) -> tuple[dict | None, str]:
    """GPT-2's rows, or None and the reason they are left out."""
    if path is None:
        return None, "no GPT-2 weights given (`--gpt2 PATH`, a local safetensors file or folder)"
    data = os.environ.get("GPT_REFERENCE_DATA")
    tokenizer = get_tokenizer(str(Path(data) / "gpt2") if data else "gpt2")
    model = load_pretrained(path, drop_rate=0.0)
    return bench_quantization(model, validation_tokens(tokenizer), repeats, 20), f"GPT-2 ({path})"


def quantization_table(rows: dict) -> str:
    full, base = rows["float32"]["bytes"], rows["float32"]["perplexity"]
    lines = [[label, f"{r['bytes']:,}", f"{r['bytes'] / full:.1%}",
              f"{r['file_bytes']:,}" if r["file_bytes"] else "", f"{r['perplexity']:.2f}",
              "" if label == "float32" else f"{r['perplexity'] / base - 1:+.2%}",
              f"{r['tokens_per_s']:.0f}"] for label, r in rows.items()]  # fmt: skip
    header = ["weights", "bytes", "of float32", "safetensors file", "validation perplexity",
              "change", "tokens/s"]  # fmt: skip
    return markdown_table(header, lines, align="lrrrrrr")


# --------------------------------------------------------------------------------------------
# Speculative decoding


def bench_speculative(target, draft, val: torch.Tensor, repeats: int) -> dict:
    prompts = torch.tensor(prompts_from(val, [16] * 4))  # (4, 16)
    n, context = 100, target.cfg.context_length
    # One prompt at a time for both: speculative decoding runs rows one after another, so the
    # target alone must not get the batch's advantage.
    candidates = {0: lambda: [generate(target, row[None], n, context) for row in prompts]}
    for k in (2, 4, 8):
        candidates[k] = lambda k=k: speculative_generate(target, draft, prompts, n, context, k)
    times = median_times(candidates, repeats, 1)
    expected = generate(target, prompts, n, context)
    result = {"new_tokens": n, "prompts": len(prompts), "alone_s": times[0], "draft_tokens": {}}
    for k in (2, 4, 8):
        if not torch.equal(speculative_generate(target, draft, prompts, n, context, k), expected):
            raise RuntimeError("greedy speculative decoding wrote something else than the target")
        proposed = accepted = rounds = 0
        for row in prompts:
            for tokens, drafted in speculative_rounds(target, draft, row[None], n, context, k):
                proposed, accepted, rounds = (
                    proposed + drafted,
                    accepted + tokens.shape[1] - 1,
                    rounds + 1,
                )
        result["draft_tokens"][k] = {"s": times[k], "acceptance": accepted / proposed,
                                     "tokens_per_round": len(prompts) * n / rounds}  # fmt: skip
    return result | {"costs": round_costs(target, draft, val, repeats)}


@torch.no_grad()
def round_costs(target, draft, val: torch.Tensor, repeats: int) -> dict:
    """Seconds of one forward pass at position 100 with the cache: the target on 1 token and on
    k + 1 (a verification), the draft on 1."""

    def step(model, T):
        cache = [KVCache(120) for _ in model.trf_blocks]
        model(val[None, :100], kv_cache=cache)

        def call():
            model(val[None, 100 : 100 + T], kv_cache=cache)
            for c in cache:
                c.rewind(100)

        return call

    candidates = {"target 1": step(target, 1), "draft 1": step(draft, 1)}
    candidates |= {f"target {k + 1}": step(target, k + 1) for k in (2, 4, 8)}
    return median_times(candidates, 20 * repeats, 5)


def speculative_table(r: dict) -> str:
    alone, costs = r["alone_s"], r["costs"]
    step, c = costs["target 1"], costs["draft 1"] / costs["target 1"]
    rows = [["the model alone", "", "1", f"{alone:.2f} s", "1.00x", ""]]
    for k, d in r["draft_tokens"].items():
        verify = costs[f"target {k + 1}"] / step
        predicted = d["tokens_per_round"] / (k * c + verify)  # tokens per round / its cost
        rows.append([f"draft {k} tokens a round", f"{d['acceptance']:.0%}",
                     f"{d['tokens_per_round']:.2f}", f"{d['s']:.2f} s", f"{alone / d['s']:.2f}x",
                     f"{k} x {c:.2f} + {verify:.2f} = {k * c + verify:.2f} ({predicted:.2f}x)"])  # fmt: skip
    header = ["", "draft tokens accepted", "tokens per round", "time", "speed-up",
              "cost of a round, in target steps (predicted speed-up)"]  # fmt: skip
    return markdown_table(header, rows, align="lrrrrl")


# --------------------------------------------------------------------------------------------


def run(args) -> None:
    torch.set_num_threads(args.threads)
    target, tokenizer, target_used = ensure_run("target")
    draft, draft_tokenizer, draft_used = ensure_run("draft")
    print(f"model: {target_used}\ndraft: {draft_used}\nthreads: {args.threads}", flush=True)
    val = validation_tokens(tokenizer)
    load = os.getloadavg()[0]  # the shared machine's load: speeds are ratios, loads move them
    result = {"threads": args.threads, "load": load, "model": target_used, "draft": draft_used}
    result["cache"] = bench_cache(args.repeats)
    print(cache_table(result["cache"]), flush=True)
    result["batch"] = bench_batch(target, val, args.repeats)
    print(batch_table(result["batch"]), flush=True)
    result["quantization"] = bench_quantization(target, val, args.repeats, 100)
    print(quantization_table(result["quantization"]), flush=True)
    result["gpt2"], gpt2_note = gpt2_quantization(args.gpt2, args.repeats)
    result["speculative"] = bench_speculative(target, draft, val, args.repeats)
    print(speculative_table(result["speculative"]), flush=True)
    write_atomically(args.out / "inference-benchmark.json", json.dumps(result, indent=2) + "\n")
    write_tables(result, gpt2_note, args.out)


def write_tables(result: dict, gpt2_note: str, out: Path) -> None:
    made_by = (
        f"*Made by `uv run python benchmarks/inference.py --threads {result['threads']}` "
        f"({result['threads']} thread{'s' * (result['threads'] > 1)}, "
        f"load average {result['load']:.1f} at the start"
    )
    tables = {
        "cache": cache_table(result["cache"]),
        "batch": batch_table(result["batch"]),
        "quantization": quantization_table(result["quantization"])
        + f"\n\nThe model: {result['model']}. "
        + (
            f"{gpt2_note}:\n\n{quantization_table(result['gpt2'])}"
            if result["gpt2"]
            else f"GPT-2's rows are left out: {gpt2_note}."
        ),  # fmt: skip
        "speculative": speculative_table(result["speculative"])
        + f"\n\nThe model: {result['model']}; the draft: {result['draft']}.",
    }
    for name, table in tables.items():
        write_atomically(out / f"inference-{name}.md", f"{table}\n\n{made_by}).*\n")


if __name__ == "__main__":
    sys.exit(run_command(parser(), run, sys.argv[1:]))
