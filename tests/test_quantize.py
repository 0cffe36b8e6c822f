"""Weight-only quantization: int8 equals PyTorch's own int8 quantization, rounding moves no weight
by more than half a step, int4 packs and unpacks exactly, and a saved model loads to the same
logits."""

import copy
import warnings

import pytest
import torch
import torch.ao.quantization as tq
from torch import nn

from src.errors import UserError
from src.generate import generate
from src.model import GPTConfig, GPTModel, count_parameters
from src.quantize import (
    dequantize,
    load_quantized,
    model_size_bytes,
    pack_int4,
    quantize,
    quantize_model,
    save_quantized,
    unpack_int4,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(**kw) -> GPTModel:
    cfg = GPTConfig.from_preset("cpu-tiny", vocab_size=97, context_length=32, **kw)
    return GPTModel(cfg).eval()


# PyTorch's observer of int8 weights, per output channel and symmetric, on [-127, 127]: the
# scheme of quantize_model(bits=8). (Its default range [-128, 127] would divide by 127.5.)
OBSERVER = tq.PerChannelMinMaxObserver.with_args(
    dtype=torch.qint8, qscheme=torch.per_channel_symmetric, quant_min=-127, quant_max=127
)


def pytorch_int8(model: GPTModel) -> nn.Module:
    """The reference: ``torch.ao.quantization.quantize_dynamic`` on every Linear, with OBSERVER.
    It has no int8 embedding of this scheme, so its embedding tables are rounded by PyTorch's
    ``quantize_per_channel`` with the same observer's scales."""
    reference = copy.deepcopy(model)
    with warnings.catch_warnings():  # torch.ao.quantization is deprecated in favour of torchao
        warnings.simplefilter("ignore")
        for table in (reference.tok_emb, reference.pos_emb):
            observer = OBSERVER()
            observer(table.weight)
            scales, zeros = observer.calculate_qparams()
            rounded = torch.quantize_per_channel(table.weight.detach(), scales, zeros, 0, torch.qint8)
            table.weight.data = rounded.dequantize()
        qconfig = tq.QConfig(
            activation=tq.PlaceholderObserver.with_args(dtype=torch.quint8, is_dynamic=True),
            weight=OBSERVER,
        )
        return tq.quantize_dynamic(reference, {nn.Linear: qconfig})


def linears(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if type(m).__name__.endswith("Linear")}


def test_int8_integers_and_scales_equal_pytorchs():
    model = tiny_model()
    ours, reference = quantize_model(model, bits=8), pytorch_int8(model)
    theirs = linears(reference)
    assert set(linears(ours)) == set(theirs) and len(theirs) == 2 * 6 + 1  # 6 per block, head
    for name, layer in linears(ours).items():
        packed = theirs[name].weight()  # PyTorch's int8 weight: integers and per-row scales
        assert torch.equal(layer.weight.qweight, packed.int_repr()), name
        assert torch.equal(layer.weight.scales[:, 0], packed.q_per_channel_scales().float()), name


def test_int8_logits_match_quantize_dynamic():
    model = tiny_model()
    with torch.no_grad():
        model.out_head.weight.mul_(20)  # logits of a trained model's size, a few units apart
    ids = torch.randint(0, 97, (4, 32))
    with torch.no_grad():
        ours, theirs, full = quantize_model(model, 8)(ids), pytorch_int8(model)(ids), model(ids)
    # The reference also rounds every activation to 8 bits (dynamically, per tensor), which ours
    # leaves in float32: tolerance 2% of the logits' spread, for that rounding.
    spread = full.std().item()
    assert (ours - theirs).abs().max() < 0.02 * spread * 6
    assert (ours - theirs).abs().mean() < 0.02 * spread
    # Without that rounding the two agree to float precision: a float model holding PyTorch's
    # int8 weights, dequantized by PyTorch, computes our logits.
    dequantized = copy.deepcopy(model)
    for name, layer in linears(dequantized).items():
        layer.weight.data = linears(pytorch_int8(model))[name].weight().dequantize()
    for table in ("tok_emb", "pos_emb"):
        getattr(dequantized, table).weight.data = getattr(pytorch_int8(model), table).weight.data
    with torch.no_grad():
        torch.testing.assert_close(ours, dequantized(ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "bits, group_size", [(8, None), (8, 32), (4, None), (4, 32), (4, 64), (4, 128)]
)
def test_dequantized_weights_are_within_half_a_step(bits, group_size):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 256, generator=g, dtype=torch.float64).float()
    weight[3, 7] = 25.0  # an outlier: its group's step is coarse, the others' are not
    q, scales = quantize(weight, bits, group_size)
    q_max = 2 ** (bits - 1) - 1
    assert q.dtype == torch.int8 and q.abs().max() == q_max  # every group reaches its absmax
    assert scales.shape == (48, 256 // (group_size or 256))
    step = scales.repeat_interleave(group_size or 256, dim=1)  # (48, 256): each weight's step
    error = (dequantize(q, scales).double() - weight.double()).abs()
    assert (error <= step / 2 * (1 + 1e-6)).all()  # round to nearest: at most half a step


def test_a_zero_row_quantizes_to_zero():
    q, scales = quantize(torch.zeros(2, 8), 4, 4)
    assert (q == 0).all() and (dequantize(q, scales) == 0).all()


def test_int4_packing_round_trips_two_values_a_byte():
    every = torch.arange(-8, 8, dtype=torch.int8)
    pairs = torch.cartesian_prod(every, every).to(torch.int8)  # (256, 2): every pair of values
    packed = pack_int4(pairs)
    assert packed.shape == (256, 1) and packed.dtype == torch.uint8
    assert sorted(packed.flatten().tolist()) == list(range(256))  # each pair its own byte
    assert torch.equal(unpack_int4(packed), pairs)
    # The layout by hand: the even column in the low four bits, both offset by 8.
    assert pack_int4(torch.tensor([[1, -2]], dtype=torch.int8)).item() == (1 + 8) | (-2 + 8) << 4
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-8, 8, (5, 3, 64), generator=g, dtype=torch.int8)
    assert torch.equal(unpack_int4(pack_int4(q)), q)


def test_sizes_every_layer_quantized_and_the_tied_weight_once():
    model = tiny_model(tie_weights=True)
    assert model_size_bytes(model) == 4 * count_parameters(model)  # float32, the tie counted once
    q8, q4 = quantize_model(model, 8), quantize_model(model, 4, 32)
    assert not [m for m in q4.modules() if isinstance(m, (nn.Linear, nn.Embedding))]
    assert q4.out_head.weight is q4.tok_emb.weight  # still one table, read in and scored out
    assert model_size_bytes(q8) < 0.3 * model_size_bytes(model)
    assert model_size_bytes(q4) < 0.2 * model_size_bytes(model)
    assert generate(q4, torch.tensor([[1, 2, 3]]), 5, 32).shape == (1, 8)


@pytest.mark.parametrize("bits, group_size", [(8, None), (4, 32)])
def test_save_and_load_give_the_same_logits(bits, group_size, tmp_path):
    model = quantize_model(tiny_model(tie_weights=True), bits, group_size)
    path = save_quantized(model, tmp_path / "model.safetensors")
    loaded = load_quantized(path)
    ids = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    assert loaded.quantization == {"bits": bits, "group_size": group_size}
    assert loaded.out_head.weight is loaded.tok_emb.weight
    header = 8 + int.from_bytes(path.read_bytes()[:8], "little")  # its length, then JSON
    assert path.stat().st_size - header == model_size_bytes(model)  # the integers, as they are


def test_refusals_are_one_line(tmp_path):
    model = tiny_model()
    for kwargs, message in [
        (dict(bits=3), "bits must be one of"),
        (dict(bits=4, group_size=3), "positive even"),
        (dict(bits=8, group_size=48), "does not divide"),
    ]:
        with pytest.raises(UserError, match=message):
            quantize_model(model, **kwargs)
    with pytest.raises(UserError, match="quantized already"):
        quantize_model(quantize_model(model), 8)
    with pytest.raises(UserError, match="not quantized"):
        save_quantized(model, tmp_path / "m.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="bad.safetensors is not a model save_quantized wrote"):
        load_quantized(tmp_path / "bad.safetensors")
