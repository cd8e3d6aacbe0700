"""The generic decomposition reproduces the Hugging Face forward for every tested architecture."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

from lit_qlp.kernels import TokenWeightedLoss
from lit_qlp.models.pipeline import ModelSource, PositionCache, sdpa_priority
from lit_qlp.models.stash import ATTENTION_OPS
from lit_qlp.module import shift_left
from tests.tiny_models import ARCHITECTURES, VOCAB, load_hf, stage_layers

SEQ = 24  # longer than the sliding windows (8) of the tiny mistral and gemma2


def batch(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(seed))


def run_layers(layers, input_ids: torch.Tensor) -> torch.Tensor:
    x = (input_ids, torch.arange(input_ids.shape[1]).unsqueeze(0), torch.zeros_like(input_ids))
    for layer in layers:
        x = layer(x)
    return x


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_one_stage_matches_hf(tiny_model, arch):
    model_dir = tiny_model(arch)
    source = ModelSource(model_dir, dtype="float32")
    loss_fn = TokenWeightedLoss()
    layers = stage_layers(source, loss=loss_fn)
    hf = load_hf(model_dir, source.attn_implementation)
    ids = batch()
    labels = ids.clone()
    labels[0, :5] = -100
    shifted = shift_left(labels, -100)
    loss_fn.normalize_by(float((shifted != -100).sum()))
    with torch.no_grad():
        hidden = run_layers(layers, ids)
        reference = hf(ids, labels=labels)
        logits = layers[-1].logits(hidden)
        loss = loss_fn(hidden, shifted)  # the pipeline's fused head + loss
    torch.testing.assert_close(logits, reference.logits)
    torch.testing.assert_close(loss, reference.loss)


def test_mask_and_rotary_are_computed_once_per_micro_batch(tiny_model, monkeypatch):
    """The first decoder layer computes a micro-batch's mask and rotary embedding, the others reuse them (each of
    transformers' packed-sequence checks synchronises with the device); a packed micro-batch after a plain one
    gets its own mask, and both match HF's forward with the same position ids."""
    import transformers.masking_utils as masking_utils

    checks = []
    find_packed = masking_utils.find_packed_sequence_indices
    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", lambda p: checks.append(p) or find_packed(p))
    model_dir = tiny_model("llama")
    source = ModelSource(model_dir, dtype="float32")
    assert source.quirks.num_layers > 1
    *layers, head = stage_layers(source)
    hf = load_hf(model_dir, source.attn_implementation)
    ids = batch()
    plain = torch.arange(SEQ).unsqueeze(0)
    packed = torch.cat((torch.arange(10), torch.arange(SEQ - 10))).unsqueeze(0)  # two sequences in one row
    with torch.no_grad():
        for positions in (plain, packed):
            x = (ids, positions, torch.zeros_like(ids))
            before = len(checks)
            for layer in layers:
                x = layer(x)
            assert len(checks) == before + 1
            reference = hf(ids, position_ids=positions, use_cache=False).logits  # a cache disables packing
            torch.testing.assert_close(head.logits(head(x)), reference)
    # the packed mask really differs: without it the second sequence would attend to the first
    with torch.no_grad():
        unpacked = hf(ids, position_ids=packed, use_cache=True).logits
    torch.testing.assert_close(unpacked[:, :10], reference[:, :10])
    assert not torch.allclose(unpacked[:, 10:], reference[:, 10:])


def test_offloaded_layers_compute_mask_and_rotary_once_per_micro_batch(tiny_model, monkeypatch):
    """Under activation offload (long_context) as under torch's checkpoint: the first layer computes the mask, every
    later layer and every recomputation in the backward pass reuses it. The offloaded checkpoint once passed a new view
    of position_ids on, so each layer computed and kept its own rotary tables (1 GiB at 64k tokens on Llama-3-8B)."""
    import transformers.masking_utils as masking_utils

    from lit_qlp.strategies.offload import offloaded_checkpoint

    checks = []
    find_packed = masking_utils.find_packed_sequence_indices
    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", lambda p: checks.append(p) or find_packed(p))
    source = ModelSource(tiny_model("llama"), dtype="float32")
    *layers, head = stage_layers(source)
    for layer in layers:
        layer.requires_grad_(True)
    ids = batch()
    x = (ids, torch.arange(SEQ).unsqueeze(0), torch.zeros_like(ids))
    x = layers[0](x)  # the embedding
    for layer in layers[1:]:
        x = offloaded_checkpoint(lambda *inputs, layer=layer: layer(inputs), *x)  # as DeepSpeed calls it
    head.logits(head(x)).square().mean().backward()
    assert len(checks) == 1


def test_position_cache_recomputes_for_another_or_changed_tensor():
    cache, calls = PositionCache(), []

    def compute():
        calls.append(1)
        return len(calls)

    positions = torch.arange(4)
    assert cache.get(positions, "k", compute) == cache.get(positions, "k", compute) == 1
    assert cache.get(positions, "other", compute) == 2
    assert cache.get(positions.clone(), "k", compute) == 3  # same values, another tensor
    positions.add_(1)  # changed in place
    assert cache.get(positions, "k", compute) == 4
    del positions
    cache.get(torch.arange(4), "k", compute)
    assert len(cache._entries) == 1  # entries of freed tensors are dropped


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def packed_positions(lengths: list[int] | None) -> torch.Tensor:
    """[1, SEQ] position ids of documents of ``lengths`` packed in one row, each counting from 0 (None: one document
    of SEQ tokens)."""
    if lengths is None:
        return torch.arange(SEQ).unsqueeze(0)
    assert sum(lengths) == SEQ
    return torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)


def _two_stage_worker(
    rank: int, world_size: int, port: int, model_dirs: dict, out: dict, lengths: list[int] | None = None
) -> None:
    import os

    import deepspeed

    from lit_qlp.compat.deepspeed import skip_cpu_shm_comm_build
    from lit_qlp.methods import LoRA
    from lit_qlp.module import CausalLMModule
    from lit_qlp.strategies.engine import build_engine, build_pipeline, engine_config
    from lit_qlp.strategies.partition import partition_layers
    from lit_qlp.strategies.pipeline import process_topology

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    os.environ["LOCAL_RANK"] = str(rank)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    skip_cpu_shm_comm_build()
    deepspeed.init_distributed("gloo")
    try:
        for arch, model_dir in model_dirs.items():
            module = CausalLMModule(model_dir, dtype="float32", method=LoRA(rank=4))
            spec = module.pipeline_spec(torch.device("cpu"))
            types = [s.typename.__name__ for s in spec.layers]
            parts = partition_layers("type:decoder", world_size, spec.parameter_counts, types)
            topology = process_topology(world_size, 1, column_major=False)
            pipe = build_pipeline(spec, parts, topology, activation_checkpointing=False)
            engine = build_engine(pipe, None, engine_config(gradient_accumulation_steps=1, gradient_clipping=0.0))
            ids = batch()
            positions = packed_positions(lengths)
            labels = shift_left(torch.where(positions == 0, -100, ids), -100)  # no target across documents
            spec.loss_fn.normalize_by(float((labels != -100).sum()))
            micro = ((ids, positions, torch.zeros_like(ids)), labels)
            loss, hidden = engine.eval_batch(iter([micro]), return_logits=True, num_micro_batches=1)
            if engine.is_last_stage():
                with torch.no_grad():
                    logits = pipe.forward_funcs[-1].logits(hidden)
                out[arch] = (loss.clone(), logits.clone(), len(pipe.forward_funcs))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_stages_in_two_processes_match_hf(tiny_model):
    model_dirs = {arch: str(tiny_model(arch)) for arch in ARCHITECTURES}
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_two_stage_worker, args=(2, _free_port(), model_dirs, out), nprocs=2, join=True)
        results = dict(out)
    assert set(results) == set(ARCHITECTURES)
    for arch, (loss, logits, local_layers) in results.items():
        source = ModelSource(model_dirs[arch], dtype="float32")
        assert local_layers == 3, f"{arch}: the last stage should hold 2 decoder layers + the head"
        hf = load_hf(model_dirs[arch], source.attn_implementation)
        ids = batch()
        with torch.no_grad():
            reference = hf(ids, labels=ids)
        torch.testing.assert_close(logits, reference.logits, msg=lambda m: f"{arch}: {m}")
        torch.testing.assert_close(loss, reference.loss, msg=lambda m: f"{arch}: {m}")


class AttentionKernels(TorchDispatchMode):
    """Counts the fused attention kernels that run (forward, by op name in ``names``) and their backward ops."""

    def __init__(self):
        super().__init__()
        self.forward = self.backward = 0
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in ATTENTION_OPS:
            self.forward += 1
            self.names.append(str(func))
        elif "scaled_dot_product" in str(func) and "backward" in str(func):
            self.backward += 1
        return func(*args, **(kwargs or {}))


def test_sdpa_backends_of_the_module_hold_from_setup_to_teardown_and_give_the_same_logits(tiny_model):
    """``model.sdpa_backends: [math]``: between the module's setup and teardown the layers' SDPA runs its math path
    (no fused kernel), with the logits of torch's own choice (CPU flash attention) to float32 precision; after
    teardown torch's choice is back. A name torch does not have is refused when the module is made."""
    from lit_qlp.module import CausalLMModule

    model_dir = tiny_model("llama")
    source = ModelSource(model_dir, dtype="float32")
    layers = stage_layers(source, loss=TokenWeightedLoss())
    ids = batch()
    with torch.no_grad(), AttentionKernels() as default:
        expected = layers[-1].logits(run_layers(layers, ids))
    assert default.names and all("flash_attention_for_cpu" in op for op in default.names)
    module = CausalLMModule(model_dir, dtype="float32", sdpa_backends=["math"])
    module.setup("fit")
    try:
        with torch.no_grad(), AttentionKernels() as math:
            got = layers[-1].logits(run_layers(layers, ids))
    finally:
        module.teardown("fit")
    assert math.names == []
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad(), AttentionKernels() as after:
        run_layers(layers, ids)
    assert after.names == default.names
    with pytest.raises(ValueError, match=r"model.sdpa_backends=\['fast'\].*'cudnn', 'efficient', 'flash', 'math'"):
        CausalLMModule(model_dir, dtype="float32", sdpa_backends=["fast"])


def test_sdpa_priority_runs_only_the_named_kernels():
    """On the CPU: ``[flash, math]`` runs CPU flash attention, ``[math]`` the math path (no fused kernel);
    ``[cudnn]`` alone has no kernel there: torch's error. No names: refused. (The CPU tries flash before math
    whatever the order; the order is CUDA's, tested below.)"""
    q = torch.randn(1, 2, 8, 4, generator=torch.Generator().manual_seed(0))
    with sdpa_priority(["flash", "math"]), AttentionKernels() as counted:
        torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
    assert counted.names == ["aten._scaled_dot_product_flash_attention_for_cpu.default"]
    with sdpa_priority(["math"]), AttentionKernels() as counted:
        torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
    assert counted.names == []
    with sdpa_priority(["cudnn"]), pytest.raises(RuntimeError, match="No viable backend"):
        torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
    with pytest.raises(ValueError, match="name one or more"):
        sdpa_priority([])
    with pytest.raises(ValueError, match=r"each once \('flash' named twice\)"):
        sdpa_priority(["flash", "math", "flash"])


@pytest.mark.gpu
def test_sdpa_priority_tries_the_named_kernels_in_order_on_cuda():
    """bf16 causal GQA attention on CUDA, which flash and cuDNN both take: the first named runs, with the same
    output and gradients as the other to bf16 precision."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    generator = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 8, 256, 64, device="cuda", dtype=torch.bfloat16, generator=generator)
    kv = torch.randn(2, 1, 2, 256, 64, device="cuda", dtype=torch.bfloat16, generator=generator)
    results = {}
    for order in (["cudnn", "flash"], ["flash", "cudnn"]):
        inputs = [t.clone().requires_grad_(True) for t in (q, kv[0], kv[1])]
        with sdpa_priority(order), AttentionKernels() as counted:
            out = torch.nn.functional.scaled_dot_product_attention(*inputs, is_causal=True, enable_gqa=True)
            out.float().square().sum().backward()
        assert len(counted.names) == 1 and order[0] in counted.names[0], (order, counted.names)
        results[order[0]] = [out.float()] + [t.grad.float() for t in inputs]
    for got, expected in zip(results["cudnn"], results["flash"]):
        torch.testing.assert_close(got, expected, rtol=3e-2, atol=3e-2)


def test_sdpa_backends_that_no_kernel_of_the_device_takes_are_refused_before_training(tiny_model):
    """``check_device`` (which the strategy calls before anything is written) probes the model's attention shape:
    cuDNN alone on the CPU is refused naming the option, the device, the dtype and torch's reason; flash passes."""
    from lit_qlp.module import CausalLMModule

    model_dir = tiny_model("llama")
    CausalLMModule(model_dir, dtype="float32", sdpa_backends=["flash"]).check_device(torch.device("cpu"))
    module = CausalLMModule(model_dir, dtype="float32", sdpa_backends=["cudnn"])
    message = r"model.sdpa_backends=\['cudnn'\]: none of these kernels takes this model's attention on cpu in float32"
    with pytest.raises(ValueError, match=message + r" \(4/2 heads of 8\); torch says: No viable backend"):
        module.check_device(torch.device("cpu"))
