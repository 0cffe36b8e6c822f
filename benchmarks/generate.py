"""Generation speed with and without the KV cache, on the default ``cpu-small`` preset.

Greedy decoding of 200 new tokens after a 10-token prompt, batch 1, context 256: the two settings
alternate, repeated, and the median time of each is kept. Both produce the same tokens (checked).

    uv run python benchmarks/generate.py   # docs/assets/generate-benchmark.json and .md
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.harness import markdown_table, median_times
from src.cli import Parser, positive_int, run_command
from src.files import write_atomically
from src.generate import generate
from src.model import GPTConfig, GPTModel

OUT = Path(__file__).resolve().parent.parent / "docs" / "assets" / "generate-benchmark.json"


def parser() -> Parser:
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--new-tokens", type=positive_int, default=200, help="tokens generated per run")
    p.add_argument("--repeats", type=positive_int, default=5, help="timed runs per setting")
    p.add_argument("--out", type=Path, default=OUT, help="where the JSON results go")
    return p


def run(args) -> None:
    torch.manual_seed(0)
    cfg = GPTConfig.from_preset("cpu-small")
    model = GPTModel(cfg).eval()
    prompt = torch.randint(0, cfg.vocab_size, (1, 10))
    outputs = {}

    def decode(use_cache: bool):
        def call():
            outputs[use_cache] = generate(
                model, prompt, args.new_tokens, cfg.context_length, use_cache=use_cache
            )

        return call

    times = median_times(
        {"cached": decode(True), "uncached": decode(False)}, args.repeats, warmup=1
    )
    if not torch.equal(outputs[True], outputs[False]):
        raise RuntimeError("cached and uncached decoding gave different tokens: a KV cache bug")
    cached, uncached = times["cached"], times["uncached"]
    result = {
        "threads": torch.get_num_threads(),
        "new_tokens": args.new_tokens,
        "cached_s": cached,
        "uncached_s": uncached,
        "cached_tokens_per_sec": args.new_tokens / cached,
        "uncached_tokens_per_sec": args.new_tokens / uncached,
        "speedup": uncached / cached,
    }
    print(f"{args.new_tokens} tokens, {result['threads']} threads: KV cache {cached:.2f} s "
          f"({result['cached_tokens_per_sec']:.0f} tokens/s), without {uncached:.2f} s "
          f"({result['uncached_tokens_per_sec']:.0f} tokens/s): {result['speedup']:.1f}x")  # fmt: skip
    write_atomically(args.out, json.dumps(result, indent=2) + "\n")
    write_atomically(args.out.with_suffix(".md"), to_markdown(result))


def to_markdown(result: dict) -> str:
    """The table the Generating chapter includes."""
    n = result["new_tokens"]
    rows = [
        ["KV cache", f"{result['cached_s']:.2f} s", f"{result['cached_tokens_per_sec']:.0f}"],
        ["no cache (`use_cache=False`)", f"{result['uncached_s']:.2f} s",
         f"{result['uncached_tokens_per_sec']:.0f}"],
        ["**speedup**", f"**{result['speedup']:.1f}x**", ""],
    ]  # fmt: skip
    table = markdown_table(["", f"time for {n} tokens", "tokens/s"], rows, align="lrr")
    made_by = f"*Made by `uv run python benchmarks/generate.py` ({result['threads']} threads).*"
    return f"{table}\n\n{made_by}\n"


if __name__ == "__main__":
    sys.exit(run_command(parser(), run, sys.argv[1:]))
