"""Full fine-tuning: what trains, tied embeddings across pipeline stages, and the Hugging Face export."""

from __future__ import annotations

import pytest
import torch

from lit_qlp.bases import BitsAndBytes4bit
from lit_qlp.methods import FullFineTuning, LoRA
from lit_qlp.methods.full import full_trainable_parameters
from lit_qlp.models.pipeline import ModelSource
from lit_qlp.module import CausalLMModule
from tests.runs import ROOT, fit_args, run_cli, scalars
from tests.tiny_models import VOCAB


def trainable(model_dir, target_modules=None, layers=range(4)):
    source = ModelSource(model_dir, dtype="float32")
    return full_trainable_parameters(source.skeleton, target_modules, list(layers))


def test_full_fine_tuning_trains_everything_by_default(tiny_model):
    names = trainable(tiny_model("llama"))
    source = ModelSource(tiny_model("llama"), dtype="float32")
    assert names == {n for n, _ in source.skeleton.named_parameters()}


def test_target_modules_and_layers_restrict_full_fine_tuning(tiny_model):
    model_dir = tiny_model("llama")
    linear = trainable(model_dir, "all-linear", [1, 2])
    assert linear and all(n.startswith(("model.layers.1.", "model.layers.2.")) for n in linear)
    assert "model.layers.1.self_attn.q_proj.weight" in linear
    assert not any("norm" in n for n in linear)
    attention = trainable(model_dir, ["self_attn", "lm_head"])
    assert "lm_head.weight" in attention and "model.layers.3.self_attn.o_proj.weight" in attention
    assert not any(".mlp." in n or "embed" in n or "layernorm" in n for n in attention)
    norm = trainable(model_dir, ["norm"])
    assert norm == {"model.norm.weight"}  # "norm" is the final norm, not input_layernorm


def test_tied_embeddings_train_together(tiny_model):
    names = trainable(tiny_model("qwen2"), ["lm_head"])
    assert {"lm_head.weight", "model.embed_tokens.weight"} <= names


def test_full_fine_tuning_bad_input_is_named(tiny_model):
    model_dir = tiny_model("llama")
    with pytest.raises(ValueError, match=r"model.method.target_modules entries \['qproj'\] match no module.*q_proj"):
        CausalLMModule(model_dir, method=FullFineTuning(target_modules=["qproj"]))
    with pytest.raises(ValueError, match=r"model.embeddings_on_cpu .*FullFineTuning trains them"):
        CausalLMModule(model_dir, method=FullFineTuning(), embeddings_on_cpu=True)
    with pytest.raises(ValueError, match="match no linear layer"):
        CausalLMModule(model_dir, method=LoRA(target_modules=["embed_tokens"]))
    with pytest.raises(ValueError, match=r"FullFineTuning trains the weights themselves.*remove model.base"):
        CausalLMModule(model_dir, method=FullFineTuning(), base=BitsAndBytes4bit())
    # Frozen embeddings may stay on the CPU while the decoder layers train.
    CausalLMModule(model_dir, method=FullFineTuning(target_modules="all-linear"), embeddings_on_cpu=True)


FULL = ("--model.method=lit_qlp.methods.FullFineTuning", "--model.method.target_modules=null", "--model.lr=1e-3")


@pytest.mark.slow
def test_tied_full_fine_tuning_across_two_stages(tiny_model, corpus, tmp_path):
    """Two stages keep one embedding matrix: same losses as one stage, equal copies, and an HF export that loads.

    The demo config clips gradients at 1.0, which is active here: equal losses also show that the clipping norm is
    the whole model's, with the tied matrix counted once.
    """
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from tests.tiny_models import stage_layers

    model_dir = tiny_model("llama_tied")
    one = tmp_path / "one-stage"
    run_cli(fit_args(model_dir, corpus, one, *FULL, "--trainer.max_steps=4"), ROOT)
    two = tmp_path / "two-stages"
    run_cli(
        fit_args(model_dir, corpus, two, *FULL, "--trainer.max_epochs=1", "--checkpoint.every_n_train_steps=0")
        + ["--trainer.devices=2", "--trainer.strategy.pipeline_stages=2"]
        + ["--trainer.callbacks+=tests.recording.RecordTiedWeights"],
        ROOT,
    )
    reference, losses = scalars(one, "train/loss"), scalars(two, "train/loss")
    assert len(reference) == 4 and len(losses) > 4
    for step in reference:
        torch.testing.assert_close(losses[step], reference[step], msg=lambda m: f"step {step}: {m}")
    assert losses[max(losses)] < losses[0]

    # The embedding on stage 0 and the head on stage 1 are still one matrix, and it trained.
    first, last = torch.load(two / "tied.rank0.pt"), torch.load(two / "tied.rank1.pt")
    assert torch.equal(first, last)
    initial = load_file(model_dir / "model.safetensors")["model.embed_tokens.weight"]
    assert not torch.allclose(first, initial)

    export = two / "epoch1"
    assert (export / "config.json").is_file() and (export / "tokenizer.json").is_file()
    assert (export / "model.safetensors.index.json").is_file()  # one shard per stage
    hf = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32, attn_implementation="sdpa").eval()
    torch.testing.assert_close(hf.model.embed_tokens.weight.detach(), first)
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()

    # tools/convert_ds_checkpoint.py on the final checkpoint gives the export's tensors, bit for bit.
    from lit_qlp.export.checkpoint import convert_ds_checkpoint

    convert_ds_checkpoint(two / "checkpoints" / "last.ckpt", two / "config.yaml", tmp_path / "converted")
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "converted", dtype=torch.float32).state_dict()
    for name, tensor in hf.state_dict().items():
        assert torch.equal(converted[name], tensor), name

    # The trained pipeline: the engine's own checkpoint files (not the export) loaded into the pipeline layers.
    source = ModelSource(model_dir, dtype="float32")
    layers = stage_layers(source)
    (step_dir,) = (two / "checkpoints" / "last.ckpt").resolve().glob("global_step*")
    for index, layer in enumerate(layers):
        state = torch.load(step_dir / f"layer_{index:02d}-model_states.pt", weights_only=False)
        missing, unexpected = layer.load_state_dict(state, strict=False)
        assert not unexpected and all(k.startswith("lm_head") for k in missing), (index, missing)
    ids = torch.randint(3, VOCAB, (1, 20), generator=torch.Generator().manual_seed(2))
    x = (ids, torch.arange(20).unsqueeze(0), torch.zeros_like(ids))
    with torch.no_grad():
        for layer in layers:
            x = layer(x)
        logits = x @ layers[0].embed_tokens.weight.T
        reference_logits = hf(input_ids=ids).logits
    torch.testing.assert_close(logits, reference_logits)


@pytest.mark.slow
def test_untied_full_fine_tuning_of_selected_modules_exports_a_loadable_model(tiny_model, corpus, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model_dir = tiny_model("llama")
    run_cli(
        fit_args(model_dir, corpus, tmp_path, "--model.method=lit_qlp.methods.FullFineTuning", "--model.lr=1e-3")
        + [
            "--trainer.max_epochs=1",
            "--model.method.target_modules=[mlp]",
            "--model.method.layers_to_transform=1:2",
            "--checkpoint.every_n_train_steps=0",
        ],
        ROOT,
    )
    initial = load_file(model_dir / "model.safetensors")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "epoch1", dtype=torch.float32)
    trained = hf.state_dict()
    changed = {n for n, t in initial.items() if not torch.equal(trained[n], t)}
    assert changed == {f"model.layers.{i}.mlp.{p}_proj.weight" for i in (1, 2) for p in ("gate", "up", "down")}
    assert (tmp_path / "epoch1" / "model.safetensors").is_file()  # one stage, one shard: no index
