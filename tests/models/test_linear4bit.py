"""``Linear4bit``: bitsandbytes' layer with the lean forward gives bitsandbytes' results and gradients."""

from __future__ import annotations

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from lit_qlp.models.linear4bit import Linear4bit, dequantize_4bit_torch  # noqa: E402

CASES = [("nf4", True, 64), ("nf4", False, 64), ("fp4", True, 128), ("fp4", False, 32)]


def quantized(cls, weight: torch.Tensor, quant_type: str, double_quant: bool, blocksize: int, bias=None):
    out_features, in_features = weight.shape
    layer = cls(
        in_features,
        out_features,
        bias=bias is not None,
        compute_dtype=torch.float32,
        compress_statistics=double_quant,
        quant_type=quant_type,
        device="meta",
    )
    layer.weight = bnb.nn.Params4bit(
        weight.clone(),
        requires_grad=False,
        blocksize=blocksize,
        compress_statistics=double_quant,
        quant_type=quant_type,
        module=layer,
    ).to(weight.device)
    if bias is not None:
        layer.bias = torch.nn.Parameter(bias.clone(), requires_grad=False)
    layer.support_avx512bf16_for_cpu = False
    return layer


@pytest.mark.parametrize("quant_type,double_quant,blocksize", CASES)
def test_torch_dequantisation_is_bitsandbytes_bit_for_bit(quant_type, double_quant, blocksize):
    # 1,000 rows of 256: several second-level blocks of 256 scales, the last one partial.
    weight = torch.randn(1000, 256, generator=torch.Generator().manual_seed(0))
    layer = quantized(Linear4bit, weight, quant_type, double_quant, blocksize)
    state = layer.weight.quant_state
    reference = bnb.functional.dequantize_4bit(layer.weight.data, state)
    ours = dequantize_4bit_torch(layer.weight.data, state)
    assert ours.dtype == reference.dtype and ours.shape == reference.shape
    assert torch.equal(ours, reference)
    assert 0 < (ours - weight).abs().max() < 0.5 * weight.abs().max()  # it is a 4-bit approximation of the weight


def test_torch_dequantisation_of_rows_shorter_than_a_block_is_closest_to_the_weight():
    # Rows of 32 weights, blocks of 64: each block spans two rows. The formula follows the flattened weight,
    # as bitsandbytes' CUDA kernel does; its CPU kernel places the scales per row there (larger error).
    weight = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    layer = quantized(Linear4bit, weight, "nf4", False, 64)
    ours = dequantize_4bit_torch(layer.weight.data, layer.weight.quant_state)
    blocks = weight.reshape(-1, 64)
    code = layer.weight.quant_state.code
    nearest = code[(blocks / blocks.abs().amax(1, keepdim=True)).unsqueeze(-1).sub(code).abs().argmin(-1)]
    torch.testing.assert_close(ours.reshape(-1, 64), nearest * blocks.abs().amax(1, keepdim=True))


@pytest.mark.parametrize("quant_type,double_quant,blocksize", CASES)
def test_linear4bit_output_and_input_gradient_equal_bitsandbytes(quant_type, double_quant, blocksize):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 128, generator=generator)
    bias = torch.randn(96, generator=generator)
    ours = quantized(Linear4bit, weight, quant_type, double_quant, blocksize, bias)
    reference = quantized(bnb.nn.Linear4bit, weight, quant_type, double_quant, blocksize, bias)
    x = torch.randn(2, 5, 128, generator=generator, requires_grad=True)
    grad = torch.randn(2, 5, 96, generator=generator)
    y_ref = reference(x)
    (g_ref,) = torch.autograd.grad(y_ref, x, grad)
    y = ours(x)
    (g,) = torch.autograd.grad(y, x, grad)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(g, g_ref)
    assert g.abs().sum() > 0 and not ours.weight.requires_grad


def test_linear4bit_backward_keeps_only_the_packed_weight():
    # Saved for backward: the input and the 4-bit weight, not a dequantised float copy of the weight.
    weight = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    layer = quantized(Linear4bit, weight, "nf4", True, 64)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(torch.randn(4, 128, requires_grad=True)).sum().backward()
    assert saved and all(t.dtype == torch.uint8 or t.shape[-1] == 128 and t.shape[0] == 4 for t in saved)
    assert not any(t.shape == weight.shape for t in saved)


def test_compiled_linear4bit_equals_eager_and_has_no_graph_break():
    weight = torch.randn(96, 128, generator=torch.Generator().manual_seed(0))
    layer = quantized(Linear4bit, weight, "nf4", True, 64)
    x = torch.randn(3, 128, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)  # fails on a graph break
    y = compiled(x)
    (g,) = torch.autograd.grad(y.square().sum(), x)
    y_ref = layer(x)
    (g_ref,) = torch.autograd.grad(y_ref.square().sum(), x)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(g, g_ref)


@pytest.mark.gpu
def test_torch_dequantisation_equals_the_cuda_kernel():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    for quant_type, double_quant, blocksize in CASES:
        weight = torch.randn(1000, 256, device="cuda", dtype=torch.bfloat16)
        layer = quantized(Linear4bit, weight, quant_type, double_quant, blocksize)
        state = layer.weight.quant_state
        assert torch.equal(
            dequantize_4bit_torch(layer.weight.data, state), bnb.functional.dequantize_4bit(layer.weight.data, state)
        )
        compiled = torch.compile(dequantize_4bit_torch)
        assert torch.equal(compiled(layer.weight.data, state), bnb.functional.dequantize_4bit(layer.weight.data, state))
