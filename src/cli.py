"""What the four commands share: flags, help, errors, run folders, progress and the metrics file.

``src.train``, ``src.generate``, ``src.classify`` and ``src.instruct`` are the book's command lines.
They differ in what they compute, and in nothing a user should have to learn twice:

- **Flags and help.** One help formatter shows every default; the flags that name a model
  (``--checkpoint``, ``--pretrained``, ``--weights``) are defined, and resolved, once.
- **Errors.** ``run_command`` is the one mapping from what went wrong to a line and an exit code:
  0 done; 1 the loss became non-finite; 2 a mistake in the input (``UserError``, or a flag the
  parser refuses); 128 + N stopped by signal N (130 for Ctrl-C, 143 for ``kill``), after saving.
  Anything else is a bug and shows its traceback.
- **Run folders.** A command that writes a run folder locks it, so two runs cannot interleave, and
  refuses a folder that already holds a run unless told ``--resume`` or ``--overwrite``: the easy
  mistake of starting again in ``runs/default`` must not delete yesterday's run.
- **Long work.** A progress bar, a Ctrl-C that means "finish this step and save", a metrics file
  that survives a kill, and a loss plot.
"""

import argparse
import contextlib
import io
import json
import math
import os
import re
import shutil
import signal
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from src import llama
from src.checkpoints import find_checkpoint, json_safe, load_model
from src.data import fingerprint_of
from src.errors import NonFiniteLossError, UserError
from src.files import write_atomically
from src.gpt2 import GPT2_REPOS, load_pretrained
from src.model import PRESETS, GPTConfig, GPTModel
from src.quantize import quantize_model
from src.tokenizer import get_tokenizer
from src.training import perplexity


# --8<-- [start:parser]
class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` that shows each flag's default, unless there is none to show."""

    def _get_help_string(self, action):
        if action.default in (None, argparse.SUPPRESS) or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """An argument parser whose every refusal is one line, like every other error here."""

    def __init__(self, **kwargs):
        super().__init__(formatter_class=HelpFormatter, **kwargs)
        # argparse reads "-1e-3" as a flag, not a number: "--min-lr -1e-3" would be refused as
        # "expected one argument" instead of for what it is, a negative learning rate.
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)(e[-+]?\d+)?$")

    def error(self, message):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def _number(kind: type, low: float, strict: bool, what: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what}, got {text!r}") from None
        if not math.isfinite(value) or value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"{what}, got {text!r}")
        return value

    return parse


# Flag types for numbers whose range is the flag's own business (a count of steps, a rate).
positive_int = _number(int, 0, strict=True, what="must be a positive integer")
count = _number(int, 0, strict=False, what="must be an integer >= 0")
positive = _number(float, 0.0, strict=True, what="must be a positive number")
non_negative = _number(float, 0.0, strict=False, what="must be a number >= 0")


# --8<-- [end:parser]


# --8<-- [start:run_command]
def run_command(parser: argparse.ArgumentParser, body, argv: list[str] | None) -> int:
    """Parse the flags and run ``body(args)``, which returns its exit code (or None for 0)."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help, or a flag the parser refused (already said in one line)
        return done.code
    try:
        return body(args) or 0
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C: the last complete checkpoint stays
        print("\ninterrupted; the last complete checkpoint is kept", file=sys.stderr)
        return 128 + signal.SIGINT


# --8<-- [end:run_command]


# --8<-- [start:model_source]
def add_model_source(p: argparse.ArgumentParser, required: bool, preset: bool = False) -> None:
    """The flags that say which model to start from, and its tokenizer."""
    group = p.add_argument_group(
        "model (one of)" + ("" if required else "; default --pretrained gpt2")
    )
    source = group.add_mutually_exclusive_group(required=required)
    source.add_argument("--checkpoint", help="a run folder (its latest checkpoint) or a checkpoint "
                        "folder written by python -m src.train")  # fmt: skip
    source.add_argument("--pretrained", choices=[*GPT2_REPOS, *llama.LLAMA_REPOS],
                        help="published weights, downloaded once and cached: OpenAI's GPT-2 of "
                        "this size, or a Llama-style model (src/llama.py)")  # fmt: skip
    source.add_argument("--weights", help="a local GPT-2 .safetensors file, or a folder with "
                        "model.safetensors and config.json (GPT-2, Llama, Qwen2 or Qwen3)")  # fmt: skip
    if preset:
        source.add_argument("--preset", choices=list(PRESETS),
                            help="a freshly initialised model of this size (for experiments)")  # fmt: skip
    group.add_argument("--tokenizer", help="for --pretrained, --weights and --preset: 'gpt2', a "
                       "folder with GPT-2's encoder.json and vocab.bpe, a tokenizer.json, or a "
                       "saved tokenizer file; when not given, a Llama-style model's own "
                       "tokenizer.json, else gpt2 (a checkpoint brings its own)")  # fmt: skip


def load_model_source(args, device: torch.device, **fields) -> tuple[GPTModel, object, str]:
    """The model the flags of ``add_model_source`` name (config ``fields`` overridden), its
    tokenizer, and the tokenizer's name for the record; quantized if ``--quantize`` says so."""
    model, tokenizer, ref = _model_and_tokenizer(args, device, **fields)
    if getattr(args, "quantize", None):
        bits = int(args.quantize.removeprefix("int"))
        group_size = args.group_size or (64 if bits == 4 else None)  # int4 needs its groups
        model = quantize_model(model, bits, group_size).to(device)
    elif getattr(args, "group_size", None):
        raise UserError("--group-size needs --quantize")
    return model, tokenizer, ref


def _model_and_tokenizer(args, device: torch.device, **fields) -> tuple[GPTModel, object, str]:
    if getattr(args, "checkpoint", None):
        if args.tokenizer:
            raise UserError("--tokenizer: a checkpoint brings its own tokenizer; leave it out")
        model, tokenizer, meta = load_model(args.checkpoint, device)
        if fields:  # the same weights in a model built with other settings (dropout, attention)
            rebuilt = GPTModel(GPTConfig(**(model.cfg.to_dict() | fields)))
            rebuilt.load_state_dict(model.state_dict())
            model = rebuilt.to(device)
        return model, tokenizer, meta["tokenizer"]["ref"]
    ref = args.tokenizer or "gpt2"
    if getattr(args, "preset", None):
        tokenizer = get_tokenizer(ref)
        model = GPTModel(GPTConfig.from_preset(args.preset, vocab_size=tokenizer.n_vocab, **fields))
    else:  # the weights first: a download that fails says so before the tokenizer's does
        source = args.weights or args.pretrained or "gpt2"
        if source in llama.LLAMA_REPOS or llama.is_llama_folder(source):
            model = llama.load_pretrained(source, **fields)
            if not args.tokenizer:  # the model's own, from the folder the weights came from
                ref = str(llama.model_folder(source))
        else:
            model = load_pretrained(source, **fields)
        tokenizer = get_tokenizer(ref)
    if tokenizer.n_vocab > model.cfg.vocab_size:
        raise UserError(f"the tokenizer {ref} has {tokenizer.n_vocab} tokens but the model only "
                        f"{model.cfg.vocab_size}; use the tokenizer the model was trained with")  # fmt: skip
    return model.to(device), tokenizer, ref


# --8<-- [end:model_source]


# --8<-- [start:inference_sources]
def add_quantization(p: argparse.ArgumentParser) -> None:
    """``--quantize`` and ``--group-size``: the weights of the model source, made small."""
    p.add_argument("--quantize", choices=["int8", "int4"],
                   help="hold the model's weights as 8- or 4-bit integers (src/quantize.py)")  # fmt: skip
    p.add_argument("--group-size", type=positive_int,
                   help="weights per scale in a row: int4's default 64; int8's one scale per row")  # fmt: skip


def load_draft(path: str, tokenizer, device: torch.device) -> GPTModel:
    """The draft model of speculative decoding, a checkpoint that must read and write the same
    tokens as the model it drafts for: the same tokenizer, checked by its fingerprint."""
    draft, draft_tokenizer, _ = load_model(path, device)
    if fingerprint_of(draft_tokenizer) != fingerprint_of(tokenizer):
        raise UserError(f"--draft {path} was trained with another tokenizer than the model's "
                        "(their fingerprints differ); train it on the same corpus with the same "
                        "--vocab-size")  # fmt: skip
    return draft


# --8<-- [end:inference_sources]


# --8<-- [start:run_folder]
RUN_FILES = ("metrics.jsonl", "samples.txt", "loss.png", "results.json", "responses.json")


class RunFolder:
    """A run's output folder, locked while a command writes into it.

    A folder that already holds a run is refused unless ``resume`` (continue it) or ``overwrite``
    (delete its files, when ``clear`` is called, once every setting has been checked). The lock is
    an operating-system lock on ``.lock``, so it dies with its process: a killed run leaves no lock
    behind to clear by hand.
    """

    def __init__(self, out_dir: str | Path, resume: bool = False, overwrite: bool = False):
        self.path = Path(out_dir)
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"--out-dir {self.path} is a file, not a folder")
        self.created = not self.path.exists()  # removed again if the command fails at once
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.path / ".lock", "a+")  # noqa: SIM115 (held for the run's life)
        if not _try_lock(self._lock):
            self._lock.seek(0)
            holder = self._lock.read().strip() or "another process"
            self._lock.close()
            raise UserError(f"{self.path} is in use by another run ({holder}); wait for it to "
                            "finish, or choose another --out-dir")  # fmt: skip
        self._lock.truncate(0)
        self._lock.write(f"process {os.getpid()}")
        self._lock.flush()
        held = [name for name in (*RUN_FILES, "checkpoints") if (self.path / name).exists()]
        if held and not (resume or overwrite):
            ckpt = find_checkpoint(self.path) if "checkpoints" in held else None
            at = f" (checkpoint {ckpt.name})" if ckpt else ""
            self.close()
            raise UserError(
                f"{self.path} already holds a run{at}; continue it with --resume, start over with "
                "--overwrite (deletes its metrics, samples, plot and checkpoints), or choose "
                "another --out-dir"
            )

    def clear(self) -> None:
        """Delete a previous run's files (``--overwrite``)."""
        for name in RUN_FILES:
            (self.path / name).unlink(missing_ok=True)
        shutil.rmtree(self.path / "checkpoints", ignore_errors=True)

    def close(self) -> None:
        self._lock.close()  # closing the file releases the lock

    def __enter__(self) -> "RunFolder":
        return self

    def __exit__(self, error_type, *exc) -> None:
        self.close()
        if (
            error_type is not None
            and self.created
            and {p.name for p in self.path.iterdir()} == {".lock"}
        ):
            shutil.rmtree(self.path)  # a refused command leaves no empty folder behind


def _try_lock(f) -> bool:
    try:
        if os.name == "nt":
            import msvcrt

            msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


# --8<-- [end:run_folder]


# --8<-- [start:progress]
def progress_bar(total: int, initial: int = 0, disable: bool = False) -> tqdm:
    """A progress bar over optimizer steps; the caller adds loss and tokens/s, tqdm the ETA."""
    return tqdm(total=total, initial=initial, disable=disable, unit="step", dynamic_ncols=True)


class StopRequest:
    """While active, the first Ctrl-C (or SIGTERM) asks the loop to stop after the current step
    and save; a second Ctrl-C stops at once. ``signal`` is the first signal received, or None."""

    def __enter__(self):
        self.signal = None
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = self.signal or signum
        print("\nstopping after this step and saving a checkpoint (Ctrl-C again to abort)",
              file=sys.stderr)  # fmt: skip


class MetricsLog:
    """``metrics.jsonl``: one JSON object per line, appended as the run goes, so that a kill keeps
    every row written before it. Infinite and NaN values are written as ``null`` (JSON has no such
    numbers). Resuming keeps the rows up to the checkpoint's step, rewritten atomically."""

    def __init__(self, path: Path, keep_until: int | None = None):
        self.path = Path(path)
        self.rows = (
            []
            if keep_until is None
            else [r for r in read_jsonl(self.path) if r["step"] <= keep_until]
        )
        write_atomically(self.path, "".join(json.dumps(r) + "\n" for r in self.rows))

    def append(self, row: dict) -> None:
        self.rows.append(row)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(json_safe(row), allow_nan=False) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON-lines file; a line torn by a kill mid-write is skipped."""
    rows = []
    if Path(path).is_file():
        for line in Path(path).read_text("utf-8", errors="replace").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                row = json.loads(line)
                if isinstance(row, dict) and isinstance(row.get("step"), int):
                    rows.append(row)
    return rows


def plot_losses(rows: list[dict], path: Path) -> None:
    """Every step's batch loss and the validation losses, as a PNG (matplotlib, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    train = [(r["step"], r["train_loss"]) for r in rows if r["step"] > 0 and r.get("train_loss")]
    val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    if train:
        ax.plot(*zip(*train, strict=True), label="train (batch)", lw=1, alpha=0.7)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation", ms=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    write_atomically(path, buffer.getvalue())


def format_perplexity(loss: float) -> str:
    """exp(loss) for a person: 192.3, or 1.2e+266 when the model is lost, not 267 digits."""
    value = perplexity(loss)
    return f"{value:.1f}" if value < 1e6 else f"{value:.2g}"


# --8<-- [end:progress]
