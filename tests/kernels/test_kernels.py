"""Loss kernels against torch's float32 cross-entropy on materialised logits.

The torch implementations run here on the CPU; the Triton kernel runs through Triton's CPU interpreter in a
subprocess (``TRITON_INTERPRET=1`` must be set before triton is imported, and this process must not be affected);
GPU sizes (vocab 128k and 256k, bf16) are behind the ``gpu`` marker. Every check uses the same references: the loss
of ``F.cross_entropy`` on float32 logits with logit scale and softcap applied by hand, and its autograd gradients.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lit_qlp.kernels import cross_entropy, fused_head_loss

ROOT = Path(__file__).resolve().parents[2]
IGNORE = -100
# (logit_scale, softcap): none, Cohere-like scale, Gemma-2-like softcap (small so that tanh saturates), both.
TRANSFORMS = [(None, None), (0.0625, None), (None, 2.0), (0.5, 2.0)]
FLOAT32_TOL = 1e-5
BF16_TOL = 1e-2


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected|| / ||expected||`` in float64."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm()).item()


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if not expected.any():
        assert not actual.any(), f"{what}: expected all zeros, got max |x| = {actual.abs().max().item()}"
        return
    err = rel_err(actual, expected)
    assert err < tol, f"{what}: relative error {err:.3g} >= {tol}"


def make_labels(tokens: int, vocab: int, ignored: str, generator: torch.Generator) -> torch.Tensor:
    """Random labels; ``ignored``: "some" (every third token, and tokens 8..19 so that a chunk of 8 has none),
    or "all"."""
    labels = torch.randint(0, vocab, (tokens,), generator=generator)
    if ignored == "some":
        labels[::3] = IGNORE
        labels[8:20] = IGNORE
    elif ignored == "all":
        labels[:] = IGNORE
    return labels


def transformed(logits: torch.Tensor, logit_scale: float | None, softcap: float | None) -> torch.Tensor:
    z = logits.float()
    if logit_scale is not None:
        z = z * logit_scale
    if softcap is not None:
        z = torch.tanh(z / softcap) * softcap
    return z


def check_cross_entropy(
    implementation: str,
    tokens: int,
    vocab: int,
    logit_scale: float | None,
    softcap: float | None,
    ignored: str = "some",
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    tol: float = FLOAT32_TOL,
) -> None:
    """``cross_entropy`` (all reductions, per-token upstream weights) against ``F.cross_entropy`` in float32."""
    generator = torch.Generator().manual_seed(tokens * vocab)
    logits = (4 * torch.randn(tokens, vocab, generator=generator)).to(device, dtype)
    labels = make_labels(tokens, vocab, ignored, generator).to(device)
    upstream = torch.rand(tokens, generator=generator).to(device)

    ref_logits = logits.to(torch.float32, copy=True).requires_grad_()
    ref = F.cross_entropy(transformed(ref_logits, logit_scale, softcap), labels, ignore_index=IGNORE, reduction="none")
    (ref * upstream).sum().backward()

    x = logits.clone().requires_grad_()
    loss = cross_entropy(x, labels, logit_scale, softcap, reduction="none", implementation=implementation)
    assert loss.dtype == torch.float32
    (loss * upstream).sum().backward()
    assert x.grad.dtype == dtype
    assert_rel_close(loss, ref.detach(), tol, f"{implementation} per-token loss")
    assert_rel_close(x.grad, ref_logits.grad, tol, f"{implementation} logit gradient")

    with torch.no_grad():
        total = cross_entropy(logits, labels, logit_scale, softcap, reduction="sum", implementation=implementation)
        mean = cross_entropy(logits, labels, logit_scale, softcap, reduction="mean", implementation=implementation)
    assert_rel_close(total, ref.detach().sum(), tol, f"{implementation} summed loss")
    count = (labels != IGNORE).sum()
    if count:
        assert_rel_close(mean, ref.detach().sum() / count, tol, f"{implementation} mean loss")
    else:
        assert mean.isnan(), "the mean over no labelled token is NaN, as in torch"


def check_fused_head_loss(
    implementation: str,
    tokens: int,
    hidden_size: int,
    vocab: int,
    logit_scale: float | None,
    softcap: float | None,
    trainable: bool,
    chunk_size: int,
    ignored: str = "some",
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    tol: float = FLOAT32_TOL,
) -> None:
    """``fused_head_loss`` (loss, token count, hidden and weight gradients) against float32 logits + cross-entropy."""
    generator = torch.Generator().manual_seed(tokens * vocab + hidden_size)
    hidden = torch.randn(tokens, hidden_size, generator=generator).to(device, dtype)
    # Logits of standard deviation 3, so that a softcap of 2 saturates for many of them.
    weight = (3 * torch.randn(vocab, hidden_size, generator=generator) / hidden_size**0.5).to(device, dtype)
    labels = make_labels(tokens, vocab, ignored, generator).to(device)
    upstream = 0.5

    ref_hidden = hidden.to(torch.float32, copy=True).requires_grad_()
    ref_weight = weight.to(torch.float32, copy=True).requires_grad_(trainable)
    ref = F.cross_entropy(
        transformed(ref_hidden @ ref_weight.T, logit_scale, softcap), labels, ignore_index=IGNORE, reduction="sum"
    )
    (ref * upstream).backward()

    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_(trainable)
    loss_sum, num_tokens = fused_head_loss(
        h, w, labels, logit_scale, softcap, chunk_size=chunk_size, implementation=implementation
    )
    assert loss_sum.dtype == torch.float32 and loss_sum.dim() == 0
    assert num_tokens.item() == (labels != IGNORE).sum().item()
    (loss_sum * upstream).backward()
    assert_rel_close(loss_sum.detach(), ref.detach(), tol, f"{implementation} summed loss")
    assert_rel_close(h.grad, ref_hidden.grad, tol, f"{implementation} hidden gradient")
    if trainable:
        assert w.grad.dtype == dtype
        assert_rel_close(w.grad, ref_weight.grad, tol, f"{implementation} weight gradient")
    else:
        assert w.grad is None


# ------------------------------------------------------------------------------------------------ torch, CPU
@pytest.mark.parametrize("ignored", ["some", "all"])
@pytest.mark.parametrize(("logit_scale", "softcap"), TRANSFORMS)
def test_cross_entropy_torch_matches_reference(logit_scale, softcap, ignored):
    check_cross_entropy("torch", tokens=37, vocab=1001, logit_scale=logit_scale, softcap=softcap, ignored=ignored)


@pytest.mark.parametrize("trainable", [False, True], ids=["frozen", "trainable"])
@pytest.mark.parametrize(("logit_scale", "softcap"), TRANSFORMS)
def test_fused_head_loss_torch_matches_reference(logit_scale, softcap, trainable):
    check_fused_head_loss(
        "torch", 37, 24, 1001, logit_scale=logit_scale, softcap=softcap, trainable=trainable, chunk_size=8
    )


@pytest.mark.parametrize("chunk_size", [1, 5, 37, 1024])
def test_fused_head_loss_torch_any_chunk_size(chunk_size):
    check_fused_head_loss("torch", 37, 24, 1001, logit_scale=0.5, softcap=2.0, trainable=True, chunk_size=chunk_size)


def test_fused_head_loss_torch_all_ignored():
    check_fused_head_loss("torch", 37, 24, 1001, None, 2.0, trainable=True, chunk_size=8, ignored="all")


def test_fused_head_loss_of_no_tokens_is_zero():
    weight = torch.randn(11, 8, requires_grad=True)
    loss_sum, num_tokens = fused_head_loss(
        torch.randn(0, 8, requires_grad=True), weight, torch.zeros(0, dtype=torch.long)
    )
    loss_sum.backward()
    assert loss_sum.item() == 0 and num_tokens.item() == 0 and not weight.grad.any()


def test_leading_dimensions_are_flattened():
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 13, 16, generator=generator, requires_grad=True)
    weight = torch.randn(101, 16, generator=generator, requires_grad=True)
    labels = torch.randint(0, 101, (3, 13), generator=generator)
    labels[1] = IGNORE
    loss_sum, num_tokens = fused_head_loss(hidden, weight, labels, chunk_size=7)
    loss_sum.backward()
    assert hidden.grad.shape == hidden.shape and num_tokens.item() == 26

    logits = (hidden @ weight.T).detach().requires_grad_()
    per_token = cross_entropy(logits, labels, reduction="none")
    assert per_token.shape == labels.shape
    torch.testing.assert_close(per_token.sum(), loss_sum.detach())


def test_no_grad_and_partial_requires_grad():
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=generator)
    weight = torch.randn(101, 16, generator=generator)
    labels = torch.randint(0, 101, (37,), generator=generator)
    expected = F.cross_entropy(hidden @ weight.T, labels, reduction="sum")
    with torch.no_grad():
        loss_sum, _ = fused_head_loss(hidden, weight.requires_grad_(), labels, chunk_size=8)
        assert not loss_sum.requires_grad
        torch.testing.assert_close(cross_entropy(hidden @ weight.T, labels), expected)
    torch.testing.assert_close(loss_sum, expected)

    # Only the weight requires grad (e.g. a frozen trunk): the hidden states get no gradient.
    loss_sum, _ = fused_head_loss(hidden, weight, labels, chunk_size=8)
    loss_sum.backward()
    reference = weight.detach().clone().requires_grad_()
    F.cross_entropy(hidden @ reference.T, labels, reduction="sum").backward()
    assert hidden.grad is None
    assert rel_err(weight.grad, reference.grad) < FLOAT32_TOL


def test_backward_twice_says_what_to_do():
    hidden = torch.randn(5, 8, requires_grad=True)
    loss_sum, _ = fused_head_loss(hidden, torch.randn(11, 8), torch.zeros(5, dtype=torch.long))
    loss_sum.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="run the forward again"):
        loss_sum.backward()
    loss = cross_entropy(torch.randn(5, 11, requires_grad=True), torch.zeros(5, dtype=torch.long))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="run the forward again"):
        loss.backward()


def test_bad_arguments_say_what_to_change(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    hidden, weight, labels = torch.randn(5, 8), torch.randn(11, 8), torch.zeros(5, dtype=torch.long)
    with pytest.raises((ValueError, ModuleNotFoundError), match="implementation='auto' or 'torch'|needs triton"):
        fused_head_loss(hidden, weight, labels, implementation="triton")
    with pytest.raises(ValueError, match="implementation='cuda'"):
        cross_entropy(hidden @ weight.T, labels, implementation="cuda")
    with pytest.raises(ValueError, match="softcap=0.0 must be positive"):
        cross_entropy(hidden @ weight.T, labels, softcap=0.0)
    with pytest.raises(ValueError, match="same dtype"):
        fused_head_loss(hidden.double(), weight, labels)
    with pytest.raises(ValueError, match="chunk_size=0"):
        fused_head_loss(hidden, weight, labels, chunk_size=0)
    with pytest.raises(ValueError, match=r"weight \(8, 11\) must be \[vocab, hidden_size\]"):
        fused_head_loss(hidden, weight.T, labels)


def test_kernels_import_and_run_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, lit_qlp, lit_qlp.kernels as k\n"
        "h, w, y = torch.randn(4, 8, requires_grad=True), torch.randn(16, 8), torch.arange(4)\n"
        "k.fused_head_loss(h, w, y)[0].backward(); k.cross_entropy(h @ w.T, y).backward()\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# ------------------------------------------------------------------------------ Triton, CPU interpreter
def run_interpreted_checks() -> None:
    """The Triton checks; run by ``test_triton_kernels_through_the_interpreter`` in a TRITON_INTERPRET=1 process."""
    from lit_qlp.kernels.fused_loss import cross_entropy_rows_torch
    from lit_qlp.kernels.triton_cross_entropy import cross_entropy_rows

    assert os.environ.get("TRITON_INTERPRET") == "1"
    for logit_scale, softcap in TRANSFORMS:
        check_cross_entropy("triton", 37, 1001, logit_scale, softcap)
    check_cross_entropy("triton", 37, 1001, None, 2.0, ignored="all")
    for trainable in (False, True):
        check_fused_head_loss("triton", 37, 24, 1001, 0.5, 2.0, trainable=trainable, chunk_size=8)
    check_fused_head_loss("triton", 37, 24, 1001, None, None, trainable=True, chunk_size=16, ignored="all")

    # Blocks of 256 over a vocabulary of 1001: the online log-sum-exp across blocks and the ragged last block.
    generator = torch.Generator().manual_seed(1)
    logits = 4 * torch.randn(37, 1001, generator=generator)
    labels = make_labels(37, 1001, "some", generator)
    for logit_scale, softcap in [(None, None), (0.5, 2.0)]:
        grad, ref_grad = torch.empty_like(logits), torch.empty_like(logits)
        loss = cross_entropy_rows(logits, labels, logit_scale, softcap, IGNORE, grad, block_size=256)
        ref = cross_entropy_rows_torch(logits, labels, logit_scale, softcap, IGNORE, ref_grad)
        assert_rel_close(loss, ref, FLOAT32_TOL, "blocked triton loss")
        assert_rel_close(grad, ref_grad, FLOAT32_TOL, "blocked triton gradient")
    print("interpreted checks passed")


def test_triton_kernels_through_the_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    code = "from tests.kernels.test_kernels import run_interpreted_checks; run_interpreted_checks()"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "interpreted checks passed" in result.stdout


# ---------------------------------------------------------------------------------------------------- GPU
GPU_SIZES = [(37, 1001), (257, 128256), (129, 256000)]


@pytest.mark.gpu
@pytest.mark.parametrize("implementation", ["triton", "torch"])
@pytest.mark.parametrize(
    ("dtype", "tol"), [(torch.float32, FLOAT32_TOL), (torch.bfloat16, BF16_TOL)], ids=["f32", "bf16"]
)
@pytest.mark.parametrize(("tokens", "vocab"), GPU_SIZES, ids=lambda v: str(v))
@pytest.mark.parametrize(("logit_scale", "softcap"), [(None, None), (0.5, 30.0), (None, 2.0)])
def test_cross_entropy_on_gpu(implementation, dtype, tol, tokens, vocab, logit_scale, softcap):
    check_cross_entropy(implementation, tokens, vocab, logit_scale, softcap, dtype=dtype, device="cuda", tol=tol)


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("dtype", "tol"), [(torch.float32, FLOAT32_TOL), (torch.bfloat16, BF16_TOL)], ids=["f32", "bf16"]
)
def test_cross_entropy_all_ignored_on_gpu(dtype, tol):
    check_cross_entropy("triton", 257, 128256, None, 2.0, ignored="all", dtype=dtype, device="cuda", tol=tol)


@pytest.mark.gpu
@pytest.mark.parametrize("implementation", ["triton", "torch"])
@pytest.mark.parametrize("trainable", [False, True], ids=["frozen", "trainable"])
@pytest.mark.parametrize(
    ("dtype", "tol"), [(torch.float32, FLOAT32_TOL), (torch.bfloat16, BF16_TOL)], ids=["f32", "bf16"]
)
@pytest.mark.parametrize(("tokens", "vocab"), GPU_SIZES, ids=lambda v: str(v))
@pytest.mark.parametrize(("logit_scale", "softcap"), [(None, None), (0.5, 2.0)])
def test_fused_head_loss_on_gpu(implementation, trainable, dtype, tol, tokens, vocab, logit_scale, softcap):
    check_fused_head_loss(
        implementation,
        tokens,
        256,
        vocab,
        logit_scale,
        softcap,
        trainable,
        chunk_size=64,
        dtype=dtype,
        device="cuda",
        tol=tol,
    )


@pytest.mark.gpu
@pytest.mark.parametrize("trainable", [False, True], ids=["frozen", "trainable"])
def test_fused_head_loss_all_ignored_on_gpu(trainable):
    check_fused_head_loss(
        "triton",
        257,
        256,
        128256,
        None,
        2.0,
        trainable,
        chunk_size=64,
        ignored="all",
        dtype=torch.bfloat16,
        device="cuda",
        tol=BF16_TOL,
    )


@pytest.mark.gpu
@pytest.mark.parametrize("trainable", [False, True], ids=["frozen", "trainable"])
def test_fused_head_loss_never_holds_all_logits_on_gpu(trainable):
    tokens, hidden_size, vocab, chunk_size = 4096, 1024, 128256, 256
    hidden = torch.randn(tokens, hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=trainable)
    labels = torch.randint(0, vocab, (tokens,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fused_head_loss(hidden, weight, labels, chunk_size=chunk_size)[0].backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    gradients = hidden.numel() * 2 + (weight.numel() * 2 if trainable else 0)
    all_logits = tokens * vocab * 2
    # Gradients, one chunk of logits and cuBLAS workspace; far below even one bf16 copy of the full logits.
    assert extra < gradients + 2 * chunk_size * vocab * 2 + (64 << 20) < gradients + all_logits / 2
