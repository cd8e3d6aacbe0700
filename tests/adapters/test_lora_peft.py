"""lit_qlp's LoRA equals PEFT's: same loss and LoRA gradients from the same weights and batch."""

from __future__ import annotations

import pytest
import torch

from lit_qlp.adapters.lora import LoraAdapter, LoraLinear, lora_tensors
from lit_qlp.kernels import TokenWeightedLoss
from lit_qlp.models.pipeline import ModelSource
from lit_qlp.module import shift_left
from tests.tiny_models import VOCAB, load_hf, stage_layers

peft = pytest.importorskip("peft")


def build_lit_layers(model_dir, rank: int, target_modules, layers_to_transform=None):
    source = ModelSource(model_dir, dtype="float32")
    n = source.quirks.num_layers
    adapter = LoraAdapter(
        rank=rank,
        alpha=rank,
        dropout=0.0,
        target_modules=target_modules,
        layers=layers_to_transform if layers_to_transform is not None else range(n),
        dtype=torch.float32,
        seed=0,
    )
    loss_fn = TokenWeightedLoss()
    layers = stage_layers(source, adapter, loss=loss_fn)
    # B starts at zero, which would make A's gradient zero; give every B a value so both gradients are tested.
    generator = torch.Generator().manual_seed(1)
    for layer in layers:
        for module in layer.modules():
            if isinstance(module, LoraLinear):
                with torch.no_grad():
                    module.lora_B.weight.copy_(torch.randn(module.lora_B.weight.shape, generator=generator) * 0.1)
    return source, layers, loss_fn


def peft_key(lit_key: str) -> str:
    return lit_key.replace(".lora_A.weight", ".lora_A.default.weight").replace(
        ".lora_B.weight", ".lora_B.default.weight"
    )


@pytest.mark.parametrize(
    ("arch", "target_modules", "layers_to_transform"),
    [("llama", "all-linear", None), ("qwen3", ["q_proj", "v_proj", "down_proj"], [1, 2])],
)
def test_first_step_loss_and_lora_gradients_match_peft(tiny_model, arch, target_modules, layers_to_transform):
    model_dir = tiny_model(arch)
    source, layers, loss_fn = build_lit_layers(model_dir, 4, target_modules, layers_to_transform)
    ours = lora_tensors(layers)

    hf = load_hf(model_dir, source.attn_implementation)
    config = peft.LoraConfig(
        r=4,
        lora_alpha=4,
        lora_dropout=0.0,
        target_modules=target_modules,
        layers_to_transform=layers_to_transform,
    )
    model = peft.get_peft_model(hf, config)
    peft_params = dict(model.named_parameters())
    assert {peft_key(k) for k in ours} == {k for k, p in peft_params.items() if p.requires_grad}
    with torch.no_grad():
        for key, tensor in ours.items():
            peft_params[peft_key(key)].copy_(tensor)

    # Two micro-batches with different numbers of labelled tokens: the loss must be token-weighted.
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(3, VOCAB, (2, 20), generator=generator)
    labels = ids.clone()
    labels[0, :12] = -100

    # The pipeline's own loss (fused head + cross-entropy), normalised by the step's label tokens.
    loss_fn.normalize_by(float((shift_left(labels, -100) != -100).sum()))
    loss = 0.0
    for i in range(2):
        x = (ids[i : i + 1], torch.arange(20).unsqueeze(0), torch.zeros_like(ids[i : i + 1]))
        for layer in layers:
            x = layer(x)
        micro_loss = loss_fn(x, shift_left(labels[i : i + 1], -100))
        micro_loss.backward()
        loss = loss + micro_loss.detach()

    model.train()
    reference = model(input_ids=ids, labels=labels).loss
    reference.backward()
    torch.testing.assert_close(loss, reference.detach())

    lit_grads = {}
    for layer in layers:
        for name, param in layer.named_parameters():
            if param.requires_grad:
                lit_grads[f"base_model.model.{layer.hf_prefix}.{name.split('.', 1)[1]}"] = param.grad
    assert set(lit_grads) == set(ours)
    for key, grad in lit_grads.items():
        torch.testing.assert_close(grad, peft_params[peft_key(key)].grad, msg=lambda m: f"{key}: {m}")
