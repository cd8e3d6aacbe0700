"""Tied embeddings held once: a stage that holds the embedding and the head keeps one matrix (frozen under adapter
methods, trained under full fine-tuning), with the Hugging Face model's loss and gradients; runs, resumes and exports
still work. Two stages keep equal copies (tests/methods/test_full.py)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lit_qlp.methods import FullFineTuning, LoRA
from lit_qlp.module import CausalLMModule
from tests.runs import ROOT, fit_args, run_cli, scalars
from tests.tiny_models import COMMON, VOCAB, load_hf, make_tiny_tokenizer

TIED = ("llama_tied", "qwen2", "gemma2", "cohere")
MATRIX = COMMON["vocab_size"] * COMMON["hidden_size"]


def held(module: nn.Module) -> tuple[int, int]:
    """Parameters of ``module`` and the bytes of the distinct tensors holding them (a shared tensor counts once)."""
    parameters = list(module.parameters())
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in parameters}
    return sum(p.numel() for p in parameters), sum(storages.values())


def one_stage(module: CausalLMModule) -> nn.ModuleList:
    """The layers of a one-stage pipeline, built in this process as DeepSpeed builds them."""
    from deepspeed.pipe import TiedLayerSpec

    spec = module.pipeline_spec(torch.device("cpu"), pipeline_stages=1)
    assert not any(isinstance(layer, TiedLayerSpec) for layer in spec.layers)  # no tied copies on one stage
    return nn.ModuleList([layer.build() for layer in spec.layers])


@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.parametrize("arch", TIED)
def test_one_stage_holds_one_embedding_matrix_with_the_hf_loss(tiny_model, arch, method):
    model_dir = tiny_model(arch)
    trains = LoRA(rank=4) if method == "lora" else FullFineTuning()
    module = CausalLMModule(model_dir, method=trains, dtype="float32")
    layers = one_stage(module)
    hf = load_hf(model_dir, module.source.attn_implementation)
    assert hf.config.tie_word_embeddings and hf.lm_head.weight is hf.model.embed_tokens.weight

    # One matrix: the head's weight is the embedding's, and the stage holds what the HF model holds (plus LoRA).
    embedding = layers[0].embed_tokens.weight
    assert module.loss_fn.head_weight() is embedding and embedding.requires_grad == (method == "full")
    lora = [p for name, p in layers.named_parameters() if "lora_" in name]
    assert bool(lora) == (method == "lora")
    lora_count, lora_bytes = sum(p.numel() for p in lora), sum(p.nbytes for p in lora)
    hf_count, hf_bytes = held(hf)
    assert hf_count == hf.num_parameters()
    assert held(layers) == (hf_count + lora_count, hf_bytes + lora_bytes)
    assert hf_count > 2 * MATRIX  # the matrix twice would show

    # The Hugging Face model's loss, and (trained) the gradient of the one matrix from its two uses.
    ids = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    labels = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)
    x = (ids, torch.arange(24).expand(2, 24), torch.zeros_like(ids))
    for layer in layers:
        x = layer(x)
    loss = module.loss_fn(x, labels)
    logits = hf(input_ids=ids).logits
    reference = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1), reduction="sum")
    torch.testing.assert_close(loss, reference)
    if method == "full":
        loss.backward()
        reference.backward()
        torch.testing.assert_close(embedding.grad, hf.model.embed_tokens.weight.grad)


def untied_copy(tiny_model, directory):
    """``llama_tied`` saved with a separate head holding the same values (``tie_word_embeddings: false``)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    tied = load_hf(tiny_model("llama_tied"), "sdpa")
    config = LlamaConfig(**{**tied.config.to_dict(), "tie_word_embeddings": False})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {name: tensor.clone() for name, tensor in tied.state_dict().items()}
    state["lm_head.weight"] = tied.model.embed_tokens.weight.detach().clone()
    model.load_state_dict(state)
    model.save_pretrained(directory)
    make_tiny_tokenizer(directory)
    return directory


RECORD = "--trainer.callbacks+=tests.recording.RecordStageParameters"


@pytest.mark.slow
def test_tied_lora_run_holds_one_matrix_and_trains_as_the_untied_model(tiny_model, corpus, tmp_path):
    """A LoRA run (frozen embeddings) on one stage: the engine's stage holds the matrix once, and the losses are
    those of the same weights with a separate head, which lit-qlp holds as two matrices."""
    tied, untied = tmp_path / "tied", tmp_path / "untied"
    run_cli(fit_args(tiny_model("llama_tied"), corpus, tied, "--trainer.max_steps=4", RECORD), ROOT)
    run_cli(
        fit_args(untied_copy(tiny_model, tmp_path / "model"), corpus, untied, "--trainer.max_steps=4", RECORD), ROOT
    )
    reference, losses = scalars(untied, "train/loss"), scalars(tied, "train/loss")
    assert sorted(losses) == sorted(reference) == [0, 1, 2, 3]
    for step in reference:
        torch.testing.assert_close(losses[step], reference[step], msg=lambda m: f"step {step}: {m}")
    one, two = (json.loads((root / "parameters.rank0.json").read_text()) for root in (tied, untied))
    assert (one["parameters"], one["bytes"]) == (two["parameters"] - MATRIX, two["bytes"] - 4 * MATRIX)


FULL = ("--model.method=lit_qlp.methods.FullFineTuning", "--model.method.target_modules=null", "--model.lr=1e-3")


@pytest.mark.slow
def test_tied_full_fine_tuning_on_one_stage_resumes_and_exports(tiny_model, corpus, tmp_path):
    """Full fine-tuning of a tied model on one stage (one trained matrix): a run resumed from its step-2 checkpoint
    gives the uninterrupted run's losses, and the checkpoint converts to the export, bit for bit."""
    from transformers import AutoModelForCausalLM

    from lit_qlp.export.checkpoint import convert_ds_checkpoint

    model_dir = tiny_model("llama_tied")
    reference = tmp_path / "reference"
    run_cli(fit_args(model_dir, corpus, reference, *FULL, "--trainer.max_steps=4", RECORD), ROOT)
    resumed = tmp_path / "resumed"
    run_cli(
        fit_args(model_dir, corpus, resumed, *FULL, "--trainer.max_steps=2", "--checkpoint.every_n_train_steps=2"), ROOT
    )
    run_cli(fit_args(model_dir, corpus, resumed, *FULL, "--trainer.max_steps=4", "--ckpt_path=last"), ROOT)
    expected, losses = scalars(reference, "train/loss"), scalars(resumed, "train/loss")
    assert sorted(losses) == sorted(expected) == [0, 1, 2, 3]
    for step in expected:
        assert losses[step] == expected[step], step
    record = json.loads((reference / "parameters.rank0.json").read_text())
    assert record["parameters"] == load_hf(model_dir, "sdpa").num_parameters()
    assert record["tied_modules"] == []  # DeepSpeed's tied layers only where two stages hold the matrix

    export = resumed / "step4"
    hf = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    initial = load_hf(model_dir, "sdpa").model.embed_tokens.weight
    assert not torch.allclose(hf.model.embed_tokens.weight, initial)  # the matrix trained
    convert_ds_checkpoint(resumed / "checkpoints" / "last.ckpt", resumed / "config.yaml", tmp_path / "converted")
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "converted", dtype=torch.float32).state_dict()
    for name, tensor in hf.state_dict().items():
        assert torch.equal(converted[name], tensor), name
