"""QLoRA: 4-bit frozen base layers equal to transformers + bitsandbytes; training, resume and bad input."""

from __future__ import annotations

import pytest
import torch

from lit_qlp.bases import BitsAndBytes4bit
from lit_qlp.kernels import TokenWeightedLoss
from lit_qlp.models.pipeline import DecoderLayerPipe, EmbeddingPipe, ModelSource, StageBuilder
from lit_qlp.models.quantize import Quantization, check_bitsandbytes
from tests.runs import ROOT, TWO_STAGES, assert_same_losses, fit_args, run_cli, scalars
from tests.tiny_models import VOCAB, stage_layers

bnb = pytest.importorskip("bitsandbytes")


def quantized_pipeline(model_dir, quantization, device="cpu", dtype="float32"):
    source = ModelSource(model_dir, dtype=dtype)
    base = None if quantization is None else BitsAndBytes4bit(quantization.quant_type, quantization.double_quant)
    return stage_layers(source, base=base, loss=TokenWeightedLoss(), device=device)


def pipeline_logits(layers, ids):
    x = (ids, torch.arange(ids.shape[1], device=ids.device).unsqueeze(0), torch.zeros_like(ids))
    with torch.no_grad():
        for layer in layers:
            x = layer(x)
        return layers[-1].logits(x)


def hf_quantized(model_dir, quantization, device="cpu", dtype=torch.float32, attn="sdpa"):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization.quant_type,
        bnb_4bit_use_double_quant=quantization.double_quant,
        bnb_4bit_compute_dtype=quantization.compute_dtype,
    )
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=config, dtype=dtype, device_map=device, attn_implementation=attn
    )
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            # bitsandbytes' CPU repacking (AVX512-BF16 machines) fails on these tiny shapes; keep the portable path.
            module.support_avx512bf16_for_cpu = False
    return model.eval()


# MoE models: transformers + bitsandbytes leaves fused experts unquantised, lit-qlp does not (test_experts4bit.py).
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2", "phi3"])
@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False)])
def test_quantized_pipeline_logits_equal_transformers_bitsandbytes(tiny_model, arch, quant_type, double_quant):
    quantization = Quantization(quant_type, double_quant, torch.float32)
    layers = quantized_pipeline(tiny_model(arch), quantization)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in layers[1].modules())
    hf = hf_quantized(tiny_model(arch), quantization, attn=layers[1].config._attn_implementation)
    ids = torch.randint(3, VOCAB, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = hf(input_ids=ids).logits
    torch.testing.assert_close(pipeline_logits(layers, ids), reference)
    # The quantised base differs from the unquantised model: the comparison above is not vacuous.
    full = quantized_pipeline(tiny_model(arch), None)
    assert not torch.allclose(pipeline_logits(full, ids), reference)


def test_lora_on_4bit_layers_gets_gradients_and_the_base_stays_frozen(tiny_model):
    from lit_qlp.adapters.lora import LoraAdapter, LoraLinear

    builder = StageBuilder(ModelSource(tiny_model("llama"), dtype="float32"), torch.device("cpu"), BitsAndBytes4bit())
    adapter = LoraAdapter(4, 4, 0.0, "all-linear", [0], torch.float32, seed=0)
    layer = DecoderLayerPipe(builder, 0, adapter)
    loras = [m for m in layer.modules() if isinstance(m, LoraLinear)]
    assert loras and all(isinstance(m.base_layer, bnb.nn.Linear4bit) for m in loras)
    for m in loras:
        torch.nn.init.normal_(m.lora_B.weight)  # so that gradients reach A as well
    hidden = torch.randn(1, 12, 32, requires_grad=True)
    ids = torch.zeros(1, 12, dtype=torch.long)
    layer.eval()
    with torch.no_grad():  # the eval-mode no-grad forward after which bitsandbytes could repack CPU weights
        layer((hidden, torch.arange(12).unsqueeze(0), ids))
    layer.train()
    out = layer((hidden, torch.arange(12).unsqueeze(0), ids))[0]
    out.square().sum().backward()
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0
    assert all(m.lora_A.weight.grad.abs().sum() > 0 and m.lora_B.weight.grad.abs().sum() > 0 for m in loras)
    assert not any(p.requires_grad for m in loras for p in m.base_layer.parameters())


QLORA = ("--model.base=lit_qlp.bases.BitsAndBytes4bit",)


@pytest.fixture(scope="module")
def qlora_reference(tiny_model, corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("qlora-reference")
    run_cli(
        fit_args(
            tiny_model("llama"), corpus, root, *QLORA, "--trainer.max_steps=6", "--checkpoint.every_n_train_steps=3"
        ),
        ROOT,
    )
    return root


@pytest.mark.slow
def test_qlora_training_loss_falls(qlora_reference):
    losses = scalars(qlora_reference, "train/loss")
    assert sorted(losses) == list(range(6))
    assert losses[5] < losses[0]
    assert (qlora_reference / "step6" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_qlora_resumes_exactly(tiny_model, corpus, qlora_reference, tmp_path):
    model_dir = tiny_model("llama")
    run_cli(
        fit_args(model_dir, corpus, tmp_path, *QLORA, "--trainer.max_steps=3", "--checkpoint.every_n_train_steps=3"),
        ROOT,
    )
    (step_dir,) = (tmp_path / "checkpoints" / "last.ckpt").resolve().glob("global_step*")
    saved = torch.load(step_dir / "layer_01-model_states.pt", weights_only=False)
    assert saved and all("lora_" in k for k in saved)  # neither 4-bit weights nor their statistics
    run_cli(fit_args(model_dir, corpus, tmp_path, *QLORA, "--trainer.max_steps=6", "--ckpt_path=last"), ROOT)
    reference = scalars(qlora_reference, "train/loss")
    resumed = scalars(tmp_path, "train/loss")
    assert sorted(resumed) == sorted(reference)
    for step in reference:
        assert resumed[step] == reference[step], f"step {step}: resumed {resumed[step]} != {reference[step]}"


@pytest.mark.slow
def test_qlora_across_two_stages_gives_the_same_losses(tiny_model, corpus, qlora_reference, tmp_path):
    run_cli(fit_args(tiny_model("llama"), corpus, tmp_path, *QLORA, *TWO_STAGES), ROOT)
    assert_same_losses(tmp_path, scalars(qlora_reference, "train/loss"), 4)


def test_embeddings_on_cpu_give_the_same_hidden_states_and_are_not_module_parameters(tiny_model):
    builder = StageBuilder(ModelSource(tiny_model("llama"), dtype="float32"), torch.device("cpu"))
    on_device, on_cpu = EmbeddingPipe(builder), EmbeddingPipe(builder, on_cpu=True)
    assert list(on_cpu.parameters()) == []  # the engine's .to(device) cannot move it
    ids = torch.randint(3, VOCAB, (2, 9))
    x = (ids, torch.arange(9).unsqueeze(0), torch.zeros_like(ids))
    torch.testing.assert_close(on_cpu(x)[0], on_device(x)[0])


def test_check_bitsandbytes_names_the_option_and_the_fix(monkeypatch):
    check_bitsandbytes(torch.device("cpu"))  # works on this machine

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel image")

    monkeypatch.setattr(bnb.functional, "quantize_4bit", broken)
    with pytest.raises(
        RuntimeError,
        match=r"model.base BitsAndBytes4bit: bitsandbytes .* cannot run 4-bit matmuls on cpu.*remove model.base",
    ):
        check_bitsandbytes(torch.device("cpu"))


def test_qlora_without_bitsandbytes_is_a_clear_error(tiny_model, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_bitsandbytes(name, *args, **kwargs):
        if name == "bitsandbytes" or name.startswith("bitsandbytes."):
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bitsandbytes)
    with pytest.raises(RuntimeError, match=r"model.base BitsAndBytes4bit needs bitsandbytes.*pip install bitsandbytes"):
        BitsAndBytes4bit()


@pytest.mark.gpu
def test_quantized_pipeline_logits_equal_transformers_bitsandbytes_on_gpu(tiny_model):
    quantization = Quantization("nf4", True, torch.bfloat16)
    layers = quantized_pipeline(tiny_model("llama"), quantization, device="cuda", dtype="bfloat16")
    hf = hf_quantized(tiny_model("llama"), quantization, device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(3, VOCAB, (1, 24), generator=torch.Generator().manual_seed(1)).cuda()
    with torch.no_grad():
        reference = hf(input_ids=ids).logits
    torch.testing.assert_close(pipeline_logits(layers, ids).float(), reference.float(), rtol=1.6e-2, atol=1e-2)
