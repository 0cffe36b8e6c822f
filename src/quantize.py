"""Making the weights small: int8 and int4 weight-only quantization, from scratch.

Generating a token reads every weight of the model once, and on most machines reading the weights,
not multiplying them, is what takes the time; the weights are also what must fit in memory. A float32
weight takes 4 bytes. Most of those bits are wasted: a layer's weights sit in a narrow range, and the
model barely notices if each one moves by a small fraction of that range. So store each weight as a
small integer ``q`` and keep one float ``s``, the *scale*, per group of weights:

    w ~ q * s,  q = round(w / s),  s = max |w| / q_max  (the group's absmax)

- **int8**: ``q_max = 127``, one scale per output row (per output channel): a quarter of the bytes.
- **int4**: ``q_max = 7``, two values packed in one byte, and a scale for every ``group_size``
  (32, 64 or 128) consecutive weights of a row: an eighth of the bytes, plus the scales. With only 15
  levels, one large weight in a row would make the step coarse for all the others; small groups keep
  such an outlier's damage inside its group.

Rounding moves each weight by at most half a step, ``s / 2``. The error is in the weights only:
activations stay float32, and every forward pass dequantizes the weights it needs (``q * s``) just
before it multiplies. That saves memory, and on hardware whose kernels dequantize inside the matrix
product it saves time as well; here, in plain PyTorch, the extra pass over the weights costs time.

Every ``nn.Linear`` and ``nn.Embedding`` of the model is quantized, the token embedding and the
output head included: in the small presets they are a third of the bytes.
"""

import copy
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn

from src.errors import UserError
from src.files import write_atomically
from src.model import GPTConfig, GPTModel

BITS = (8, 4)


# --8<-- [start:quantize]
def quantize(
    weight: torch.Tensor, bits: int, group_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight matrix (rows, cols) as integers and scales: ``q`` (rows, cols) int8 in
    [-q_max, q_max], ``q_max = 2^(bits-1) - 1``, and ``scales`` (rows, cols / group_size) float32,
    one per group of ``group_size`` consecutive weights in a row (None: one per row)."""
    rows, cols = weight.shape
    group = group_size or cols
    if cols % group:
        raise UserError(f"group_size {group} does not divide the rows of {cols} weights")
    q_max = 2 ** (bits - 1) - 1
    w = weight.detach().float().reshape(rows, cols // group, group)  # (rows, groups, group)
    scales = w.abs().amax(dim=-1) / q_max  # (rows, groups): s = max|w| / q_max
    scales = scales.clamp(min=torch.finfo(torch.float32).tiny)  # an all-zero group: any s > 0
    q = torch.round(w / scales[..., None]).clamp(-q_max, q_max)  # q = round(w / s)
    return q.to(torch.int8).reshape(rows, cols), scales


def dequantize(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``q * s``, each integer times its group's scale: (..., cols) int8 -> float32."""
    groups = scales.shape[-1]
    grouped = q.float().unflatten(-1, (groups, q.shape[-1] // groups))  # (..., groups, group)
    return (grouped * scales[..., None]).flatten(-2)  # w ~ q * s


# --8<-- [end:quantize]


# --8<-- [start:pack]
def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Two 4-bit integers per byte: (..., cols) int8 in [-8, 7] -> (..., cols / 2) uint8, the
    even column in the low four bits and the odd column in the high four."""
    u = (q + 8).to(torch.uint8)  # [-8, 7] -> [0, 15]: four bits with no sign to lose
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of ``pack_int4``: (..., cols / 2) uint8 -> (..., cols) int8."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack((low, high), dim=-1).flatten(-2).to(torch.int8) - 8


# --8<-- [end:pack]


# --8<-- [start:layers]
class QuantizedWeight(nn.Module):
    """A weight matrix held as integers and scales: ``qweight`` is int8 (rows, cols), or for int4
    uint8 (rows, cols / 2), two per byte; ``scales`` float32 (rows, groups). ``rows(ids)``
    rebuilds the float rows it is asked for, ``matrix()`` all of them."""

    def __init__(self, weight: torch.Tensor, bits: int, group_size: int | None):
        super().__init__()
        q, scales = quantize(weight, bits, group_size)
        self.bits = bits
        self.register_buffer("qweight", pack_int4(q) if bits == 4 else q)
        self.register_buffer("scales", scales)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        q, scales = self.qweight[ids], self.scales[ids]  # only the rows asked for
        return dequantize(unpack_int4(q) if self.bits == 4 else q, scales)

    def matrix(self) -> torch.Tensor:
        return self.rows(slice(None))


class QuantizedLinear(nn.Module):
    """``nn.Linear`` with a quantized weight, dequantized at every call; the bias stays float."""

    def __init__(self, weight: QuantizedWeight, bias: nn.Parameter | None):
        super().__init__()
        self.weight, self.bias = weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.matrix(), self.bias)  # (..., in) -> (..., out)


class QuantizedEmbedding(nn.Module):
    """``nn.Embedding`` with a quantized table: a lookup dequantizes only the rows it reads."""

    def __init__(self, weight: QuantizedWeight):
        super().__init__()
        self.weight = weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight.rows(ids)  # (..., dim)


# --8<-- [end:layers]


# --8<-- [start:quantize_model]
def quantize_model(model: GPTModel, bits: int = 8, group_size: int | None = None) -> GPTModel:
    """A copy of ``model`` whose every ``nn.Linear`` and ``nn.Embedding`` holds ``bits``-bit
    weights (8 or 4), with a scale per ``group_size`` weights of a row (None: per row).

    A weight that two layers share (the tied embedding and output head) is quantized once and
    stays shared: each row of the token table is also one output row of the head."""
    if bits not in BITS:
        raise UserError(f"bits must be one of {BITS}, got {bits}")
    if group_size is not None and (group_size < 1 or (bits == 4 and group_size % 2)):
        raise UserError(f"group_size must be a positive{' even' * (bits == 4)} number, "
                        f"got {group_size}")  # fmt: skip
    if hasattr(model, "quantization"):
        raise UserError("the model is quantized already")
    quantized = copy.deepcopy(model)
    shared: dict[int, QuantizedWeight] = {}  # id of a float weight -> its quantized version
    for parent in list(quantized.modules()):
        for name, layer in list(parent.named_children()):
            if not isinstance(layer, (nn.Linear, nn.Embedding)):
                continue
            if id(layer.weight) not in shared:
                shared[id(layer.weight)] = QuantizedWeight(layer.weight, bits, group_size)
            weight = shared[id(layer.weight)]
            if isinstance(layer, nn.Linear):
                setattr(parent, name, QuantizedLinear(weight, layer.bias))
            else:
                setattr(parent, name, QuantizedEmbedding(weight))
    quantized.quantization = {"bits": bits, "group_size": group_size}
    return quantized


def model_size_bytes(model: nn.Module) -> int:
    """The bytes of the model's weights: every parameter and saved buffer, and a tensor that two
    layers share counted once."""
    sizes = {t.data_ptr(): t.nbytes for t in model.state_dict().values()}
    return sum(sizes.values())


# --8<-- [end:quantize_model]


# --8<-- [start:save]
def save_quantized(model: GPTModel, path: str | Path) -> Path:
    """Write a quantized model to one safetensors file: its integers and scales as they are, and
    in the file's metadata the config and the quantization settings. A shared tensor is written
    once, and the names that share it are listed."""
    if not hasattr(model, "quantization"):
        raise UserError("the model is not quantized; quantize_model it first")
    tensors, aliases, first = {}, {}, {}
    for name, t in model.state_dict().items():
        if t.numel() and t.data_ptr() in first:
            aliases[name] = first[t.data_ptr()]
        else:
            first[t.data_ptr()], tensors[name] = name, t.contiguous()
    metadata = {"config": json.dumps(model.cfg.to_dict()), "aliases": json.dumps(aliases),
                "quantization": json.dumps(model.quantization)}  # fmt: skip
    return write_atomically(path, safetensors_bytes(tensors, metadata=metadata))


def load_quantized(path: str | Path) -> GPTModel:
    """The quantized model that ``save_quantized`` wrote, in eval mode, on the CPU."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (not a dict)
        cfg = GPTConfig(**json.loads(metadata["config"]))
        settings = json.loads(metadata["quantization"])
        aliases = json.loads(metadata["aliases"])
    except Exception as err:  # noqa: BLE001 (missing, damaged, or another kind of file)
        raise UserError(f"{path} is not a model save_quantized wrote ({err})") from None
    model = quantize_model(GPTModel(cfg), **settings)  # the layout; the weights come next
    tensors |= {name: tensors[source] for name, source in aliases.items()}
    try:
        model.load_state_dict(tensors)
    except RuntimeError as err:
        raise UserError(f"{path} does not fit its own config: {str(err).splitlines()[0]}") from None
    return model.eval()


# --8<-- [end:save]
