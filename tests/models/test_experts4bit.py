"""QLoRA on MoE models: fused experts in 4-bit per expert slice, equal to bitsandbytes' dequantisation of each slice;
storage, 2 stages, training and resume."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils import parametrize

from lit_qlp.models.experts import IMPLEMENTATION
from lit_qlp.models.quantize import Quantization
from tests.models.test_quantize import hf_quantized, pipeline_logits, quantized_pipeline
from tests.runs import ROOT, TWO_STAGES, assert_same_losses, fit_args, run_cli, scalars
from tests.tiny_models import MOE_ARCHITECTURES, VOCAB

bnb = pytest.importorskip("bitsandbytes")
bnbf = pytest.importorskip("bitsandbytes.functional")

FORMATS = [("nf4", True), ("fp4", False)]


def bnb_roundtrip(weight: torch.Tensor, quantization: Quantization) -> torch.Tensor:
    """A 2-D weight quantised and dequantised by bitsandbytes, as a linear layer's weight is (its own block scales,
    second-level scales and offset).

    Dequantised as a flat tensor: bitsandbytes' CPU kernel (0.50) misplaces blocks in a 2-D shape whose last
    dimension is not a multiple of the blocksize (these tiny models' hidden size, 32), which its CUDA kernel does not.
    """
    packed, state = bnbf.quantize_4bit(
        weight,
        blocksize=quantization.blocksize,
        compress_statistics=quantization.double_quant,
        quant_type=quantization.quant_type,
    )
    state.shape = torch.Size((weight.numel(),))
    return bnbf.dequantize_4bit(packed, state).reshape(weight.shape)


def expert_tensors(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str]]:
    """``(module, name)`` of the fused expert tensors of an unconverted HF model: its 3-D parameters."""
    return [
        (module, name)
        for module in model.modules()
        for name, param in module.named_parameters(recurse=False)
        if param.dim() == 3
    ]


def reference_model(model_dir, quantization: Quantization, attn: str, device="cpu", dtype=torch.float32):
    """transformers + bitsandbytes (its linear layers in 4-bit) with each expert slice replaced by its bitsandbytes
    dequantisation: the independent reference of the quantised pipeline."""
    model = hf_quantized(model_dir, quantization, device=device, dtype=dtype, attn=attn)
    tensors = expert_tensors(model)
    assert tensors, "the reference has no fused experts"
    with torch.no_grad():
        for module, name in tensors:
            weight = getattr(module, name)
            weight.copy_(torch.stack([bnb_roundtrip(w, quantization) for w in weight]))
    return model


def layers_modules(layers) -> list[torch.nn.Module]:
    """Every module of the pipeline's layers."""
    return [m for layer in layers for m in layer.modules()]


def experts_modules(layers) -> list[torch.nn.Module]:
    """The modules of the pipeline's layers that hold parametrized (4-bit) expert tensors."""
    return [m for layer in layers for m in layer.modules() if parametrize.is_parametrized(m)]


@pytest.mark.parametrize("shape", [(3, 96, 32), (2, 20, 7)])
@pytest.mark.parametrize("quant_type,double_quant", FORMATS)
def test_expert_slices_dequantise_as_bitsandbytes_dequantises_each_slice(shape, quant_type, double_quant):
    from lit_qlp.models.experts4bit import quantize_expert_slices

    quantization = Quantization(quant_type, double_quant, torch.float32)
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    packed, dequantize = quantize_expert_slices(weight, quantization)
    assert packed.dtype == torch.uint8 and packed.shape[0] == shape[0]
    expected = torch.stack([bnb_roundtrip(w, quantization) for w in weight])
    torch.testing.assert_close(dequantize(packed), expected, rtol=0, atol=0)
    assert not torch.equal(expected, weight)


@pytest.mark.parametrize("arch", MOE_ARCHITECTURES)
@pytest.mark.parametrize("quant_type,double_quant", FORMATS)
def test_quantized_moe_pipeline_logits_equal_hf_with_bitsandbytes_experts(tiny_model, arch, quant_type, double_quant):
    quantization = Quantization(quant_type, double_quant, torch.float32)
    layers = quantized_pipeline(tiny_model(arch), quantization)
    attn = layers[1].config._attn_implementation
    reference = reference_model(tiny_model(arch), quantization, attn)
    ids = torch.randint(3, VOCAB, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
    logits = pipeline_logits(layers, ids)
    torch.testing.assert_close(logits, expected)
    # Experts left unquantised give other logits: the comparison above is not vacuous.
    with torch.no_grad():
        dense_experts = hf_quantized(tiny_model(arch), quantization, attn=attn)(input_ids=ids).logits
    assert not torch.allclose(logits, dense_experts)


@pytest.mark.parametrize("arch", MOE_ARCHITECTURES)
def test_4bit_experts_are_stored_packed_with_router_and_biases_in_dtype(tiny_model, arch):
    from lit_qlp.models.experts4bit import Experts4bit

    layers = quantized_pipeline(tiny_model(arch), Quantization(compute_dtype=torch.float32))
    hf = hf_quantized(tiny_model(arch), Quantization(compute_dtype=torch.float32), attn="eager")
    experts = experts_modules(layers)
    assert len(experts) == len(expert_tensors(hf)) // 2  # gate_up_proj and down_proj of every sparse layer
    for module in experts:
        # lit_qlp's grouped experts forward: each weight is read, so dequantised, once per forward.
        assert module.config._experts_implementation == IMPLEMENTATION
        assert not any(p.dim() == 3 for p in module.parameters(recurse=False))  # no dense copy left
        for name, chain in module.parametrizations.items():
            (dequantize,) = chain
            assert isinstance(dequantize, Experts4bit)
            packed = chain.original
            assert packed.dtype == torch.uint8 and not packed.requires_grad
            num_experts, rows, cols = dequantize.shape
            # Two 4-bit codes a byte, each expert padded to whole blocks of 64.
            assert packed.numel() == num_experts * -(-rows * cols // 64) * 32
            # Packed codes and block scales; the code tables (16 and 256 values) are a constant per tensor.
            statistics = [t for n, t in dequantize.named_buffers() if n not in ("code", "nested_code")]
            stored = sum(t.numel() * t.element_size() for t in (packed, *statistics))
            dense = num_experts * rows * cols * 4
            assert stored < dense / 6, f"{name}: {stored} bytes stored for {dense} in float32"
            assert getattr(module, name).shape == dequantize.shape
        for name, param in module.named_parameters(recurse=False):
            assert param.dtype == torch.float32, name  # gpt-oss's expert biases
    for module in experts:
        # The router ([experts, hidden], beside the experts in the sparse block) stays in dtype.
        num_experts, hidden = module.parametrizations.gate_up_proj[0].shape[0], layers[1].config.hidden_size
        block = next(m for m in layers_modules(layers) if any(c is module for c in m.children()))
        routers = [p for n, p in block.named_parameters() if "experts" not in n and p.shape == (num_experts, hidden)]
        assert len(routers) == 1 and routers[0].dtype == torch.float32


def test_4bit_experts_take_a_later_parametrization_on_the_dequantised_weight(tiny_model):
    layers = quantized_pipeline(tiny_model("qwen3_moe"), Quantization(compute_dtype=torch.float32))
    module = experts_modules(layers)[0]
    dequantized = module.gate_up_proj.detach().clone()

    class AddDelta(torch.nn.Module):
        """A trainable additive change of the weight (what LoRA on the experts does)."""

        def __init__(self) -> None:
            super().__init__()
            self.delta = torch.nn.Parameter(torch.zeros_like(dequantized))

        def forward(self, weight: torch.Tensor) -> torch.Tensor:
            return weight + self.delta

    parametrize.register_parametrization(module, "gate_up_proj", AddDelta())
    with torch.no_grad():
        module.parametrizations.gate_up_proj[1].delta.fill_(0.5)
    torch.testing.assert_close(module.gate_up_proj, dequantized + 0.5)
    hidden = torch.randn(5, dequantized.shape[-1])
    index = torch.tensor([[0, 1]] * 5)
    module(hidden, index, torch.full((5, 2), 0.5)).square().sum().backward()
    assert module.parametrizations.gate_up_proj[1].delta.grad.abs().sum() > 0
    assert module.parametrizations.gate_up_proj.original.grad is None


def test_4bit_experts_on_the_meta_device_have_the_shapes_of_the_loaded_ones(tiny_model):
    from lit_qlp.bases import BitsAndBytes4bit
    from lit_qlp.models.pipeline import ModelSource, StageBuilder

    source = ModelSource(tiny_model("qwen3_moe"), dtype="float32")
    meta = StageBuilder(source, torch.device("meta"), BitsAndBytes4bit()).decoder_layer(0)
    loaded = StageBuilder(source, torch.device("cpu"), BitsAndBytes4bit()).decoder_layer(0)
    shapes = {k: (v.shape, v.dtype) for k, v in loaded.state_dict().items() if "experts" in k}
    assert shapes["mlp.experts.parametrizations.gate_up_proj.original"][1] == torch.uint8
    assert {k: (v.shape, v.dtype) for k, v in meta.state_dict().items() if "experts" in k} == shapes


# The tiny MoE model starts near the uniform loss, ln(96), and needs larger steps than fit_args' to leave it in 6.
QLORA = ("--model.base=lit_qlp.bases.BitsAndBytes4bit", "--model.lr=2e-1")


@pytest.fixture(scope="module")
def moe_qlora_reference(tiny_model, corpus, tmp_path_factory):
    """A 6-step 1-stage QLoRA run of qwen3_moe, checkpointed at step 3."""
    root = tmp_path_factory.mktemp("moe-qlora-reference")
    run_cli(
        fit_args(
            tiny_model("qwen3_moe"),
            corpus,
            root,
            *QLORA,
            "--trainer.max_steps=6",
            "--checkpoint.every_n_train_steps=3",
        ),
        ROOT,
    )
    return root


@pytest.mark.slow
def test_moe_qlora_training_loss_falls_and_resumes_exactly(tiny_model, corpus, moe_qlora_reference, tmp_path):
    reference = scalars(moe_qlora_reference, "train/loss")
    assert sorted(reference) == list(range(6))
    assert reference[5] < reference[0]
    model_dir = tiny_model("qwen3_moe")
    run_cli(
        fit_args(model_dir, corpus, tmp_path, *QLORA, "--trainer.max_steps=3", "--checkpoint.every_n_train_steps=3"),
        ROOT,
    )
    (step_dir,) = (tmp_path / "checkpoints" / "last.ckpt").resolve().glob("global_step*")
    saved = torch.load(step_dir / "layer_01-model_states.pt", weights_only=False)
    assert saved and all("lora_" in k for k in saved)  # neither packed experts nor their statistics
    run_cli(fit_args(model_dir, corpus, tmp_path, *QLORA, "--trainer.max_steps=6", "--ckpt_path=last"), ROOT)
    resumed = scalars(tmp_path, "train/loss")
    assert sorted(resumed) == sorted(reference)
    for step in reference:
        assert resumed[step] == reference[step], f"step {step}: resumed {resumed[step]} != {reference[step]}"


@pytest.mark.slow
def test_moe_qlora_export_is_the_trained_expert_lora_in_peft_on_the_4bit_base(tiny_model, corpus, moe_qlora_reference):
    """The CLI's export of a QLoRA run with LoRA on 4-bit experts (all-linear): PEFT's ``target_parameters``
    adapter that loads over the reference 4-bit base with every tensor used, and lowers its loss on the training
    text as the run lowered lit_qlp's."""
    import json

    import peft
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    (export,) = [d for d in moe_qlora_reference.iterdir() if (d / "adapter_config.json").is_file()]
    config = json.loads((export / "adapter_config.json").read_text())
    assert config["target_parameters"] == ["experts.gate_up_proj", "experts.down_proj"]
    saved = load_file(export / "adapter_model.safetensors")
    experts = [k for k in saved if ".experts." in k and "lora_B" in k]
    assert experts and all(saved[k].abs().max() > 0 for k in experts)  # trained: B starts at zero

    model_dir = tiny_model("qwen3_moe")
    quantization = Quantization("nf4", True, torch.float32)
    base = reference_model(model_dir, quantization, "sdpa")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()[:8]]
    ids = torch.tensor([sum((tokenizer(text)["input_ids"] for text in texts), [])[:64]])
    with torch.no_grad():
        base_loss = base(input_ids=ids, labels=ids).loss
    adapted = peft.PeftModel.from_pretrained(base, export).eval()
    loaded = {k for k, _ in adapted.named_parameters() if "lora_" in k}
    assert len(loaded) == len(saved)  # every saved pair has its place in PEFT's model, none is left at its init
    with torch.no_grad():
        trained_loss = adapted(input_ids=ids, labels=ids).loss
    run = scalars(moe_qlora_reference, "train/loss")
    # The adapter lowers PEFT's loss as the six steps lowered the run's (on other batches: at least half as much).
    assert base_loss - trained_loss > 0.5 * (run[0] - run[5]) > 0, (float(trained_loss), float(base_loss), run)


@pytest.mark.slow
def test_moe_qlora_across_two_stages_gives_the_same_losses(tiny_model, corpus, moe_qlora_reference, tmp_path):
    run_cli(fit_args(tiny_model("qwen3_moe"), corpus, tmp_path, *QLORA, *TWO_STAGES), ROOT)
    assert_same_losses(tmp_path, scalars(moe_qlora_reference, "train/loss"), 4)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_4bit_experts_run_grouped_on_gpu_in_bf16_and_equal_the_eager_reference(tiny_model, arch, monkeypatch):
    quantization = Quantization("nf4", True, torch.bfloat16)
    layers = quantized_pipeline(tiny_model(arch), quantization, device="cuda", dtype="bfloat16")
    assert all(m.config._experts_implementation == IMPLEMENTATION for m in experts_modules(layers))
    # The same quantised weights multiplied by transformers' per-expert loop.
    attn = layers[1].config._attn_implementation
    reference = reference_model(tiny_model(arch), quantization, attn, device="cuda", dtype=torch.bfloat16)
    reference.set_experts_implementation("eager")
    grouped_calls = []
    grouped_mm = torch.nn.functional.grouped_mm

    def counted(*args, **kwargs):
        grouped_calls.append(args[1].shape)
        return grouped_mm(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "grouped_mm", counted)
    ids = torch.randint(3, VOCAB, (1, 24), generator=torch.Generator().manual_seed(1)).cuda()
    logits = pipeline_logits(layers, ids).float()
    assert len(grouped_calls) == 2 * len(experts_modules(layers))  # torch's grouped kernel, no fallback loop
    with torch.no_grad():
        expected = reference(input_ids=ids).logits.float()
    torch.testing.assert_close(logits, expected, rtol=1.6e-2, atol=1e-2)
