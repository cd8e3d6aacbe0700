"""The LoRA layer (lit_qlp/adapters/lora.py): forward, initialisation, dtypes, composite decay, update norm."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lit_qlp.adapters.lora import LoraAdapter, LoraLinear
from tests.adapters.helpers import Block


def make_lora(in_features=6, out_features=5, rank=3, alpha=6.0, dropout=0.0, dtype=torch.float32, base_dtype=None):
    torch.manual_seed(0)
    base = nn.Linear(in_features, out_features, dtype=base_dtype or torch.float32)
    lora = LoraLinear(base, rank, alpha, dropout=dropout, dtype=dtype)
    with torch.no_grad():  # a non-zero B so that the update shows
        lora.lora_A.weight.copy_(torch.randn(rank, in_features))
        lora.lora_B.weight.copy_(torch.randn(out_features, rank))
    return lora


def test_lora_forward_matches_hand_computation():
    for rank, alpha in [(1, 1.0), (3, 6.0), (4, 2.0)]:
        lora = make_lora(rank=rank, alpha=alpha)
        x = torch.randn(2, 7, 6)
        a, b = lora.lora_A.weight, lora.lora_B.weight
        expected = F.linear(x, lora.base_layer.weight, lora.base_layer.bias) + (x @ a.T @ b.T) * (alpha / rank)
        torch.testing.assert_close(lora(x), expected)


def test_lora_starts_at_base():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    lora = LoraLinear(base, rank=4, alpha=8.0)
    assert torch.count_nonzero(lora.lora_B.weight) == 0
    assert torch.count_nonzero(lora.lora_A.weight) > 0
    assert lora.lora_A.weight.shape == (4, 6) and lora.lora_B.weight.shape == (5, 4)
    x = torch.randn(3, 6)
    torch.testing.assert_close(lora(x), base(x))


def test_lora_init_seeded_by_generator():
    base = nn.Linear(6, 5)
    one = LoraLinear(base, 4, 4.0, generator=torch.Generator().manual_seed(7))
    two = LoraLinear(base, 4, 4.0, generator=torch.Generator().manual_seed(7))
    three = LoraLinear(base, 4, 4.0, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(one.lora_A.weight, two.lora_A.weight)
    assert not torch.equal(one.lora_A.weight, three.lora_A.weight)
    bound = 1 / 6**0.5  # kaiming_uniform_(a=sqrt(5)) on fan_in=6
    assert one.lora_A.weight.abs().max() <= bound


def test_lora_dropout_only_in_training():
    lora = make_lora(dropout=0.5)
    plain = make_lora(dropout=0.0)
    x = torch.randn(4, 6)
    lora.eval()
    torch.testing.assert_close(lora(x), plain(x))
    lora.train()
    torch.manual_seed(1)
    assert not torch.allclose(lora(x), plain(x))


def test_lora_dtypes():
    lora = make_lora(base_dtype=torch.bfloat16, dtype=torch.float32)
    assert lora.lora_A.weight.dtype == torch.float32
    x = torch.randn(3, 6).to(torch.bfloat16)
    out = lora(x)
    assert out.dtype == torch.bfloat16
    base_out = lora.base_layer(x)
    update = (x.float() @ lora.lora_A.weight.T @ lora.lora_B.weight.T) * lora.scaling
    torch.testing.assert_close(out, base_out + update.to(torch.bfloat16))

    lora16 = make_lora(base_dtype=torch.float32, dtype=torch.bfloat16)
    assert lora16.lora_B.weight.dtype == torch.bfloat16
    out = lora16(torch.randn(3, 6))
    assert out.dtype == torch.float32


def test_lora_adapter_wraps_selected_layers_only():
    adapter = LoraAdapter(
        rank=2, alpha=2.0, dropout=0.0, target_modules=["q_proj"], layers=[1], dtype=torch.float32, seed=3
    )
    untouched, touched = Block(), Block()
    adapter(untouched, 0, "model.layers.0")
    adapter(touched, 1, "model.layers.1")
    assert not any(isinstance(m, LoraLinear) for m in untouched.modules())
    wrapped = [n for n, m in touched.named_modules() if isinstance(m, LoraLinear)]
    assert wrapped == ["self_attn.q_proj"]
    again = Block()
    adapter(again, 1, "model.layers.1")
    torch.testing.assert_close(again.self_attn.q_proj.lora_A.weight, touched.self_attn.q_proj.lora_A.weight)


def test_composite_decay_is_a_gradient_step_on_half_the_squared_norm_of_ba():
    from lit_qlp.adapters.lora import LoraLinear, composite_decay_

    lora = LoraLinear(nn.Linear(7, 5, bias=False), rank=3, alpha=3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        lora.lora_B.weight.normal_(generator=torch.Generator().manual_seed(1))
    a = lora.lora_A.weight.detach().clone().requires_grad_()
    b = lora.lora_B.weight.detach().clone().requires_grad_()
    (0.5 * (b @ a).square().sum()).backward()
    lr, decay = 0.05, 0.3
    expected_a, expected_b = a - lr * decay * a.grad, b - lr * decay * b.grad
    norm_before = torch.linalg.matrix_norm(lora.lora_B.weight @ lora.lora_A.weight)
    composite_decay_(lora, lr, decay)
    torch.testing.assert_close(lora.lora_A.weight, expected_a.detach())
    torch.testing.assert_close(lora.lora_B.weight, expected_b.detach())
    assert torch.linalg.matrix_norm(lora.lora_B.weight @ lora.lora_A.weight) < norm_before


def test_lora_weight_decay_needs_float32_lora_weights():
    from lit_qlp.methods import LoRA

    with pytest.raises(ValueError, match=r"method.weight_decay needs float32 .*method.weight_dtype='bfloat16'"):
        LoRA(weight_decay=0.1, weight_dtype="bfloat16")


def test_update_norm_is_the_frobenius_norm_of_ba():
    from lit_qlp.adapters.lora import LoraLinear, update_norm

    lora = LoraLinear(nn.Linear(9, 7, bias=False), rank=3, alpha=3, generator=torch.Generator().manual_seed(0))
    assert update_norm(lora) == 0.0  # B starts at zero
    with torch.no_grad():
        lora.lora_B.weight.normal_(generator=torch.Generator().manual_seed(1))
    expected = torch.linalg.matrix_norm(lora.lora_B.weight @ lora.lora_A.weight)
    assert update_norm(lora) == pytest.approx(float(expected), rel=1e-5)


def test_lora_computed_in_the_activation_dtype():
    """float32 activations: the same numbers as the float32 path; bf16: close, with float32 weight gradients."""
    from lit_qlp.adapters.lora import LoraLinear

    def pair(compute_in_input_dtype, dtype):
        torch.manual_seed(0)
        base = nn.Linear(16, 8, bias=False).to(dtype)
        lora = LoraLinear(
            base, 4, 8, generator=torch.Generator().manual_seed(1), compute_in_input_dtype=compute_in_input_dtype
        )
        with torch.no_grad():
            lora.lora_B.weight.normal_(generator=torch.Generator().manual_seed(2))
        return lora

    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(3))
    for dtype, tolerance in ((torch.float32, 0.0), (torch.bfloat16, 3e-2)):
        outputs, grads = [], []
        for fast in (False, True):
            lora = pair(fast, dtype)
            out = lora(x.to(dtype))
            out.float().square().sum().backward()
            outputs.append(out.float())
            grads.append(lora.lora_A.weight.grad)
            assert lora.lora_A.weight.dtype == lora.lora_A.weight.grad.dtype == torch.float32
        torch.testing.assert_close(outputs[1], outputs[0], rtol=tolerance, atol=tolerance)
        torch.testing.assert_close(grads[1], grads[0], rtol=max(tolerance, 1.3e-6), atol=max(tolerance, 1e-5) * 10)
