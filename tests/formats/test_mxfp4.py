"""gpt-oss as published: MXFP4 expert tensors (``*_blocks``, ``*_scales``) read dequantised, as transformers does."""

from __future__ import annotations

import json

import torch

from lit_qlp.formats.hf import dequantize_mxfp4
from lit_qlp.models.pipeline import ModelSource
from tests.models.test_pipeline import batch, run_layers
from tests.tiny_models import COMMON, stage_layers


def test_dequantisation_equals_transformers():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    generator = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 8, 2, 16), dtype=torch.uint8, generator=generator)
    scales = torch.randint(115, 135, (3, 8, 2), dtype=torch.uint8, generator=generator)
    expected = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
    assert torch.equal(dequantize_mxfp4(blocks, scales), expected)


def write_mxfp4_gpt_oss(directory) -> None:
    """A tiny gpt-oss whose expert tensors are stored in MXFP4, with the config's quantization_config."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, GptOssConfig

    torch.manual_seed(0)
    config = GptOssConfig(
        **{**COMMON, "intermediate_size": 32},
        head_dim=8,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"] * 2,
    )
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(directory)
    tensors = load_file(directory / "model.safetensors")
    generator = torch.Generator().manual_seed(1)
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        experts, columns, rows = tensors.pop(name).shape  # held transposed: [E, in, out]; stored per output row
        tensors[f"{name}_blocks"] = torch.randint(
            0, 256, (experts, rows, columns // 32, 16), dtype=torch.uint8, generator=generator
        )
        tensors[f"{name}_scales"] = torch.randint(
            121, 125, (experts, rows, columns // 32), dtype=torch.uint8, generator=generator
        )
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    saved = json.loads((directory / "config.json").read_text())
    saved["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": None}
    (directory / "config.json").write_text(json.dumps(saved))


def test_an_mxfp4_checkpoint_gives_the_logits_of_transformers_dequantising_it(tmp_path):
    from transformers import AutoModelForCausalLM, Mxfp4Config

    write_mxfp4_gpt_oss(tmp_path)
    reference = AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, quantization_config=Mxfp4Config(dequantize=True), attn_implementation="eager"
    ).eval()
    assert not any(n.endswith("_blocks") for n, _ in reference.named_parameters())
    source = ModelSource(tmp_path, dtype="float32", attn_implementation="eager")
    layers = stage_layers(source)
    ids = batch()
    with torch.no_grad():
        logits = layers[-1].logits(run_layers(layers, ids))
        expected = reference(ids).logits
    torch.testing.assert_close(logits, expected)
