"""GPU checks (run on the GPU machine: ``pytest -m gpu``)."""

from __future__ import annotations

import pytest
import torch

from lit_qlp.models.pipeline import DecoderLayerPipe, ModelSource, StageBuilder
from tests.runs import ROOT, fit_args, run_cli, scalars, write_corpus
from tests.tiny_models import VOCAB, stage_layers

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("arch", ["llama", "gemma2", "mixtral"])
def test_bf16_pipeline_logits_match_hf_on_gpu(tiny_model, arch):
    from transformers import AutoModelForCausalLM

    model_dir = tiny_model(arch)
    source = ModelSource(model_dir, dtype="bfloat16")
    layers = stage_layers(source, device="cuda")
    hf = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.bfloat16, attn_implementation=source.attn_implementation
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


def test_qlora_training_with_offloaded_activations_on_gpu_through_the_cli(tiny_model, tmp_path):
    """QLoRA on CUDA: the offloaded checkpointing gives the losses of the plain one; the loss falls."""
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    losses = {}
    for offload in ("false", "true"):
        root = tmp_path / f"offload-{offload}"
        run_cli(
            fit_args(tiny_model("llama"), corpus, root, "--trainer.accelerator=gpu", "--trainer.devices=1")
            + ["--model.dtype=bfloat16", "--model.base=lit_qlp.bases.BitsAndBytes4bit", "--trainer.max_steps=6"]
            + [f"--trainer.strategy.activation_offload={offload}", f"--model.embeddings_on_cpu={offload}"],
            ROOT,
        )
        losses[offload] = scalars(root, "train/loss")
    assert len(losses["true"]) == 6 and losses["true"][5] < losses["true"][0]
    for step, loss in losses["false"].items():
        torch.testing.assert_close(losses["true"][step], loss, msg=lambda m: f"step {step}: {m}")


def test_offloaded_checkpoint_gradients_on_gpu(tiny_model):
    from lit_qlp.adapters.lora import LoraAdapter
    from lit_qlp.strategies.offload import offloaded_checkpoint

    builder = StageBuilder(ModelSource(tiny_model("llama"), dtype="bfloat16"), torch.device("cuda"))
    adapter = LoraAdapter(4, 4, 0.1, "all-linear", [0], torch.float32, seed=0)
    layer = DecoderLayerPipe(builder, 0, adapter)
    for p in layer.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    hidden = torch.randn(1, 64, 32, device="cuda", dtype=torch.bfloat16)
    inputs = (hidden, torch.arange(64, device="cuda").unsqueeze(0), torch.zeros(1, 64, dtype=torch.long, device="cuda"))
    grads = []
    for checkpoint in (
        lambda f, *a: torch.utils.checkpoint.checkpoint(f, *a, use_reentrant=False),
        offloaded_checkpoint,
    ):
        layer.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        out = checkpoint(lambda *x: layer(x), *inputs)  # as PipelineModule calls it: the tuple unpacked
        out[0].float().square().sum().backward()
        grads.append([p.grad.clone() for p in layer.parameters() if p.requires_grad])
    for plain, offloaded in zip(*grads):
        torch.testing.assert_close(offloaded, plain)
