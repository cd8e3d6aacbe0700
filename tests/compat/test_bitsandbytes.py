"""lit_qlp.compat.bitsandbytes against the installed bitsandbytes; and its errors when a target is gone."""

from __future__ import annotations

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from lit_qlp.compat.bitsandbytes import disable_avx512bf16_repack, quant_state_parts  # noqa: E402
from lit_qlp.models.linear4bit import dequantize_4bit_torch  # noqa: E402

OUTDATED = r"bitsandbytes \S+ has no .*lit_qlp/compat/bitsandbytes.py needs updating"


def quantized(double_quant: bool):
    weight = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    packed, state = bnb.functional.quantize_4bit(
        weight, blocksize=64, compress_statistics=double_quant, quant_type="nf4"
    )
    return packed, state


@pytest.mark.parametrize("double_quant", [True, False])
def test_quant_state_parts_dequantise_as_bitsandbytes(double_quant):
    packed, state = quantized(double_quant)
    parts = quant_state_parts(state)
    assert (parts.code, parts.absmax) == (state.code, state.absmax)
    assert (parts.blocksize, parts.shape, parts.dtype) == (64, torch.Size([64, 64]), torch.float32)
    assert (parts.nested is not None) == double_quant
    if double_quant:
        assert parts.nested.code is state.state2.code and parts.nested.absmax is state.state2.absmax
        assert parts.nested.blocksize == state.state2.blocksize and parts.nested.offset is state.offset
    assert torch.equal(dequantize_4bit_torch(packed, state), bnb.functional.dequantize_4bit(packed, state))


@pytest.mark.parametrize("field", ["code", "absmax", "blocksize", "shape", "dtype", "nested", "state2", "offset"])
def test_quant_state_parts_needs_the_quant_state_fields(field, monkeypatch):
    _, state = quantized(double_quant=True)
    monkeypatch.delattr(state, field)
    with pytest.raises(RuntimeError, match=OUTDATED) as error:
        quant_state_parts(state)
    assert f"QuantState.{field}" in str(error.value)


@pytest.mark.parametrize("field", ["code", "absmax", "blocksize"])
def test_quant_state_parts_needs_the_nested_state_fields(field, monkeypatch):
    _, state = quantized(double_quant=True)
    monkeypatch.delattr(state.state2, field)
    with pytest.raises(RuntimeError, match=OUTDATED) as error:
        quant_state_parts(state)
    assert f"QuantState.state2.{field}" in str(error.value)


def linear4bit() -> bnb.nn.Linear4bit:
    layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    weight = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", module=layer).to("cpu")
    return layer


def test_disable_avx512bf16_repack_keeps_the_weight_layout_in_eval_forwards():
    layer = linear4bit()
    disable_avx512bf16_repack(layer)
    assert layer.support_avx512bf16_for_cpu is False
    packed = layer.weight.data.clone()
    with torch.no_grad():
        layer.eval()(torch.randn(2, 64))
    assert torch.equal(layer.weight.data, packed)
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    x = torch.randn(2, 64, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None


def test_disable_avx512bf16_repack_needs_the_layers_switch(monkeypatch):
    layer = linear4bit()
    monkeypatch.delattr(layer, "support_avx512bf16_for_cpu")
    with pytest.raises(RuntimeError, match=OUTDATED):
        disable_avx512bf16_repack(layer)
