"""Our BPE tokenizer against tiktoken: training time, and encode throughput on the same ranks.

    uv run python benchmarks/tokenizer.py [--vocab-size 8192] [--repeats 5] [--gpt2-dir DIR]

writes ``docs/assets/tokenizer-benchmark.json`` and the table the book includes,
``docs/assets/tokenizer-benchmark.md``.

Both encoders get the same text, the same ranks, pattern and special tokens, and the same single
thread (tiktoken's `encode` of one string does not use threads). Runs are interleaved and the median
is reported. "Cold" is a fresh tokenizer with an empty pre-token cache, "warm" the same text again.
With GPT-2's `encoder.json` and `vocab.bpe` (from `--gpt2-dir`, or `$GPT_REFERENCE_DATA/gpt2`), the
comparison is repeated on the real 50k-merge vocabulary.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import tiktoken

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from src.data import load_corpus  # noqa: E402
from src.tokenizer import BPETokenizer  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "docs" / "assets" / "tokenizer-benchmark"


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def compare_encode(name: str, ours: BPETokenizer, text: str, repeats: int) -> dict:
    """Median seconds to encode ``text``: ours cold and warm, tiktoken on the same parts."""
    theirs = tiktoken.Encoding(
        name,
        pat_str=ours.pattern,
        mergeable_ranks=ours.mergeable_ranks,
        special_tokens=ours.special_tokens,
    )
    assert ours.encode(text) == theirs.encode(text), "ids differ from tiktoken's"
    cold, warm, ref = [], [], []
    for _ in range(repeats):
        fresh = BPETokenizer(ours.mergeable_ranks, ours.special_tokens, ours.pattern)
        cold.append(timed(fresh.encode, text))
        warm.append(timed(fresh.encode, text))
        ref.append(timed(theirs.encode, text))
    mb = len(text.encode("utf-8")) / 1e6
    row = {
        "vocab": name,
        "n_vocab": ours.n_vocab,
        "megabytes": mb,
        "tokens": len(theirs.encode(text)),
    }
    for key, times in [("ours_cold", cold), ("ours_warm", warm), ("tiktoken", ref)]:
        row[f"{key}_mb_per_s"] = mb / statistics.median(times)
    row["ratio_cold"] = row["tiktoken_mb_per_s"] / row["ours_cold_mb_per_s"]
    row["ratio_warm"] = row["tiktoken_mb_per_s"] / row["ours_warm_mb_per_s"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=8192,
        help="vocabulary to train on the default corpus (bytes + merges + specials)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per candidate; medians")
    default_gpt2 = (
        os.environ.get("GPT_REFERENCE_DATA") and Path(os.environ["GPT_REFERENCE_DATA"]) / "gpt2"
    )
    parser.add_argument(
        "--gpt2-dir",
        type=Path,
        default=default_gpt2,
        help="folder with GPT-2's encoder.json and vocab.bpe (skipped if absent)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=OUT,
        help="output path prefix for the .json results and the .md table the book includes "
        f"(default: {OUT.relative_to(OUT.parents[2])})",
    )
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

    corpus = load_corpus()
    mb = len(corpus.text.encode("utf-8")) / 1e6
    print(
        f"corpus: {corpus.name}, {mb:.2f} MB; python {platform.python_version()}, "
        f"{os.cpu_count()} cpus, one thread per encoder",
        flush=True,
    )
    try:
        train_times = []
        for _ in range(args.repeats):
            train_times.append(timed(BPETokenizer.train, corpus.text, args.vocab_size))
    except ValueError as err:
        sys.exit(f"error: {err}")
    trained = BPETokenizer.train(corpus.text, args.vocab_size)
    train_s = statistics.median(train_times)
    print(f"train {trained.n_vocab} tokens: {train_s:.2f} s (median of {args.repeats})", flush=True)

    rows = [compare_encode(f"trained-{trained.n_vocab}", trained, corpus.text, args.repeats)]
    if args.gpt2_dir and (args.gpt2_dir / "vocab.bpe").is_file():
        gpt2 = BPETokenizer.from_gpt2_files(
            args.gpt2_dir / "encoder.json", args.gpt2_dir / "vocab.bpe"
        )
        rows.append(compare_encode("gpt2", gpt2, corpus.text, args.repeats))
    else:
        print("GPT-2 files not found (--gpt2-dir): the 50k-merge comparison is skipped")

    result = {
        "corpus": corpus.name,
        "megabytes": mb,
        "python": platform.python_version(),
        "repeats": args.repeats,
        "train_vocab_size": trained.n_vocab,
        "train_seconds": train_s,
        "encode": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    markdown = to_markdown(result)
    args.out.with_suffix(".md").write_text(markdown)
    print("\n" + markdown)
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.md')}")


def to_markdown(result: dict) -> str:
    """The table the Tokens chapter includes: MB/s of each encoder, and tiktoken's lead."""
    lines = [
        "| vocabulary | tokens | ours, cold (MB/s) | ours, warm (MB/s) | tiktoken (MB/s) "
        "| tiktoken / ours, cold | tiktoken / ours, warm |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["encode"]:
        lines.append(
            f"| {r['vocab']} | {r['tokens']:,} | {r['ours_cold_mb_per_s']:.2f} "
            f"| {r['ours_warm_mb_per_s']:.2f} | {r['tiktoken_mb_per_s']:.2f} "
            f"| {r['ratio_cold']:.2f}x | {r['ratio_warm']:.2f}x |"
        )
    lines += [
        "",
        f"Training the {result['train_vocab_size']:,}-token vocabulary on the same "
        f"{result['megabytes']:.2f} MB took {result['train_seconds']:.2f} s (median of "
        f"{result['repeats']}; Python {result['python']}).",
        "",
        "*Made by `uv run python benchmarks/tokenizer.py`.*",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
