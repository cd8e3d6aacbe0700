"""lit_qlp's fused-experts forward (lit_qlp/models/experts.py) against transformers' own per-expert loop ("eager"):
outputs and gradients of every MoE family, with and without LoRA on the experts; its row gathers and grouped
matmul against torch's indexing and matmul."""

from __future__ import annotations

import copy

import pytest
import torch

from lit_qlp.adapters.experts import add_expert_lora
from lit_qlp.models.experts import IMPLEMENTATION, Combine, Dispatch, grouped_experts_forward, grouped_mm
from tests.tiny_models import MOE_ARCHITECTURES


def hf_experts(model_dir):
    """The first experts module of the HF model (float32) and its config's top-k."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.set_experts_implementation("eager")
    experts = next(m for m in model.modules() if type(m).__name__.endswith("Experts"))
    top_k = getattr(model.config, "num_experts_per_tok")
    return experts, top_k


def routed_inputs(experts, top_k: int, tokens: int = 20):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(
        tokens, experts.gate_up_proj.shape[-1 if not experts.is_transposed else 1], generator=generator
    )
    scores = torch.randn(tokens, experts.num_experts, generator=generator)
    index = scores.topk(top_k, dim=-1).indices
    weights = torch.softmax(torch.randn(tokens, top_k, generator=generator), dim=-1)
    return hidden, index, weights


@pytest.mark.parametrize("lora", [0, 3, 8])  # no LoRA; a rank padded to 8; a rank used as it is
@pytest.mark.parametrize("arch", MOE_ARCHITECTURES)
def test_grouped_forward_and_gradients_equal_transformers_eager_loop(tiny_model, arch, lora):
    reference, top_k = hf_experts(tiny_model(arch))
    if lora:
        reference.requires_grad_(False)  # the base frozen, as the LoRA method leaves it
        for name in ("gate_up_proj", "down_proj"):
            shape = getattr(reference, name).shape
            pair = add_expert_lora(reference, name, shape, lora, 6.0, torch.float32, torch.Generator().manual_seed(1))
            with torch.no_grad():
                pair.lora_B.normal_(std=0.1, generator=torch.Generator().manual_seed(2))  # a non-zero update
    ours = copy.deepcopy(reference)
    hidden, index, weights = routed_inputs(reference, top_k)
    x_ref, x_ours = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    w_ref, w_ours = weights.clone().requires_grad_(), weights.clone().requires_grad_()

    expected = reference(x_ref, index, w_ref)  # eager: one matmul per expert, the LoRA formed into the weight
    got = grouped_experts_forward(ours, x_ours, index, w_ours)
    # With LoRA the update is summed in another order (on the activations, not into the weight): float32 rounding.
    tolerance = dict(rtol=1e-4, atol=1e-4) if lora else {}
    torch.testing.assert_close(got, expected, **tolerance)
    grad = torch.randn_like(expected, generator=torch.Generator().manual_seed(3))
    expected.backward(grad)
    got.backward(grad)
    torch.testing.assert_close(x_ours.grad, x_ref.grad, **tolerance)
    torch.testing.assert_close(w_ours.grad, w_ref.grad, **tolerance)
    trained = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    assert trained and (not lora or all("lora_" in n for n in trained))
    for name, param in reference.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(trained[name].grad, param.grad, **tolerance, msg=lambda m: f"{name}: {m}")


def test_models_built_by_lit_qlp_use_the_grouped_forward(tiny_model):
    from lit_qlp.models.pipeline import ModelSource

    source = ModelSource(tiny_model("qwen3_moe"), dtype="float32")
    experts = [m for m in source.skeleton.modules() if type(m).__name__.endswith("Experts")]
    assert experts and all(m.config._experts_implementation == IMPLEMENTATION for m in experts)


def test_dispatch_and_combine_equal_indexing_in_values_and_gradients():
    tokens, top_k, hidden = 7, 3, 5
    generator = torch.Generator().manual_seed(0)
    pair_of_row = torch.randperm(tokens * top_k, generator=generator)
    row_of_pair = torch.empty_like(pair_of_row)
    row_of_pair[pair_of_row] = torch.arange(tokens * top_k)
    token_of_row, rows_of_token = pair_of_row // top_k, row_of_pair.view(tokens, top_k)

    x = torch.randn(tokens, hidden, generator=generator, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    rows, rows_ref = Dispatch.apply(x, token_of_row, rows_of_token), x_ref[token_of_row]
    torch.testing.assert_close(rows, rows_ref)
    y = torch.randn(tokens * top_k, hidden, generator=generator, requires_grad=True)
    y_ref = y.detach().clone().requires_grad_()
    out = Combine.apply(y, token_of_row, rows_of_token)
    out_ref = y_ref[row_of_pair].view(tokens, top_k, hidden).sum(1)
    torch.testing.assert_close(out, out_ref)
    for a, b in ((rows, rows_ref), (out, out_ref)):
        grad = torch.randn_like(a, generator=generator)
        a.backward(grad)
        b.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(y.grad, y_ref.grad)


@pytest.mark.parametrize("fused", [True, False])
def test_grouped_mm_multiplies_each_experts_rows_by_its_matrix(monkeypatch, fused):
    import torch.nn.functional as F

    if not fused:
        monkeypatch.delattr(F, "grouped_mm")  # the per-expert fallback of older torch versions
    generator = torch.Generator().manual_seed(0)
    counts = [3, 0, 5, 2]  # an expert without rows too
    x = torch.randn(sum(counts), 8, generator=generator)
    weight = torch.randn(len(counts), 8, 16, generator=generator)
    offsets = torch.tensor(counts).cumsum(0).to(torch.int32)
    expected = torch.cat([rows @ weight[e] for e, rows in enumerate(x.split(counts))])
    torch.testing.assert_close(grouped_mm(x, weight, offsets), expected)


@pytest.mark.gpu
@pytest.mark.parametrize("rank", [2, 16])  # padded to 8, and a multiple of 8 used as it is
@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_grouped_forward_with_lora_runs_torchs_kernel_on_gpu_in_bf16(tiny_model, arch, rank, monkeypatch):
    import torch.nn.functional as F

    reference, top_k = hf_experts(tiny_model(arch))
    reference = reference.to("cuda", torch.bfloat16).requires_grad_(False)
    for name in ("gate_up_proj", "down_proj"):
        shape = getattr(reference, name).shape
        pair = add_expert_lora(reference, name, shape, rank, rank, torch.float32, torch.Generator().manual_seed(1))
        with torch.no_grad():
            pair.lora_B.normal_(std=0.1)
    ours = copy.deepcopy(reference)
    hidden, index, weights = (t.cuda() for t in routed_inputs(reference, top_k))
    hidden = hidden.bfloat16()
    calls = []
    kernel = F.grouped_mm

    def counted(*args, **kwargs):
        calls.append(args[1].shape)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(F, "grouped_mm", counted)
    got = grouped_experts_forward(ours, hidden, index, weights)
    assert len(calls) == 6  # base, then the two low-rank products, for each of the two projections
    with torch.no_grad():
        expected = reference(hidden, index, weights)
    torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)
    got.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in ours.parameters() if p.requires_grad)


@pytest.mark.gpu
@pytest.mark.parametrize("four_bit", [False, True])
@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_grouped_forward_and_backward_never_wait_for_the_gpu(tiny_model, arch, four_bit):
    """No host synchronisation in a training step's experts, bf16 or 4-bit base (a copy to the host, ``.item()``,
    an output sized by data): one per layer would leave the GPU idle while the CPU launches the next kernels."""
    module, top_k = hf_experts(tiny_model(arch))
    module = module.to("cuda", torch.bfloat16).requires_grad_(False)
    if four_bit:
        from lit_qlp.models.experts4bit import quantize_experts
        from lit_qlp.models.quantize import Quantization

        quantize_experts(module, Quantization("nf4", True, torch.bfloat16))
    for name in ("gate_up_proj", "down_proj"):
        add_expert_lora(
            module, name, getattr(module, name).shape, 2, 2, torch.float32, torch.Generator().manual_seed(1)
        )
    hidden, index, weights = (t.cuda() for t in routed_inputs(module, top_k))
    hidden = hidden.bfloat16().requires_grad_(True)
    grouped_experts_forward(module, hidden, index, weights)  # the first call loads kernels, which may synchronise
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = grouped_experts_forward(module, hidden, index, weights)
        out.float().square().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert hidden.grad is not None and all(p.grad is not None for p in module.parameters() if p.requires_grad)


def test_compiled_low_rank_of_many_experts_equals_eager():
    """Under torch.compile in bf16 (grouped_mm's kernel), 128 experts of rank 2 padded to 8, as the Qwen3-30B-A3B
    benchmark runs them: Inductor once laid the padded B out with the experts innermost, which grouped_mm refused."""
    from lit_qlp.adapters.experts import ExpertLora
    from lit_qlp.models.experts import low_rank

    generator = torch.Generator().manual_seed(0)
    lora = ExpertLora(128, 64, 192, rank=2, alpha=2, generator=generator)
    with torch.no_grad():
        lora.lora_B.normal_(generator=generator)
    x = torch.randn(512, 64, generator=generator, dtype=torch.bfloat16)
    offsets = torch.full((128,), 4).cumsum(0).to(torch.int32)
    results = []
    for fn in (low_rank, torch.compile(low_rank)):
        lora.zero_grad()
        inputs = x.clone().requires_grad_()
        out = fn(inputs, lora, offsets)
        out.float().square().sum().backward()
        results.append((out.detach(), inputs.grad, lora.lora_A.grad, lora.lora_B.grad))
    for compiled, eager in zip(results[1], results[0]):
        torch.testing.assert_close(compiled.float(), eager.float(), rtol=2e-2, atol=2e-2)
