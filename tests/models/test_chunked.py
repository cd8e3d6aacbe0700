"""``model.long_context`` (lit_qlp/models/chunked.py, stash.py): an MLP run in chunks of tokens gives the whole MLP's
outputs and gradients, under both activation checkpoints, and the offloaded one skips the MLP and the attention
kernel in its recomputation."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from lit_qlp.adapters.lora import LoraAdapter, LoraLinear
from lit_qlp.models.chunked import ChunkedMLP, chunk_mlp
from lit_qlp.models.pipeline import DecoderLayerPipe, ModelSource, StageBuilder, sdpa_priority
from lit_qlp.strategies.offload import offloaded_checkpoint
from tests.models.test_pipeline import AttentionKernels
from tests.runs import ROOT, fit_args, run_cli, scalars

SEQ = 13
CHUNK = 5  # chunks of 5, 5 and 3 tokens


def decoder_layers(
    model_dir,
    chunk: int | None,
    method: str = "lora",
    dropout: float = 0.0,
    compile: bool = False,
    device: str = "cpu",
    dtype: str = "float32",
):
    """Decoder layers 0 and 1: LoRA on every linear layer and expert tensor (B random, so that every gradient is
    non-zero), or every weight trained (``method="full"``); with ``chunk`` as ``model.long_context`` builds them
    (chunked MLP, attention kernels kept by the offloaded checkpoint)."""
    source = ModelSource(model_dir, dtype=dtype, keep_attention=chunk is not None)
    trainable = frozenset()
    adapter = None
    if method == "full":
        trainable = frozenset(n for n, _ in source.skeleton.named_parameters() if n.startswith("model.layers."))
    else:
        adapter = LoraAdapter(4, 8, dropout, "all-linear", [0, 1], torch.float32, seed=0, expert_rank=2)
    builder = StageBuilder(source, torch.device(device), None, trainable)
    layers = [DecoderLayerPipe(builder, i, adapter, compile=compile, mlp_chunk_tokens=chunk) for i in range(2)]
    generator = torch.Generator().manual_seed(1)
    for layer in layers:
        for name, param in layer.named_parameters():
            if param.requires_grad and ("lora_B" in name or "lora_b" in name.lower()):
                param.data.copy_(torch.randn(param.shape, generator=generator).to(param) * 0.1)
    return layers


def step(layers, checkpoint_with: str, seed: int = 5):
    """Output, input gradient and every trained parameter's gradient of the layers run as the pipeline runs them."""
    hidden_size = layers[0].config.hidden_size
    like = next(layers[0].layer.parameters())
    hidden = torch.randn(1, SEQ, hidden_size, generator=torch.Generator().manual_seed(0)).to(like).requires_grad_()
    positions = torch.arange(SEQ, device=like.device).unsqueeze(0)
    x = (hidden, positions, torch.zeros(1, SEQ, dtype=torch.long, device=like.device))
    torch.manual_seed(seed)
    for layer in layers:
        if checkpoint_with == "torch":
            x = checkpoint(layer, x, use_reentrant=False)
        elif checkpoint_with == "offload":
            x = offloaded_checkpoint(lambda *inputs, layer=layer: layer(inputs), *x)  # as DeepSpeed calls it
        else:
            x = layer(x)
    (x[0].float() * torch.linspace(-1, 1, hidden_size, device=like.device)).square().mean().backward()
    named = {
        f"{i}.{name}": param.grad
        for i, layer in enumerate(layers)
        for name, param in layer.named_parameters()
        if param.requires_grad
    }
    return x[0].detach().float(), hidden.grad.float(), named


def assert_same_step(chunked, whole, tolerance=1e-5):
    assert chunked[2].keys() == whole[2].keys() and len(whole[2]) > 0
    torch.testing.assert_close(chunked[0], whole[0], rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(chunked[1], whole[1], rtol=tolerance, atol=tolerance)
    for name, grad in whole[2].items():
        assert grad is not None and grad.abs().sum() > 0, name
        torch.testing.assert_close(chunked[2][name], grad, rtol=tolerance, atol=tolerance, msg=name)


@pytest.mark.parametrize("arch", ["llama", "gemma2", "qwen3_moe", "mixtral", "qwen2_moe", "gpt_oss"])
@pytest.mark.parametrize("checkpoint_with", ["torch", "offload"])
def test_chunked_mlp_gives_the_whole_mlp_outputs_and_gradients(tiny_model, arch, checkpoint_with):
    """LoRA on every linear layer and, on MoE models, rank-2 pairs on the expert tensors; the reference runs the
    same layers with the MLP whole and no checkpoint."""
    model_dir = tiny_model(arch)
    whole = step(decoder_layers(model_dir, None), "none")
    assert_same_step(step(decoder_layers(model_dir, CHUNK), checkpoint_with), whole)


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
def test_chunked_mlp_under_full_fine_tuning(tiny_model, arch):
    """Every weight trains: the MLP's weight gradients are summed over the chunks (router included on MoE)."""
    model_dir = tiny_model(arch)
    whole = step(decoder_layers(model_dir, None, "full"), "none")
    chunked = step(decoder_layers(model_dir, CHUNK, "full"), "offload")
    assert any("mlp" in name for name in whole[2])
    assert_same_step(chunked, whole)


def test_chunked_mlp_replays_dropout(tiny_model, monkeypatch):
    """LoRA dropout inside the MLP: the chunks recomputed in the backward pass draw the forward's masks. Reference:
    the chunks run one after the other with plain autograd (the same random draws in the same order)."""
    model_dir = tiny_model("llama")

    def plain_chunks(self, x):
        return torch.cat([self.call(x[..., start:stop, :]) for start, stop in self.spans(x)], dim=-2)

    with monkeypatch.context() as patch:
        patch.setattr(ChunkedMLP, "forward", plain_chunks)
        reference = step(decoder_layers(model_dir, CHUNK, dropout=0.5), "none")
        other_seed = step(decoder_layers(model_dir, CHUNK, dropout=0.5), "none", seed=6)
    assert not torch.equal(other_seed[1], reference[1])  # dropout is active
    for checkpoint_with in ("none", "torch", "offload"):
        assert_same_step(step(decoder_layers(model_dir, CHUNK, dropout=0.5), checkpoint_with), reference)


def test_offloaded_checkpoint_skips_the_mlp_in_its_recomputation(tiny_model):
    """Chunks run per layer and step: forward 3 and backward 3 under the offloaded checkpoint (the recomputation
    takes the kept output), 3 more under torch's, which recomputes the MLP; a sequence of at most one chunk runs the
    MLP whole."""
    model_dir = tiny_model("llama")
    counts = {}
    for checkpoint_with in ("offload", "torch"):
        layers = decoder_layers(model_dir, CHUNK)
        chunked = [m for layer in layers for m in layer.modules() if isinstance(m, ChunkedMLP)]
        assert len(chunked) == 2
        calls = []
        for module in chunked:
            module._mlp[0].register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[-2]))
        step(layers, checkpoint_with)
        counts[checkpoint_with] = calls
    assert sorted(counts["offload"]) == sorted([5, 5, 3] * 2 * 2)
    assert sorted(counts["torch"]) == sorted([5, 5, 3] * 3 * 2)

    layer = decoder_layers(model_dir, SEQ)[0]
    calls = []
    layer.layer.mlp._mlp[0].register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[-2]))
    step([layer], "offload")
    assert calls == [SEQ, SEQ]  # forward, recomputation: plain checkpointing


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen3_moe"])
def test_offloaded_checkpoint_skips_the_attention_kernel_in_its_recomputation(tiny_model, arch):
    """Two layers: the attention kernel runs twice (the forward pass) under the offloaded checkpoint, whose
    recomputation takes the kept outputs, and four times under torch's; its backward twice either way. Mistral's
    window mask travels as an argument of the kernel. The gradients are those of the layers without long_context."""
    model_dir = tiny_model(arch)
    whole = step(decoder_layers(model_dir, None), "none")
    for checkpoint_with, kernels in (("offload", 2), ("torch", 4)):
        layers = decoder_layers(model_dir, CHUNK)
        with AttentionKernels() as counted:
            result = step(layers, checkpoint_with)
        assert (counted.forward, counted.backward) == (kernels, 2), checkpoint_with
        assert_same_step(result, whole)


def test_kept_outputs_stay_within_the_host_budget(tiny_model, monkeypatch):
    """With room on the host for one layer's attention output and nothing more, the second layer's attention and both
    MLPs are recomputed (the attention kernel runs 3 times, not 2; the MLP chunks 9, not 6): the same gradients, and
    every byte returned to the budget once the step is done."""
    from lit_qlp.strategies import offload

    model_dir = tiny_model("llama")
    whole = step(decoder_layers(model_dir, None), "none")
    layers = decoder_layers(model_dir, CHUNK)
    hidden_size = layers[0].config.hidden_size
    attention_output = SEQ * hidden_size * 4  # [1, heads, SEQ, head_dim] float32
    budget = offload.HostBudget()
    budget.limit = attention_output + 4 * SEQ * 4  # and its log-sum-exp, [1, heads, SEQ] float32
    monkeypatch.setattr(offload, "HOST_BUDGET", budget)
    monkeypatch.setattr(offload, "KEPT_HOST_FRACTION", 1.0)  # all of it for kept outputs (no CUDA inputs here)
    chunks = []
    for layer in layers:
        layer.layer.mlp._mlp[0].register_forward_pre_hook(lambda m, args: chunks.append(args[0].shape[-2]))
    with AttentionKernels() as counted:
        result = step(layers, "offload")
    assert (counted.forward, counted.backward) == (3, 2)
    assert len(chunks) == 3 * 3 * 2
    assert_same_step(result, whole)
    import gc

    gc.collect()
    assert budget.live == 0


def test_layer_inputs_and_kept_outputs_share_the_host_budget(monkeypatch):
    """Inputs take the budget first come first served, up to its limit; kept outputs at most KEPT_HOST_FRACTION of
    it. An input that finds no room stays where it is (on its GPU), with one warning for the run; bytes come back when
    the copies are freed. (CPU tensors: the "copy" is the tensor itself, counted the same.)"""
    import gc

    from lit_qlp.strategies import offload

    budget = offload.HostBudget()
    budget.limit = 4 * 100 * 4  # four [100] float32 tensors
    monkeypatch.setattr(offload, "HOST_BUDGET", budget)
    kept = [offload._keep_on_host(torch.zeros(100)) for _ in range(3)]
    assert [k is not None for k in kept] == [True, True, False]  # half of the limit for kept outputs
    assert budget.kept_live == 800
    inputs = [offload._host_copy(torch.zeros(100), kept=False) for _ in range(3)]
    assert [i is not None for i in inputs] == [True, True, False]  # the other half, then nothing
    assert budget.live == 1600
    with pytest.warns(UserWarning, match="fill their host memory budget .* layer inputs stay in GPU memory") as caught:
        offload._offload_input(torch.zeros(100))
        offload._offload_input(torch.zeros(100))
    assert len(caught) == 1 and budget.inputs_refused == 2 and budget.live == 1600
    del kept, inputs
    gc.collect()
    assert (budget.live, budget.kept_live) == (0, 0)
    room = offload._offload_input(torch.zeros(100))  # room again: counted
    assert budget.live == 400 and budget.inputs_refused == 2
    del room


def test_compiled_long_context_layers_give_the_eager_outputs_and_gradients(tiny_model):
    """compile_layers with long_context: the layer's graph breaks around the chunked MLP (which runs the MLP compiled
    on its own) and the kept attention; under the offloaded checkpoint the same values as eager layers without
    long_context, the attention kernel run once per layer."""
    torch._dynamo.reset()
    model_dir = tiny_model("llama")
    whole = step(decoder_layers(model_dir, None), "none")
    layers = decoder_layers(model_dir, CHUNK, compile=True)
    with AttentionKernels() as counted:
        compiled = step(layers, "offload")
    assert (counted.forward, counted.backward) == (2, 2)
    assert_same_step(compiled, whole, tolerance=1e-4)


def test_chunked_mlp_keeps_every_name(tiny_model):
    """State dict keys, parameter names and HF names are those of the layer without chunks."""
    model_dir = tiny_model("qwen3_moe")
    whole, chunked = decoder_layers(model_dir, None)[0], decoder_layers(model_dir, CHUNK)[0]
    assert isinstance(chunked.layer.mlp, ChunkedMLP)
    assert list(chunked.state_dict()) == list(whole.state_dict())
    assert [n for n, _ in chunked.named_parameters()] == [n for n, _ in whole.named_parameters()]
    assert list(chunked.hf_tensors()) == list(whole.hf_tensors())
    assert sum(isinstance(m, LoraLinear) for m in chunked.modules()) == sum(
        isinstance(m, LoraLinear) for m in whole.modules()
    )


def test_chunk_mlp_refuses_a_layer_without_one_mlp():
    layer = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="module named 'mlp'.*model.long_context off"):
        chunk_mlp(layer, 4)
    with pytest.raises(ValueError, match="mlp_chunk_tokens=0 must be a positive"):
        ChunkedMLP(torch.nn.Linear(2, 2), 0)


def test_long_context_refusals(tiny_model, corpus, tmp_path):
    """Refused before anything is written: no activation checkpointing; a chunk of no tokens."""
    model_dir = tiny_model("llama")
    for extra, message in (
        (
            ["--model.long_context=true", "--trainer.strategy.activation_checkpointing=false"],
            "model.long_context .*activation_checkpointing=true",
        ),
        (["--model.long_context=true", "--model.mlp_chunk_tokens=0"], "mlp_chunk_tokens=0 must be a positive"),
    ):
        root = tmp_path / "refused"
        args = fit_args(model_dir, corpus, root, *extra)
        proc = subprocess.run([sys.executable, "-m", "lit_qlp", *args], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode != 0
        assert re.search(message, proc.stderr), proc.stderr[-2000:]
        assert not root.exists() or not any(root.rglob("*")), list(root.rglob("*"))


@pytest.mark.slow
def test_long_context_training_run_gives_the_usual_losses(tiny_model, corpus, tmp_path):
    """Three steps with model.long_context (chunks of 16 tokens of the 64-token sequences, offloaded checkpoint)
    give the losses of the same run without it."""
    model_dir = tiny_model("llama")
    common = ("--trainer.max_steps=3",)
    run_cli(fit_args(model_dir, corpus, tmp_path / "plain", *common), ROOT)
    long = ("--model.long_context=true", "--model.mlp_chunk_tokens=16")
    run_cli(fit_args(model_dir, corpus, tmp_path / "long", *common, *long), ROOT)
    plain, chunked = scalars(tmp_path / "plain", "train/loss"), scalars(tmp_path / "long", "train/loss")
    assert sorted(chunked) == sorted(plain) == [0, 1, 2]
    for index in plain:
        assert chunked[index] == pytest.approx(plain[index], rel=1e-5), index


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, kernel", [("float32", "efficient"), ("bfloat16", "flash"), ("bfloat16", "cudnn")])
def test_long_context_on_cuda_keeps_the_attention_kernel(tmp_path, dtype, kernel):
    """On CUDA SDPA picks its kernel (memory-efficient attention in float32, flash in bf16; cuDNN where
    ``model.sdpa_backends`` puts it first), the same in the forward pass (no grad) as in the recomputation, so the
    kept outputs are taken: the kernel runs once per layer, its backward on them; the gradients equal the layers'
    without long_context (bf16: to its precision). cuDNN and memory-efficient attention compute the log-sum-exp only
    for a backward, which the kept call must ask for.

    In float32 the model has as many key/value heads as query heads: transformers asks SDPA for grouped-query
    attention (``enable_gqa``) on CUDA, which the memory-efficient kernel lacks, so float32 GQA runs SDPA's math
    path, a composite of matmuls and a softmax with no fused kernel to keep (computed as usual)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from tests.tiny_models import make_tiny_model

    heads = {"num_key_value_heads": 4} if dtype == "float32" else {}
    model_dir = make_tiny_model("llama", tmp_path / "llama", head_dim=16, **heads)
    order = [kernel] + [name for name in ("flash", "efficient", "math") if name != kernel]
    with sdpa_priority(order):
        whole = step(decoder_layers(model_dir, None, device="cuda", dtype=dtype), "none")
    for compile in (False, True):
        torch._dynamo.reset()
        layers = decoder_layers(model_dir, CHUNK, compile=compile, device="cuda", dtype=dtype)
        with sdpa_priority(order), AttentionKernels() as counted:
            result = step(layers, "offload")
        assert (counted.forward, counted.backward) == (2, 2), (compile, counted.forward, counted.backward)
        assert all(kernel in name for name in counted.names), counted.names
        tolerance = 1e-4 if dtype == "float32" else 3e-2
        assert_same_step(result, whole, tolerance)


@pytest.mark.gpu
def test_layer_inputs_stay_on_the_gpu_when_the_host_budget_is_full(tmp_path, monkeypatch):
    """On CUDA with host room for one layer input: the first layer's input goes to the host, the others' stay on the
    GPU (one warning), nothing is kept; the gradients equal the layers' without long_context."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from lit_qlp.strategies import offload
    from tests.tiny_models import make_tiny_model

    model_dir = make_tiny_model("llama", tmp_path / "llama", head_dim=16, num_key_value_heads=4)
    whole = step(decoder_layers(model_dir, None, device="cuda", dtype="float32"), "none")
    layers = decoder_layers(model_dir, CHUNK, device="cuda", dtype="float32")
    budget = offload.HostBudget()
    budget.limit = SEQ * layers[0].config.hidden_size * 4  # one [1, SEQ, hidden] float32 input
    monkeypatch.setattr(offload, "HOST_BUDGET", budget)
    copies = []
    to_host = offload._to_host
    monkeypatch.setattr(offload, "_to_host", lambda t: copies.append(tuple(t.shape)) or to_host(t))
    with pytest.warns(UserWarning, match="layer inputs stay in GPU memory"):
        result = step(layers, "offload")
    assert copies == [(1, SEQ, layers[0].config.hidden_size)] and budget.inputs_refused == len(layers) - 1 > 0
    assert_same_step(result, whole, 1e-4)


@pytest.mark.gpu
def test_backward_takes_what_the_layer_after_prefetched(tmp_path, monkeypatch):
    """On CUDA the second layer's backward pass starts copying the first layer's offloaded input and kept outputs
    back on the side stream; the first layer's backward takes every one of those copies (none made twice, none
    left), and the gradients equal the layers' without long_context."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from lit_qlp.strategies import offload
    from tests.tiny_models import make_tiny_model

    model_dir = make_tiny_model("llama", tmp_path / "llama", head_dim=16, num_key_value_heads=4)
    whole = step(decoder_layers(model_dir, None, device="cuda", dtype="float32"), "none")
    fetched, taken = [], []
    fetch = offload._fetch

    def counted(host, device):
        fetched.append(tuple(host.shape))
        ready = fetch(host, device)
        return lambda: taken.append(tuple(host.shape)) or ready()

    monkeypatch.setattr(offload, "_fetch", counted)
    result = step(decoder_layers(model_dir, CHUNK, device="cuda", dtype="float32"), "offload")
    hidden_size = ModelSource(model_dir).config.hidden_size
    assert (1, SEQ, hidden_size) in fetched and len(fetched) > 1  # the input and kept outputs of the first layer
    assert sorted(taken) == sorted(fetched)
    assert_same_step(result, whole, 1e-4)
