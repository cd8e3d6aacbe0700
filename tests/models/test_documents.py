"""Documents packed on their own (``data.packing: documents``): inside a packed sequence every document gets the
logits and loss the HF model gives it alone, with 1 stage and with 2 stages in 2 processes, through the mask path
(CPU) and through FlexAttention."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from lit_qlp.kernels import TokenWeightedLoss
from lit_qlp.models.pipeline import ModelSource
from lit_qlp.module import shift_left
from tests.models.test_pipeline import SEQ, _free_port, _two_stage_worker, batch, packed_positions
from tests.tiny_models import ARCHITECTURES, load_hf, make_tiny_model, stage_layers

# Three documents and a padding tail; the 10-token one is longer than the sliding windows (8) of mistral and gemma2.
LENGTHS = [7, 10, 4, 3]
DOCUMENTS = LENGTHS[:-1]  # the last run is padding, unlabelled
REQUIRED = ["llama", "mistral", "gemma2", "qwen3"]


def packed_labels(ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Targets as ``pack_documents`` lays them out (no label on a document's first token, none on the padding),
    shifted to the logits that predict them."""
    labels = torch.where(positions == 0, -100, ids)
    labels[:, sum(DOCUMENTS) :] = -100
    return shift_left(labels, -100)


def hf_per_document(hf, ids: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The HF model on each document alone: its logits, and the token-weighted loss of all documents together."""
    logits, loss_sum, targets, at = [], 0.0, 0, 0
    with torch.no_grad():
        for n in DOCUMENTS:
            out = hf(ids[:, at : at + n], labels=ids[:, at : at + n])
            logits.append(out.logits)
            loss_sum, targets, at = loss_sum + out.loss * (n - 1), targets + n - 1, at + n
    return logits, loss_sum / targets


def assert_per_document(arch: str, logits: torch.Tensor, loss: torch.Tensor, reference) -> None:
    reference_logits, reference_loss = reference
    at = 0
    for n, expected in zip(DOCUMENTS, reference_logits):
        torch.testing.assert_close(logits[:, at : at + n], expected, msg=lambda m: f"{arch}, document at {at}: {m}")
        at += n
    torch.testing.assert_close(loss, reference_loss, msg=lambda m: f"{arch} loss: {m}")


def one_stage(model_dir, document_attention: str = "auto"):
    source = ModelSource(model_dir, dtype="float32", document_attention=document_attention)
    loss_fn = TokenWeightedLoss()
    layers = stage_layers(source, loss=loss_fn)
    ids, positions = batch(), packed_positions(LENGTHS)
    labels = packed_labels(ids, positions)
    loss_fn.normalize_by(float((labels != -100).sum()))
    with torch.no_grad():
        x = (ids, positions, torch.zeros_like(ids))
        for layer in layers:
            x = layer(x)
        return source, layers, layers[-1].logits(x), loss_fn(x, labels)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_each_document_gets_its_own_logits_and_loss(tiny_model, arch):
    model_dir = tiny_model(arch)
    source, _, logits, loss = one_stage(model_dir)
    hf = load_hf(model_dir, source.attn_implementation)
    assert_per_document(arch, logits, loss, hf_per_document(hf, batch()))


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen3"])
def test_flex_attention_gives_each_document_its_own_logits(tiny_model, arch):
    """FlexAttention (CUDA's default for packed documents) forced on the CPU: a block mask, HF's logits per document."""
    from torch.nn.attention.flex_attention import BlockMask

    model_dir = tiny_model(arch)
    source, layers, logits, loss = one_stage(model_dir, document_attention="flex")
    decoder = layers[1]
    mask = decoder.attention_mask(torch.zeros(1, SEQ, 1), packed_positions(LENGTHS))
    assert isinstance(mask, BlockMask)
    one_document = decoder.attention_mask(torch.zeros(1, SEQ, 1), packed_positions(None))
    assert not isinstance(one_document, BlockMask)  # SDPA's kernels (causal, or its sliding-window mask)
    hf = load_hf(model_dir, source.attn_implementation)
    assert_per_document(arch, logits, loss, hf_per_document(hf, batch()))


def test_flex_on_cuda_needs_heads_of_16(tiny_model):
    """FlexAttention's CUDA kernels refuse heads under 16 dimensions (the tiny models have 8): auto keeps the mask."""
    assert not ModelSource(tiny_model("llama"), dtype="float32").flex_for_documents(torch.device("cuda"))
    with pytest.raises(ValueError, match="FlexAttention on CUDA needs heads of at least 16 dimensions, this model's"):
        ModelSource(tiny_model("llama"), dtype="float32", document_attention="flex").flex_for_documents("cuda")
    assert ModelSource(tiny_model("llama"), dtype="float32", document_attention="flex").flex_for_documents("cpu")
    from lit_qlp.module import CausalLMModule

    module = CausalLMModule(tiny_model("llama"), dtype="float32", document_attention="flex")
    with pytest.raises(ValueError, match="FlexAttention on CUDA needs heads of at least 16"):
        module.check_device(torch.device("cuda"))  # what the strategy calls before anything is written
    module.check_device(torch.device("cpu"))


def test_flex_needs_sdpa(tiny_model):
    with pytest.raises(ValueError, match="model.document_attention=flex runs FlexAttention in place of SDPA, but"):
        ModelSource(tiny_model("llama"), dtype="float32", attn_implementation="eager", document_attention="flex")
    assert not ModelSource(tiny_model("llama"), dtype="float32").flex_for_documents(torch.device("cpu"))
    mask = ModelSource(tiny_model("llama"), dtype="float32", document_attention="mask")
    assert not mask.flex_for_documents(torch.device("cuda"))


@pytest.mark.slow
def test_two_stages_in_two_processes_give_each_document_its_own_logits(tiny_model):
    model_dirs = {arch: str(tiny_model(arch)) for arch in REQUIRED}
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_two_stage_worker, args=(2, _free_port(), model_dirs, out, LENGTHS), nprocs=2)
        results = dict(out)
    assert set(results) == set(REQUIRED)
    for arch, (loss, logits, _) in results.items():
        source = ModelSource(model_dirs[arch], dtype="float32")
        hf = load_hf(model_dirs[arch], source.attn_implementation)
        reference_logits, _ = hf_per_document(hf, batch())
        at = 0
        for n, expected in zip(DOCUMENTS, reference_logits):
            torch.testing.assert_close(logits[:, at : at + n], expected, msg=lambda m: f"{arch}: {m}")
            at += n
        ids = batch()
        with torch.no_grad():  # the worker labels the padding run as a fourth document
            runs, at = [], 0
            for n in LENGTHS:
                runs.append(hf(ids[:, at : at + n], labels=ids[:, at : at + n]).loss * (n - 1))
                at += n
        torch.testing.assert_close(loss, sum(runs) / (SEQ - len(LENGTHS)), msg=lambda m: f"{arch} loss: {m}")


def step_on(device: str, model_dir, document_attention: str, compile: bool = False):
    """Loss, per-document logits and gradients of every decoder weight for one packed micro-batch in float32."""
    from lit_qlp.models.pipeline import DecoderLayerPipe, EmbeddingPipe, OutputPipe, StageBuilder

    source = ModelSource(model_dir, dtype="float32", document_attention=document_attention)
    trainable = frozenset(n for n, _ in source.skeleton.named_parameters() if ".layers." in n)
    builder = StageBuilder(source, torch.device(device), None, trainable)
    loss_fn = TokenWeightedLoss()
    decoders = [DecoderLayerPipe(builder, i, compile=compile) for i in range(source.quirks.num_layers)]
    layers = [EmbeddingPipe(builder), *decoders, OutputPipe(builder, loss_fn)]
    ids, positions = batch().to(device), packed_positions(LENGTHS).to(device)
    labels = packed_labels(ids, positions)
    loss_fn.normalize_by(float((labels != -100).sum()))
    x = (ids, positions, torch.zeros_like(ids))
    for layer in layers:
        x = layer(x)
    loss = loss_fn(x, labels)
    loss.backward()
    grads = {
        f"{layer.index}.{n}": p.grad.cpu()
        for layer in decoders
        for n, p in layer.named_parameters()
        if p.grad is not None
    }
    with torch.no_grad():
        return source, loss.detach().cpu(), layers[-1].logits(x).cpu(), grads


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen3"])
@pytest.mark.parametrize("compile", [False, True])
def test_flex_on_cuda_trains_each_document_on_its_own(tmp_path, arch, compile):
    """CUDA's default kernel for packed documents, FlexAttention (eager layers, and compiled ones as the GPU recipes
    run them), on the tiny model with heads of 16 (CUDA's FlexAttention needs 16): HF's logits and loss per
    document, and the gradients of the block-diagonal mask path."""
    model_dir = make_tiny_model(arch, tmp_path / arch, head_dim=16)
    source, loss, logits, grads = step_on("cuda", model_dir, "auto", compile)
    assert source.flex_for_documents(torch.device("cuda"))
    hf = load_hf(model_dir, source.attn_implementation)
    assert_per_document(arch, logits, loss, hf_per_document(hf, batch()))
    _, mask_loss, _, mask_grads = step_on("cuda", model_dir, "mask")
    torch.testing.assert_close(loss, mask_loss)
    assert sorted(grads) == sorted(mask_grads) and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, mask_grads[name], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
