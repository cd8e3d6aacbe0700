"""LoRA on fused MoE expert tensors equals PEFT's ``target_parameters`` LoRA: the epoch export loads in PEFT with
lit-qlp's logits, and the first step's loss and expert-LoRA gradients are PEFT's, for every MoE family."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from lit_qlp.adapters.experts import ExpertLora, ParametrizationCache, add_expert_lora, expert_loras
from lit_qlp.adapters.lora import LoraLinear, lora_tensors
from lit_qlp.kernels import TokenWeightedLoss
from lit_qlp.methods import LoRA
from lit_qlp.models.pipeline import ModelSource
from lit_qlp.module import shift_left
from lit_qlp.strategies.stages import SingleProcessStages
from tests.tiny_models import MOE_ARCHITECTURES, VOCAB, load_hf, stage_layers

peft = pytest.importorskip("peft")

EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]


def randomize_b(layers, seed: int = 1) -> None:
    """B starts at zero (so would A's gradient and the update); give every B a value."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers:
            for module in layer.modules():
                if isinstance(module, LoraLinear):
                    module.lora_B.weight.copy_(torch.randn(module.lora_B.weight.shape, generator=generator) * 0.1)
                elif isinstance(module, ExpertLora):
                    module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=generator) * 0.1)


def lit_layers(source, method):
    method.check(source, None)
    loss_fn = TokenWeightedLoss()
    layers = stage_layers(source, method.layer_adapter(source, seed=0), loss=loss_fn)
    randomize_b(layers)
    return layers, loss_fn


def peft_model(model_dir, source, target_modules, target_parameters, rank=4):
    config = peft.LoraConfig(
        r=rank, lora_alpha=rank, target_modules=target_modules, target_parameters=target_parameters
    )
    return peft.get_peft_model(load_hf(model_dir, source.attn_implementation), config)


def peft_key(key: str) -> str:
    return key.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")


def forward(layers, ids):
    x = (ids, torch.arange(ids.shape[1]).unsqueeze(0), torch.zeros_like(ids))
    for layer in layers:
        x = layer(x)
    return x


@pytest.mark.parametrize("arch", MOE_ARCHITECTURES)
def test_export_loads_in_peft_and_gives_lit_qlps_logits(tiny_model, tmp_path, arch):
    model_dir = tiny_model(arch)
    source = ModelSource(model_dir, dtype="float32")
    method = LoRA(rank=4, target_modules=["q_proj", *EXPERTS])
    layers, _ = lit_layers(source, method)
    expert_count = sum(1 for layer in layers for _ in expert_loras(layer))
    sparse = sum(1 for i in range(source.quirks.num_layers) if "experts" in str(source.submodule(f"model.layers.{i}")))
    assert expert_count == 2 * sparse > 0
    method.export(tmp_path / "adapter", layers, SingleProcessStages(), source)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_parameters"] == EXPERTS and config["target_modules"] == ["q_proj"]

    ids = torch.randint(3, VOCAB, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = layers[-1].logits(forward(layers, ids))
        hf = load_hf(model_dir, source.attn_implementation)
        base = hf(input_ids=ids).logits
        model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
        reference = model(input_ids=ids).logits
    torch.testing.assert_close(logits, reference)
    assert not torch.allclose(logits, base, atol=1e-4)


# PEFT 0.21 checks pattern keys against module names only and warns, yet applies them to target_parameters; 0.22
# no longer warns. What counts is that the ranks are applied (the wrappers' r and scaling below).
@pytest.mark.filterwarnings("ignore:The following alpha_pattern keys did not match")
@pytest.mark.filterwarnings("ignore:The following rank_pattern keys did not match")
@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "gpt_oss"])
def test_expert_rank_exports_as_peft_patterns_with_lit_qlps_logits_and_merge(tiny_model, tmp_path, arch):
    from lit_qlp.export.merge import merge_lora
    from lit_qlp.formats.peft import read_lora_adapter

    model_dir = tiny_model(arch)
    source = ModelSource(model_dir, dtype="float32")
    method = LoRA(rank=8, expert_rank=2, target_modules=["q_proj", *EXPERTS])
    layers, _ = lit_layers(source, method)
    assert {lora.rank for layer in layers for _, _, lora in expert_loras(layer)} == {2}
    assert {m.lora_A.weight.shape[0] for layer in layers for m in layer.modules() if isinstance(m, LoraLinear)} == {8}
    method.export(tmp_path / "adapter", layers, SingleProcessStages(), source)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (8, 8)
    assert config["rank_pattern"] == config["alpha_pattern"] == dict.fromkeys(EXPERTS, 2)
    adapter = read_lora_adapter(tmp_path / "adapter")
    assert set(adapter.expert_ranks.values()) == {2} and set(adapter.expert_scales.values()) == {1.0}

    ids = torch.randint(3, VOCAB, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = layers[-1].logits(forward(layers, ids))
        hf = load_hf(model_dir, source.attn_implementation)
        model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
        wrappers = [m for m in model.modules() if type(m).__name__ == "ParamWrapper"]
        assert wrappers and {(w.r["default"], w.scaling["default"]) for w in wrappers} == {(2, 1.0)}
        torch.testing.assert_close(logits, model(input_ids=ids).logits)

        merge_lora(model_dir, tmp_path / "adapter", tmp_path / "merged")
        ours = load_hf(tmp_path / "merged", source.attn_implementation).state_dict()
        reference = model.merge_and_unload().state_dict()
    assert sorted(ours) == sorted(reference)
    for name, tensor in reference.items():
        torch.testing.assert_close(ours[name], tensor, msg=lambda m: f"{name}: {m}")


def test_expert_rank_is_validated():
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match=r"model\.method\.expert_rank=.* is not a positive integer"):
            LoRA(rank=8, expert_rank=bad)
    assert LoRA(rank=8).expert_rank == 8 and LoRA(rank=8, expert_rank=2).expert_rank == 2


def test_export_with_some_layers_names_the_adapted_tensors(tiny_model, tmp_path):
    model_dir = tiny_model("qwen3_moe")
    source = ModelSource(model_dir, dtype="float32")
    method = LoRA(rank=4, target_modules=["experts.down_proj"], layers_to_transform="1:2")
    layers, _ = lit_layers(source, method)
    method.export(tmp_path / "adapter", layers, SingleProcessStages(), source)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    # Layer 1 of the tiny qwen3_moe is dense (mlp_only_layers), so only layer 2 has experts to adapt.
    assert config["target_parameters"] == ["model.layers.2.mlp.experts.down_proj"]
    ids = torch.randint(3, VOCAB, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = layers[-1].logits(forward(layers, ids))
        hf = load_hf(model_dir, source.attn_implementation)
        reference = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()(input_ids=ids).logits
    torch.testing.assert_close(logits, reference)


@pytest.mark.parametrize("arch", MOE_ARCHITECTURES)
def test_first_step_loss_and_expert_gradients_match_peft(tiny_model, arch):
    model_dir = tiny_model(arch)
    source = ModelSource(model_dir, dtype="float32")
    layers, loss_fn = lit_layers(source, LoRA(rank=4, target_modules=["v_proj", *EXPERTS]))
    ours = lora_tensors(layers)
    model = peft_model(model_dir, source, ["v_proj"], EXPERTS)
    peft_params = dict(model.named_parameters())
    assert {peft_key(k) for k in ours} == {k for k, p in peft_params.items() if p.requires_grad}
    with torch.no_grad():
        for key, tensor in ours.items():
            peft_params[peft_key(key)].copy_(tensor)

    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(3, VOCAB, (2, 20), generator=generator)
    labels = ids.clone()
    labels[0, :12] = -100
    loss_fn.normalize_by(float((shift_left(labels, -100) != -100).sum()))
    loss = 0.0
    for i in range(2):
        micro_loss = loss_fn(forward(layers, ids[i : i + 1]), shift_left(labels[i : i + 1], -100))
        micro_loss.backward()
        loss = loss + micro_loss.detach()
    model.train()
    reference = model(input_ids=ids, labels=labels).loss
    reference.backward()
    torch.testing.assert_close(loss, reference.detach())

    grads = {}
    for layer in layers:
        for name, lora in [(n, m) for n, _, m in expert_loras(layer)]:
            key = f"base_model.model.{layer.hf_prefix}.{name.split('.', 1)[1]}.{'base_layer.' * lora.peft_nesting}"
            grads[f"{key}lora_A.weight"], grads[f"{key}lora_B.weight"] = lora.lora_A.grad, lora.lora_B.grad
    assert grads and set(grads) < set(ours)
    for key, grad in grads.items():
        torch.testing.assert_close(grad, peft_params[peft_key(key)].grad, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("transposed", [False, True])
def test_update_is_peft_delta_weight_and_chains_after_an_earlier_parametrization(transposed):
    class Scale(nn.Module):
        """A stand-in for a base format's first parametrization (the 4-bit dequantisation): W = 2 · original."""

        def forward(self, original):
            return original * 2

    class Experts(nn.Module):
        def __init__(self):
            super().__init__()
            self.is_transposed = transposed
            self.gate_up_proj = nn.Parameter(torch.randn(3, 5, 7), requires_grad=False)
            self.reads = 0

        def forward(self, x):
            return torch.stack([x @ self.weight(e) for e in range(3)])

        def weight(self, e):
            self.reads += 1
            return self.gate_up_proj[e] if transposed else self.gate_up_proj[e].T

    experts = Experts()
    original = experts.gate_up_proj.detach().clone()
    parametrize.register_parametrization(experts, "gate_up_proj", Scale())
    lora = add_expert_lora(experts, "gate_up_proj", torch.Size((3, 5, 7)), 2, 4.0, torch.float32, None)
    assert (lora.in_features, lora.out_features) == ((5, 7) if transposed else (7, 5))
    with torch.no_grad():
        lora.lora_B.normal_()
    # PEFT's own formula (ParamWrapper.get_delta_weight) on the same factors.
    wrapper_layout = "e i o" if transposed else "e o i"
    b = lora.lora_B.reshape(lora.lora_B.shape[0], -1, 3)
    a = lora.lora_A.reshape(3, -1, lora.lora_A.shape[-1])
    delta = torch.einsum(f"o r e, e r i -> {wrapper_layout}", b, a) * 2.0
    torch.testing.assert_close(experts.gate_up_proj, 2 * original + delta)

    ParametrizationCache().attach(experts)
    ParametrizationCache().attach(experts)  # a base format holding the cache open too does no harm
    calls = []
    experts.parametrizations.gate_up_proj[0].register_forward_hook(lambda *args: calls.append(1))
    out = experts(torch.randn(4, 5 if transposed else 7))
    assert out.shape[0] == 3 and len(calls) == 1 and experts.reads == 3
    out.sum().backward()
    assert lora.lora_A.grad is not None and experts.parametrizations.gate_up_proj.original.grad is None


def test_expert_targets_are_named_with_their_module(tiny_model):
    source = ModelSource(tiny_model("mixtral"), dtype="float32")
    assert LoRA(target_modules="all-linear").expert_targets(source) == EXPERTS
    assert LoRA(target_modules=["experts.down_proj"]).expert_targets(source) == ["experts.down_proj"]
    assert LoRA(target_modules=["mlp.experts.gate_up_proj"]).expert_targets(source) == ["experts.gate_up_proj"]
    assert LoRA(target_modules=["q_proj"]).expert_targets(source) == []
    with pytest.raises(ValueError, match=r"\['down_proj'\] match no linear layer.*fused expert tensors are"):
        LoRA(target_modules=["down_proj"]).check(source, None)
    with pytest.raises(ValueError, match=r"dropout=0.1: LoRA on the fused expert tensors"):
        LoRA(target_modules="all-linear", dropout=0.1).check(source, None)
    with pytest.raises(ValueError, match=r"weight_decay=0.1: the composite decay .* not to the fused expert"):
        LoRA(target_modules="all-linear", weight_decay=0.1).check(source, None)
    dense = ModelSource(tiny_model("llama"), dtype="float32")
    assert LoRA(target_modules="all-linear").expert_targets(dense) == []
