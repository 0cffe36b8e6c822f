"""Checkpoints: a run's state in a folder that a kill cannot corrupt and that is never trusted blindly.

A checkpoint is everything a later process needs to continue a run, or to use its model:

- ``model.safetensors``: the weights, in a format that holds only tensors, so loading it runs no code;
- ``optimizer.pt``: AdamW's moments, loaded with ``weights_only``, which unpickles tensors and plain
  containers and refuses anything else;
- ``tokenizer.json``: the tokenizer, when it is ours (a tiktoken encoding is named in the sidecar);
- ``checkpoint.json``: the sidecar: config, tokenizer name and fingerprint, step, data position,
  random-number states, the settings of the run.

**Atomic.** A checkpoint is written to a temporary folder, flushed, renamed, and only then does the
``latest`` pointer move to it. A kill at any instant leaves the old pointer or the new one, each naming
a complete folder.

**Checked.** A checkpoint may come from an older version of this code, from a disk that filled up,
from another person. Every file is checked as it is read, and a file that is missing, damaged, or not
what the sidecar says it is becomes one ``UserError`` naming the file, not a traceback or, worse, a
model that loads and computes garbage.
"""

import base64
import io
import json
import math
import pickle
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from src.data import fingerprint_of
from src.errors import UserError
from src.files import refuse_if_disk_full, write_atomically
from src.model import GPTConfig, GPTModel
from src.tokenizer import get_tokenizer

LATEST = "latest"  # a small file naming the newest complete checkpoint folder
STEP_FOLDER = re.compile(r"step_\d{7,}")  # the only names ``latest`` may hold


# --8<-- [start:save]
def json_safe(value):
    """``value`` with every inf and NaN replaced by None: JSON has no such numbers, and a file
    holding ``NaN`` is not JSON that other tools can read."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def save_checkpoint(
    out_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, tokenizer, meta: dict
) -> Path:
    """Write ``out_dir/checkpoints/step_NNNNNNN/`` and make it the latest, atomically; remove the
    older ones. A failure on the way (a full disk, Ctrl-C) removes the half-written folder and
    leaves the last good checkpoint as it was."""
    root = Path(out_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{meta['step']:07d}"
    tmp = root / f".tmp_{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        # safetensors refuses tensors that share memory (tied weights): save each one once.
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        if getattr(getattr(model, "cfg", None), "tie_weights", False):
            state.pop("out_head.weight", None)
        write_atomically(tmp / "model.safetensors", safetensors_bytes(state))
        buffer = io.BytesIO()
        torch.save(optimizer.state_dict(), buffer)
        write_atomically(tmp / "optimizer.pt", buffer.getvalue())
        if hasattr(tokenizer, "save"):
            tokenizer.save(tmp / "tokenizer.json")
        write_atomically(tmp / "checkpoint.json", json.dumps(json_safe(meta), indent=2))
        final = root / name
        shutil.rmtree(final, ignore_errors=True)
        tmp.replace(final)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        refuse_if_disk_full(err, tmp)
        raise
    write_atomically(root / LATEST, name)  # the moment the new checkpoint becomes the latest
    for old in root.iterdir():  # everything but the new checkpoint and the pointer
        if old.name not in (name, LATEST):
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    return final


# --8<-- [end:save]


# --8<-- [start:find]
def find_checkpoint(path: Path) -> Path | None:
    """The checkpoint folder that ``path`` means: a run folder (its latest), the checkpoints
    folder, or a checkpoint folder itself. None when there is none.

    ``latest`` must name a checkpoint folder beside it: a pointer that holds a path (``..``, an
    absolute path) would make a run read, and later delete around, files outside its folder."""
    path = Path(path)
    for root in (path / "checkpoints", path):
        pointer = root / LATEST
        if pointer.is_file():
            name = pointer.read_bytes().decode("utf-8", "replace").strip()
            if not STEP_FOLDER.fullmatch(name):
                raise UserError(
                    f"{pointer} holds {name[:60]!r}, not the name of a checkpoint folder"
                )
            if not (root / name / "checkpoint.json").is_file():
                raise UserError(f"{pointer} names {name}, which is missing or incomplete")
            return root / name
    return path if (path / "checkpoint.json").is_file() else None


def load_checkpoint_meta(ckpt: Path) -> dict:
    """The sidecar of ``ckpt``, checked: a step, a config that builds, a tokenizer record."""
    path = Path(ckpt) / "checkpoint.json"
    try:
        meta = json.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path} cannot be read: {err}") from None
    problem = _sidecar_problem(meta)
    if problem:
        raise UserError(f"{path} is not a checkpoint sidecar this project wrote: {problem}")
    return meta


def _sidecar_problem(meta) -> str | None:
    if not isinstance(meta, dict):
        return "it is not a JSON object"
    step = meta.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        return f"step is {step!r}, not a count of steps"
    tokenizer = meta.get("tokenizer")
    if not (isinstance(tokenizer, dict) and all(isinstance(tokenizer.get(k), str)
                                                for k in ("ref", "fingerprint"))):  # fmt: skip
        return "it has no tokenizer record (ref and fingerprint)"
    if not isinstance(meta.get("config"), dict):
        return "it has no model config"
    try:
        GPTConfig(**meta["config"])
    except (TypeError, ValueError) as err:
        return f"its model config does not build ({err})"
    return None


# --8<-- [end:find]


# --8<-- [start:load]
# FeedForward's sub-layers were once reached by index; their weights keep loading under the names.
_RENAMED = {".ff.layers.0.": ".ff.fc.", ".ff.layers.2.": ".ff.proj."}


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, or a ``UserError`` naming it if it is missing or damaged."""
    if not Path(path).is_file():
        raise UserError(f"{path} is missing")
    try:
        return load_file(path)
    # The parser's errors (a truncated file, a garbage or huge header, overlapping offsets) are
    # all one thing to the user: this file cannot be read.
    except Exception as err:  # noqa: BLE001
        raise UserError(f"{path} is damaged or not a safetensors file ({err})") from None


def load_weights(ckpt: Path, model: nn.Module) -> None:
    """Copy the weights of ``ckpt`` into ``model``, after checking every name, shape and dtype.

    A head whose rows are not the vocabulary (a classifier's, one row per class) is rebuilt to the
    size the file holds: the weights say what the head is."""
    path = Path(ckpt) / "model.safetensors"
    state = read_safetensors(path)
    for old, new in _RENAMED.items():
        state = {k.replace(old, new): v for k, v in state.items()}
    head = state.get("out_head.weight")
    if head is not None and head.dim() == 2 and head.shape[0] != model.out_head.weight.shape[0]:
        bias = "out_head.bias" in state
        model.out_head = nn.Linear(model.cfg.emb_dim, head.shape[0], bias=bias)
    if getattr(model.cfg, "tie_weights", False) and "tok_emb.weight" in state:
        state["out_head.weight"] = state["tok_emb.weight"]
    expected = model.state_dict()
    for key in sorted(set(expected) | set(state)):
        if key not in state or key not in expected:
            where = "missing from" if key not in state else "unexpected in"
            raise UserError(f"{path}: weight {key!r} is {where} the file; it is another model")
        want, got = expected[key], state[key]
        if got.shape != want.shape or got.dtype != want.dtype:
            raise UserError(f"{path}: {key!r} is {got.dtype} {tuple(got.shape)}, the model "
                            f"needs {want.dtype} {tuple(want.shape)}")  # fmt: skip
    model.load_state_dict(state)


def load_optimizer(ckpt: Path, optimizer: torch.optim.Optimizer) -> None:
    path = Path(ckpt) / "optimizer.pt"
    try:
        # weights_only: a checkpoint from elsewhere cannot run code when it is loaded.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path} is missing") from None
    except pickle.UnpicklingError:
        raise UserError(f"{path} is not an optimizer state this project wrote: it is damaged, "
                        "or holds objects other than tensors, which are never unpickled") from None  # fmt: skip
    # The unpickler's other errors (an empty or cut file, garbage) all mean: this file is damaged.
    except Exception as err:  # noqa: BLE001
        raise UserError(f"{path} is damaged ({type(err).__name__}: {str(err)[:80]})") from None
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError, TypeError, IndexError) as err:
        raise UserError(f"{path} does not fit this model's optimizer ({err})") from None


def load_tokenizer(ckpt: Path, meta: dict):
    """The checkpoint's tokenizer, which must be the one its sidecar names: another tokenizer of
    the same size would load, and make the model read and write other text."""
    path = Path(ckpt) / "tokenizer.json"
    tokenizer = get_tokenizer(str(path) if path.is_file() else meta["tokenizer"]["ref"])
    if fingerprint_of(tokenizer) != meta["tokenizer"]["fingerprint"]:
        raise UserError(
            f"{path if path.is_file() else meta['tokenizer']['ref']} is not the tokenizer this "
            f"model was trained with (its fingerprint differs from {Path(ckpt) / 'checkpoint.json'})"
        )
    return tokenizer


def load_model(path: Path, device: torch.device) -> tuple[GPTModel, object, dict]:
    """The model (in eval mode), tokenizer and sidecar of the checkpoint that ``path`` means."""
    ckpt = find_checkpoint(path)
    if ckpt is None:
        raise UserError(f"no checkpoint in {path} (expected a run folder or a checkpoint folder)")
    meta = load_checkpoint_meta(ckpt)
    model = GPTModel(GPTConfig(**meta["config"]))
    load_weights(ckpt, model)
    return model.to(device).eval(), load_tokenizer(ckpt, meta), meta


# --8<-- [end:load]


# --8<-- [start:rng]
def rng_state() -> dict:
    """This process's random-number state (dropout draws from it), as JSON-safe text."""

    def encode(t: torch.Tensor) -> str:
        return base64.b64encode(t.numpy().tobytes()).decode()

    state = {"torch": encode(torch.get_rng_state())}
    if torch.cuda.is_available():
        state["cuda"] = [encode(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    def decode(text: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)

    try:
        torch.set_rng_state(decode(state["torch"]))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([decode(s) for s in state["cuda"]])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise UserError(f"the checkpoint's random-number state is damaged ({err})") from None


# --8<-- [end:rng]
