"""The LoRA method: rsLoRA is one option in one place; the method's export loads in PEFT with lit-qlp's logits."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lit_qlp.adapters.lora import LoraLinear
from lit_qlp.methods import LoRA
from lit_qlp.models.pipeline import ModelSource
from lit_qlp.strategies.stages import SingleProcessStages
from tests.tiny_models import VOCAB, load_hf, stage_layers

peft = pytest.importorskip("peft")


@pytest.mark.parametrize("use_rslora", [False, True])
def test_export_loads_in_peft_and_gives_lit_qlps_logits(tiny_model, tmp_path, use_rslora):
    model_dir = tiny_model("llama")
    source = ModelSource(model_dir, dtype="float32")
    method = LoRA(rank=4, target_modules=["q_proj", "down_proj"], layers_to_transform="1:3", use_rslora=use_rslora)
    method.check(source, None)
    layers = stage_layers(source, method.layer_adapter(source, seed=0))
    loras = [m for layer in layers for m in layer.modules() if isinstance(m, LoraLinear)]
    assert len(loras) == 6 and all(m.scaling == (math.sqrt(4) if use_rslora else 1.0) for m in loras)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in loras:
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=generator) * 0.1)
    method.export(tmp_path / "adapter", layers, SingleProcessStages(), source)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["use_rslora"] is use_rslora and config["r"] == config["lora_alpha"] == 4
    assert config["layers_to_transform"] == [1, 2, 3]

    ids = torch.randint(3, VOCAB, (1, 16), generator=generator)
    x = (ids, torch.arange(16).unsqueeze(0), torch.zeros_like(ids))
    with torch.no_grad():
        for layer in layers:
            x = layer(x)
        logits = layers[-1].logits(x)
        model = peft.PeftModel.from_pretrained(load_hf(model_dir, source.attn_implementation), tmp_path / "adapter")
        reference = model.eval()(input_ids=ids).logits
        base = load_hf(model_dir, source.attn_implementation)(input_ids=ids).logits
    torch.testing.assert_close(logits, reference)
    assert not torch.allclose(logits, base, atol=1e-4)


def test_options_are_checked_against_the_model(tiny_model):
    source = ModelSource(tiny_model("llama"), dtype="float32")
    with pytest.raises(ValueError, match=r"model.method.target_modules entries \['qproj'\] match no linear layer"):
        LoRA(target_modules=["qproj"]).check(source, None)
    with pytest.raises(ValueError, match=r"model.method.layers_to_transform='0:7'.*4 layers"):
        LoRA(layers_to_transform="0:7").check(source, None)
    with pytest.raises(ValueError, match=r"model.method.dropout=1.0 must be in \[0, 1\)"):
        LoRA(dropout=1.0)
