"""Control Adapters on a 4-bit base: the forward is the Control Adapter formulas on transformers + bitsandbytes'
decoder-layer outputs; training is the same in 1 stage and in 2 stages; the export converts to a LoRA."""

from __future__ import annotations

import json

import pytest
import torch

from lit_qlp.adapters.control import ControlAdapter
from lit_qlp.bases import BitsAndBytes4bit
from lit_qlp.kernels import TokenWeightedLoss
from lit_qlp.models.pipeline import ModelSource
from tests.runs import ROOT, fit_args, run_cli, scalars
from tests.tiny_models import VOCAB, stage_layers

bnb = pytest.importorskip("bitsandbytes")

SEQ = 20


def hf_4bit(model_dir, quant_type: str, double_quant: bool, attn: str):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=config, dtype=torch.float32, device_map="cpu", attn_implementation=attn
    )
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False  # the portable CPU path (see lit_qlp.models.quantize)
    return model.eval()


def steer(q: torch.Tensor, s: torch.Tensor, classes: torch.Tensor):
    """A forward hook applying the Control Adapter formulas to a decoder layer's output, written out:
    ``h + δ + Q diag(expm1(c·S)) Qᵀ δ`` with ``δ = output - input`` and ``c`` the class of each position."""

    def hook(module, args, kwargs, output):
        hidden_in = args[0] if args else kwargs["hidden_states"]
        out = output[0] if isinstance(output, tuple) else output
        delta = out - hidden_in
        gain = torch.expm1(classes.float().unsqueeze(-1) * s)  # [1, seq, r]; class 0 gives 0
        steered = out + ((delta @ q) * gain) @ q.T
        return (steered, *output[1:]) if isinstance(output, tuple) else steered

    return hook


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("nf4", False), ("fp4", False)])
def test_forward_is_the_control_formulas_on_transformers_bitsandbytes_layers(tiny_model, quant_type, double_quant):
    model_dir = tiny_model("llama")
    source = ModelSource(model_dir, dtype="float32")
    rank, layers_with = 4, [0, 2, 3]
    adapter = ControlAdapter(rank, 0.0, layers_with, source.config.hidden_size, torch.float32, seed=0)
    layers = stage_layers(source, adapter, base=BitsAndBytes4bit(quant_type, double_quant), loss=TokenWeightedLoss())
    generator = torch.Generator().manual_seed(3)
    hf = hf_4bit(model_dir, quant_type, double_quant, source.attn_implementation)
    ids = torch.randint(3, VOCAB, (1, SEQ), generator=generator)
    classes = torch.randint(-1, 2, (1, SEQ), generator=generator)
    hooks = []
    for index in layers_with:
        control = layers[1 + index].layer
        assert isinstance(control.base_layer.mlp.down_proj, bnb.nn.Linear4bit)  # the base really is 4-bit
        with torch.no_grad():
            control.control_S.copy_(torch.randn(rank, generator=generator))
        q, s = control.control_Q.detach(), control.control_S.detach()
        hooks.append(hf.model.layers[index].register_forward_hook(steer(q, s, classes), with_kwargs=True))
    x = (ids, torch.arange(SEQ).unsqueeze(0), classes)
    with torch.no_grad():
        for layer in layers:
            x = layer(x)
        logits = layers[-1].logits(x)
        reference = hf(input_ids=ids).logits
        for hook in hooks:
            hook.remove()
        unsteered = hf(input_ids=ids).logits
    torch.testing.assert_close(logits, reference)
    assert not torch.allclose(reference, unsteered, atol=1e-3)  # the adapters changed something


CONTROL_4BIT = (
    "--model.method=lit_qlp.methods.ControlAdapters",
    "--model.base=lit_qlp.bases.BitsAndBytes4bit",
    "--model.lr=2e-2",
    "--checkpoint.every_n_train_steps=0",
)


@pytest.mark.slow
def test_control_adapters_on_nf4_train_alike_in_one_and_two_stages_and_convert_to_lora(tiny_model, tmp_path):
    from tests.methods.test_control import opposite_datasets

    model_dir = tiny_model("llama")
    up, down = opposite_datasets(tmp_path)
    datasets = (
        f"--data.datasets=[{{dataset_path: {up}, control_class: 1}}, {{dataset_path: {down}, control_class: -1}}]"
    )
    one, two = tmp_path / "one", tmp_path / "two"
    run_cli(fit_args(model_dir, up, one, *CONTROL_4BIT, datasets, "--trainer.max_steps=6"), ROOT)
    two_stages = ("--trainer.devices=2", "--trainer.strategy.pipeline_stages=2")
    run_cli(fit_args(model_dir, up, two, *CONTROL_4BIT, datasets, "--trainer.max_steps=6", *two_stages), ROOT)
    reference, losses = scalars(one, "train/loss"), scalars(two, "train/loss")
    assert sorted(losses) == sorted(reference) == list(range(6))
    for step in reference:
        torch.testing.assert_close(losses[step], reference[step], msg=lambda m: f"step {step}: {m}")
    for tag in ("train/norms_max", "train/orthogonality_max"):
        assert sorted(scalars(two, tag)) == list(range(6)), tag
    assert scalars(two, "train/norms_max")[5] > 0  # the adapters trained (S moved away from 0)

    export = two / "step6"
    config = json.loads((export / "adapter_config.json").read_text())
    assert config["peft_type"] == "CONTROL_ADAPTER" and config["layers_to_transform"] == [0, 1, 2, 3]
    from lit_qlp.export.control import control_adapter_to_lora

    lora = control_adapter_to_lora(model_dir, export, tmp_path / "lora")
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file() and lora
