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

import json
import os
import platform
import sys
from pathlib import Path

import tiktoken

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.harness import markdown_table, median_times
from src.cli import Parser, positive_int, run_command
from src.data import load_corpus
from src.files import write_atomically
from src.tokenizer import BPETokenizer

OUT = Path(__file__).resolve().parent.parent / "docs" / "assets" / "tokenizer-benchmark"


def compare_encode(name: str, ours: BPETokenizer, text: str, repeats: int) -> dict:
    """Median seconds to encode ``text``: ours cold and warm, tiktoken on the same parts."""
    theirs = tiktoken.Encoding(
        name,
        pat_str=ours.pattern,
        mergeable_ranks=ours.mergeable_ranks,
        special_tokens=ours.special_tokens,
    )
    assert ours.encode(text) == theirs.encode(text), "ids differ from tiktoken's"
    fresh = {}

    def new_tokenizer():  # every round starts cold: a tokenizer with an empty pre-token cache
        fresh["ours"] = BPETokenizer(ours.mergeable_ranks, ours.special_tokens, ours.pattern)

    candidates = {
        "ours_cold": lambda: fresh["ours"].encode(text),
        "ours_warm": lambda: fresh["ours"].encode(text),  # the same text again
        "tiktoken": lambda: theirs.encode(text),
    }
    times = median_times(candidates, repeats, warmup=0, before_round=new_tokenizer)
    mb = len(text.encode("utf-8")) / 1e6
    row = {
        "vocab": name,
        "n_vocab": ours.n_vocab,
        "megabytes": mb,
        "tokens": len(theirs.encode(text)),
    }
    for key, seconds in times.items():
        row[f"{key}_mb_per_s"] = mb / seconds
    row["ratio_cold"] = row["tiktoken_mb_per_s"] / row["ours_cold_mb_per_s"]
    row["ratio_warm"] = row["tiktoken_mb_per_s"] / row["ours_warm_mb_per_s"]
    return row


def parser() -> Parser:
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab-size", type=positive_int, default=8192,
                   help="vocabulary to train on the default corpus (bytes + merges + specials)")  # fmt: skip
    p.add_argument("--repeats", type=positive_int, default=5,
                   help="timed runs per candidate; medians")  # fmt: skip
    reference = os.environ.get("GPT_REFERENCE_DATA")
    p.add_argument("--gpt2-dir", type=Path, default=reference and Path(reference) / "gpt2",
                   help="folder with GPT-2's encoder.json and vocab.bpe (skipped if absent)")  # fmt: skip
    p.add_argument("--out", type=Path, default=OUT,
                   help="output path prefix for the .json results and the .md table the book "
                   f"includes (default: {OUT.relative_to(OUT.parents[2])})")  # fmt: skip
    return p


def run(args) -> None:
    corpus = load_corpus()
    mb = len(corpus.text.encode("utf-8")) / 1e6
    print(f"corpus: {corpus.name}, {mb:.2f} MB; python {platform.python_version()}, "
          f"{os.cpu_count()} cpus, one thread per encoder", flush=True)  # fmt: skip
    train = median_times(
        {"train": lambda: BPETokenizer.train(corpus.text, args.vocab_size)}, args.repeats, warmup=0
    )["train"]
    trained = BPETokenizer.train(corpus.text, args.vocab_size)
    print(f"train {trained.n_vocab} tokens: {train:.2f} s (median of {args.repeats})", flush=True)

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
        "train_seconds": train,
        "encode": rows,
    }
    write_atomically(args.out.with_suffix(".json"), json.dumps(result, indent=2) + "\n")
    markdown = to_markdown(result)
    write_atomically(args.out.with_suffix(".md"), markdown)
    print("\n" + markdown)
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.md')}")


def to_markdown(result: dict) -> str:
    """The table the Tokens chapter includes: MB/s of each encoder, and tiktoken's lead."""
    header = ["vocabulary", "tokens", "ours, cold (MB/s)", "ours, warm (MB/s)", "tiktoken (MB/s)",
              "tiktoken / ours, cold", "tiktoken / ours, warm"]  # fmt: skip
    rows = [
        [r["vocab"], f"{r['tokens']:,}", f"{r['ours_cold_mb_per_s']:.2f}",
         f"{r['ours_warm_mb_per_s']:.2f}", f"{r['tiktoken_mb_per_s']:.2f}",
         f"{r['ratio_cold']:.2f}x", f"{r['ratio_warm']:.2f}x"]
        for r in result["encode"]
    ]  # fmt: skip
    training = (
        f"Training the {result['train_vocab_size']:,}-token vocabulary on the same "
        f"{result['megabytes']:.2f} MB took {result['train_seconds']:.2f} s (median of "
        f"{result['repeats']}; Python {result['python']})."
    )
    made_by = "*Made by `uv run python benchmarks/tokenizer.py`.*"
    return f"{markdown_table(header, rows, align='lrrrrrr')}\n\n{training}\n\n{made_by}\n"


if __name__ == "__main__":
    sys.exit(run_command(parser(), run, sys.argv[1:]))
