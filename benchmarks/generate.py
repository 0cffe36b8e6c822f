"""Generation speed with and without the KV cache, on the default ``cpu-small`` preset.

Greedy decoding of 200 new tokens after a 10-token prompt, batch 1, context 256: the two settings
alternate, repeated, and the median time of each is kept. Both produce the same tokens (checked).

    uv run python benchmarks/generate.py   # docs/assets/generate-benchmark.json and .md
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from src.generate import generate
from src.model import GPTConfig, GPTModel

OUT = Path(__file__).resolve().parent.parent / "docs" / "assets" / "generate-benchmark.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=200, help="tokens generated per run")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per setting")
    parser.add_argument("--out", type=Path, default=OUT, help="where the JSON results go")
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = GPTConfig.from_preset("cpu-small")
    model = GPTModel(cfg).eval()
    prompt = torch.randint(0, cfg.vocab_size, (1, 10))
    times = {True: [], False: []}
    outputs = {}
    for i in range(args.repeats + 1):  # the first round warms up
        for use_cache in (True, False):
            t0 = time.perf_counter()
            outputs[use_cache] = generate(model, prompt, args.new_tokens, cfg.context_length,
                                          use_cache=use_cache)  # fmt: skip
            if i > 0:
                times[use_cache].append(time.perf_counter() - t0)
    assert torch.equal(outputs[True], outputs[False]), "cached and uncached tokens differ"
    cached, uncached = statistics.median(times[True]), statistics.median(times[False])
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
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(to_markdown(result))


def to_markdown(result: dict) -> str:
    """The table the Generating chapter includes."""
    n = result["new_tokens"]
    return "\n".join([
        f"| | time for {n} tokens | tokens/s |",
        "| --- | ---: | ---: |",
        f"| KV cache | {result['cached_s']:.2f} s | {result['cached_tokens_per_sec']:.0f} |",
        f"| no cache (`use_cache=False`) | {result['uncached_s']:.2f} s "
        f"| {result['uncached_tokens_per_sec']:.0f} |",
        f"| **speedup** | **{result['speedup']:.1f}x** | |",
        "",
        f"*Made by `uv run python benchmarks/generate.py` ({result['threads']} threads).*",
    ]) + "\n"  # fmt: skip


if __name__ == "__main__":
    main()
