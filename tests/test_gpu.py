"""GPU checks (run on the GPU machine: ``pytest -m gpu``)."""

from __future__ import annotations

import pytest
import torch

from lit_qlp.models.pipeline import DecoderLayerPipe, EmbeddingPipe, ModelSource, OutputPipe
from tests.test_training import ROOT, fit_args, run_cli, scalars, write_corpus
from tests.tiny_models import VOCAB

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("arch", ["llama", "gemma2", "mixtral"])
def test_bf16_pipeline_logits_match_hf_on_gpu(tiny_model, arch):
    from transformers import AutoModelForCausalLM

    model_dir = tiny_model(arch)
    source = ModelSource(model_dir, dtype="bfloat16", device="cuda")
    layers = [EmbeddingPipe(source)] + [DecoderLayerPipe(source, i) for i in range(source.quirks.num_layers)]
    layers.append(OutputPipe(source))
    hf = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.bfloat16, attn_implementation=source.config._attn_implementation
    ).cuda()
    ids = torch.randint(3, VOCAB, (1, 64), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    x = (ids, torch.arange(64, device="cuda").unsqueeze(0), torch.zeros_like(ids))
    with torch.no_grad():
        for layer in layers:
            x = layer(x)
        x = layers[-1].logits(x)
        reference = hf(ids).logits
    torch.testing.assert_close(x.float(), reference.float(), rtol=2e-2, atol=2e-2)


def test_lora_training_on_gpu_through_the_cli(tiny_model, tmp_path):
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    root = tmp_path / "run"
    run_cli(
        fit_args(
            tiny_model("llama"),
            corpus,
            root,
            "--trainer.accelerator=gpu",
            "--trainer.devices=1",
            "--model.dtype=bfloat16",
            "--trainer.max_steps=8",
        ),
        ROOT,
    )
    losses = scalars(root, "train/loss")
    assert len(losses) == 8 and losses[max(losses)] < losses[min(losses)]
