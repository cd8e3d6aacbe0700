"""Triton kernel of the row-wise cross-entropy: each row's loss and, in the same launch, its logit gradient.

Imported only by ``lit_qlp.kernels.fused_loss`` when the Triton implementation is chosen, so that ``import lit_qlp``
works where triton is not installed. On a CPU, Triton's interpreter runs it when ``TRITON_INTERPRET=1`` is set
before triton is first imported.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import triton
import triton.language as tl

# Measured on an H100 (4096 x 256000 bf16 logits, loss and gradient): 2.2 ms at blocks of 2048 to 16384 (near the
# memory bandwidth) without softcap; with softcap 4096 is 10% faster than 8192 and 35% faster than 16384.
_MAX_BLOCK_SIZE = 4096


@triton.jit
def _tanh(x):
    # tl has no portable tanh across Triton versions and the interpreter; this form saturates to ±1 at ±inf.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _cross_entropy_rows_kernel(
    logits_ptr,
    logits_row_stride,
    labels_ptr,
    loss_ptr,
    grad_ptr,
    grad_row_stride,
    vocab_size,
    ignore_index,
    logit_scale,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    logits_ptr += row * logits_row_stride
    grad_ptr += row * grad_row_stride
    label = tl.load(labels_ptr + row).to(tl.int64)
    offsets = tl.arange(0, BLOCK_SIZE)

    if label == ignore_index:
        tl.store(loss_ptr + row, 0.0)
        if COMPUTE_GRAD:
            for start in range(0, vocab_size, BLOCK_SIZE):
                cols = start + offsets
                tl.store(
                    grad_ptr + cols,
                    tl.zeros([BLOCK_SIZE], tl.float32).to(grad_ptr.dtype.element_ty),
                    mask=cols < vocab_size,
                )
        return

    # Pass 1: online log-sum-exp over blocks of the vocabulary: running maximum m, running sum d of exp(z - m).
    m = float("-inf")
    d = 0.0
    for start in range(0, vocab_size, BLOCK_SIZE):
        cols = start + offsets
        mask = cols < vocab_size
        z = tl.load(logits_ptr + cols, mask=mask, other=0.0).to(tl.float32) * logit_scale
        if HAS_SOFTCAP:
            z = softcap * _tanh(z / softcap)
        z = tl.where(mask, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    lse = m + tl.log(d)

    target = tl.load(logits_ptr + label).to(tl.float32) * logit_scale
    if HAS_SOFTCAP:
        target = softcap * _tanh(target / softcap)
    tl.store(loss_ptr + row, lse - target)

    # Pass 2: d loss / d x = (softmax(z) - onehot(label)) * dz/dx, with dz/dx = s * (1 - tanh²(s x / cap)).
    if COMPUTE_GRAD:
        for start in range(0, vocab_size, BLOCK_SIZE):
            cols = start + offsets
            mask = cols < vocab_size
            z = tl.load(logits_ptr + cols, mask=mask, other=0.0).to(tl.float32) * logit_scale
            if HAS_SOFTCAP:
                t = _tanh(z / softcap)
                z = softcap * t
            grad = tl.exp(z - lse) - tl.where(cols == label, 1.0, 0.0)
            if HAS_SOFTCAP:
                grad = grad * (1.0 - t * t)
            grad = grad * logit_scale
            tl.store(grad_ptr + cols, grad.to(grad_ptr.dtype.element_ty), mask=mask)


def cross_entropy_rows(
    logits: torch.Tensor,
    labels: torch.Tensor,
    logit_scale: float | None,
    softcap: float | None,
    ignore_index: int,
    grad_out: torch.Tensor | None,
    block_size: int | None = None,
) -> torch.Tensor:
    """Per-row cross-entropy of [rows, vocab] logits, and its gradient w.r.t. the logits, in one kernel launch.

    With ``z = softcap * tanh(s * x / softcap)`` (or ``z = s * x`` without softcap, ``s = logit_scale`` or 1):
    ``loss_r = logsumexp(z_r) - z_r[label_r]`` and
    ``d loss_r / d x_r = (softmax(z_r) - onehot(label_r)) * s * (1 - tanh²(s * x_r / softcap))``; both are 0 where
    ``label_r == ignore_index``. One program per row reads the row twice in blocks of ``block_size`` (log-sum-exp,
    then gradient), so any vocabulary size works and nothing of size vocab is held besides ``grad_out``.

    Args:
        logits: [rows, vocab] float32, float16 or bfloat16 with unit stride along the vocabulary.
        labels: [rows] integer labels.
        logit_scale: Multiplier of the logits, or None.
        softcap: The cap of ``softcap * tanh(logits / softcap)``, or None.
        ignore_index: Label of rows that carry no loss.
        grad_out: Where the gradient goes ([rows, vocab], unit stride along the vocabulary, any floating dtype); it
            may be ``logits`` itself, each row being read before it is overwritten. None computes the loss only.
        block_size: Vocabulary entries per block, a power of two; None picks ``min(4096, next_power_of_2(vocab))``.

    Returns:
        [rows] float32 losses.
    """
    rows, vocab = logits.shape
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows == 0:
        return loss
    block = block_size or min(_MAX_BLOCK_SIZE, triton.next_power_of_2(vocab))
    grad = logits if grad_out is None else grad_out
    with torch.cuda.device(logits.device) if logits.is_cuda else nullcontext():
        _cross_entropy_rows_kernel[(rows,)](
            logits,
            logits.stride(0),
            labels,
            loss,
            grad,
            grad.stride(0),
            vocab,
            ignore_index,
            1.0 if logit_scale is None else float(logit_scale),
            1.0 if softcap is None else float(softcap),
            HAS_SOFTCAP=softcap is not None,
            COMPUTE_GRAD=grad_out is not None,
            BLOCK_SIZE=block,
            num_warps=16 if block >= 16384 else 8 if block >= 2048 else 4,
        )
    return loss
