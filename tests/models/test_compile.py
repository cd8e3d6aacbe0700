"""``compile_layers``: decoder layers under ``torch.compile`` compute what the eager layers compute."""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from lit_qlp.adapters.lora import LoraAdapter, LoraLinear
from lit_qlp.bases import BitsAndBytes4bit
from lit_qlp.models.pipeline import DecoderLayerPipe, ModelSource, StageBuilder
from lit_qlp.models.quantize import Quantization
from tests.runs import ROOT, fit_args, run_cli, scalars

SEQ = 12


def decoder_layers(model_dir, compile: bool, quantization=None, device="cpu", dtype="float32", dropout=0.0):
    """Decoder layers 0 and 1 with LoRA on every linear layer; B is random so that every gradient is non-zero."""
    base = None if quantization is None else BitsAndBytes4bit(quantization.quant_type, quantization.double_quant)
    builder = StageBuilder(ModelSource(model_dir, dtype=dtype), torch.device(device), base)
    adapter = LoraAdapter(4, 8, dropout, "all-linear", [0, 1], torch.float32, seed=0, compute_in_input_dtype=True)
    layers = [DecoderLayerPipe(builder, i, adapter, compile=compile) for i in range(2)]
    generator = torch.Generator().manual_seed(1)
    for layer in layers:
        for module in layer.modules():
            if isinstance(module, LoraLinear):
                weight = module.lora_B.weight
                weight.data.copy_(torch.randn(weight.shape, generator=generator) * 0.1)
    return layers


def checkpointed_step(layers, hidden_size: int, device="cpu", dtype=torch.float32, checkpointed=True):
    """Output, input gradient and LoRA gradients of the layers run as the pipeline runs them (checkpointed, unless
    ``checkpointed`` is false)."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, SEQ, hidden_size, generator=generator).to(device, dtype).requires_grad_()
    positions = torch.arange(SEQ, device=device).unsqueeze(0)
    x = (hidden, positions, torch.zeros(1, SEQ, dtype=torch.long, device=device))
    for layer in layers:
        x = checkpoint(layer, x, use_reentrant=False) if checkpointed else layer(x)
    x[0].float().square().mean().backward()
    grads = [p.grad for layer in layers for p in layer.parameters() if p.requires_grad]
    return [x[0].detach(), hidden.grad, *grads]


def assert_compiled_equals_eager(model_dir, quantization=None, device="cpu", dtype="float32", tolerance=1e-4):
    torch._dynamo.reset()
    hidden_size = ModelSource(model_dir).config.hidden_size
    torch_dtype = getattr(torch, dtype)
    eager = checkpointed_step(
        decoder_layers(model_dir, False, quantization, device, dtype), hidden_size, device, torch_dtype
    )
    compiled_layers = decoder_layers(model_dir, True, quantization, device, dtype)
    compiled = checkpointed_step(compiled_layers, hidden_size, device, torch_dtype)
    assert len(compiled) == len(eager) > 2 + 2 * 7
    for a, b in zip(compiled, eager):
        assert b.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance)
    return compiled_layers


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma2", "mistral", "qwen3_moe"])
def test_compiled_decoder_layers_match_eager_outputs_and_gradients(tiny_model, arch):
    assert_compiled_equals_eager(tiny_model(arch))


def test_compiled_4bit_decoder_layers_match_eager(tiny_model, monkeypatch):
    pytest.importorskip("bitsandbytes")
    from lit_qlp.models import linear4bit

    # The tiny model's rows (32, 48 weights) are shorter than a block, where bitsandbytes' CPU kernel misplaces
    # the block scales (tests/test_linear4bit.py): the eager side dequantises with the same torch formula here,
    # which tests/test_linear4bit.py shows equal to bitsandbytes' kernels wherever those are right.
    monkeypatch.setattr(linear4bit.bnbf, "dequantize_4bit", linear4bit.dequantize_4bit_torch)
    assert_compiled_equals_eager(tiny_model("llama"), Quantization(compute_dtype=torch.float32))


def test_every_decoder_layer_shares_the_compiled_code(tiny_model):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model_dir = tiny_model("llama")
    layers = decoder_layers(model_dir, True)
    hidden_size = ModelSource(model_dir).config.hidden_size
    checkpointed_step(layers[:1], hidden_size)
    after_one = counters["stats"]["unique_graphs"]
    checkpointed_step(layers, hidden_size)
    assert after_one > 0
    assert counters["stats"]["unique_graphs"] == after_one  # the second layer compiled nothing new


def test_compiled_lora_dropout_is_replayed_by_the_checkpoint_recomputation(tiny_model):
    """Checkpointed, the backward recomputes the layer: its dropout masks must be the forward's. With the same seed,
    the checkpointed gradient equals the gradient of a plain forward exactly when they are."""

    model_dir = tiny_model("llama")
    hidden_size = ModelSource(model_dir).config.hidden_size

    def input_gradient(checkpointed: bool, seed: int = 123):
        torch._dynamo.reset()
        layers = decoder_layers(model_dir, True, dropout=0.5)
        torch.manual_seed(seed)
        return checkpointed_step(layers, hidden_size, checkpointed=checkpointed)[1]

    plain = input_gradient(checkpointed=False)
    torch.testing.assert_close(input_gradient(checkpointed=True), plain, rtol=0, atol=0)
    assert not torch.equal(input_gradient(checkpointed=False, seed=7), plain)  # dropout is active


@pytest.mark.slow
def test_compiled_training_run_gives_the_eager_losses(tiny_model, corpus, tmp_path):
    model_dir = tiny_model("llama")
    common = ("--trainer.max_steps=3", "--model.method.compute_in_weight_dtype=false")
    run_cli(fit_args(model_dir, corpus, tmp_path / "eager", *common), ROOT)
    run_cli(fit_args(model_dir, corpus, tmp_path / "compiled", *common, "--model.compile_layers=true"), ROOT)
    eager, compiled = scalars(tmp_path / "eager", "train/loss"), scalars(tmp_path / "compiled", "train/loss")
    assert sorted(compiled) == sorted(eager) == [0, 1, 2]
    for step in eager:
        assert compiled[step] == pytest.approx(eager[step], rel=1e-4), step
    evaluations = scalars(tmp_path / "compiled", "eval/loss")  # evaluation (no grad) runs compiled too
    assert evaluations[0] == pytest.approx(scalars(tmp_path / "eager", "eval/loss")[0], rel=1e-4)
    # Compiled layers inside lit-qlp's own (offloading) checkpoint, as configs/qlora.yaml runs them.
    offload = ("--model.compile_layers=true", "--trainer.strategy.activation_offload=true")
    run_cli(fit_args(model_dir, corpus, tmp_path / "offload", *common, *offload), ROOT)
    offloaded = scalars(tmp_path / "offload", "train/loss")
    for step in eager:
        assert offloaded[step] == pytest.approx(eager[step], rel=1e-4), step


@pytest.mark.gpu
def test_compiled_4bit_decoder_layers_match_eager_on_cuda(tiny_model):
    pytest.importorskip("bitsandbytes")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    quantization = Quantization(compute_dtype=torch.bfloat16)
    assert_compiled_equals_eager(tiny_model("llama"), quantization, "cuda", "bfloat16", tolerance=3e-2)
    assert_compiled_equals_eager(tiny_model("llama"), None, "cuda", "bfloat16", tolerance=3e-2)
    # 4-bit experts with LoRA on them: grouped matmuls and the routing inside the compiled graph.
    assert_compiled_equals_eager(tiny_model("qwen3_moe"), quantization, "cuda", "bfloat16", tolerance=3e-2)
