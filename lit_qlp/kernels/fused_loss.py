"""Cross-entropy with its gradient computed in the forward pass, and an LM head + loss that never holds all logits.

``cross_entropy`` takes materialised [tokens, vocab] logits. ``fused_head_loss`` takes the hidden states and the
head weight and walks over the tokens in chunks of ``chunk_size``: per chunk it computes the logits, the loss and the
logit gradient, and folds that gradient into the hidden-state and weight gradients at once, so at most
[chunk_size, vocab] logits exist at a time. Both return float32 losses.

Either runs a Triton kernel (CUDA tensors, triton installed) or chunked torch ops (everything else);
``implementation`` forces one, e.g. ``"torch"`` on a GPU for comparison. Gradients are computed during the forward pass
and kept until backward, which only scales them by the incoming gradient; so backward runs once per forward.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Literal

import torch
from lightning_utilities.core.imports import RequirementCache

IGNORE_INDEX = -100  # the label of a position that is not trained (transformers' convention)

_TRITON_AVAILABLE = RequirementCache("triton")

# The torch fallback works on row blocks of about this many logits, bounding its float32 temporaries (~4 of them).
_TORCH_BLOCK_ELEMENTS = 1 << 24

Implementation = Literal["auto", "triton", "torch"]

# (logits [rows, vocab], labels [rows], logit_scale, softcap, ignore_index, grad_out or None) -> loss [rows] float32
RowsLoss = Callable[[torch.Tensor, torch.Tensor, float | None, float | None, int, torch.Tensor | None], torch.Tensor]


def cross_entropy_rows_torch(
    logits: torch.Tensor,
    labels: torch.Tensor,
    logit_scale: float | None,
    softcap: float | None,
    ignore_index: int,
    grad_out: torch.Tensor | None,
) -> torch.Tensor:
    """Per-row cross-entropy of [rows, vocab] logits and its logit gradient, in float32 torch ops over row blocks.

    With ``z = softcap * tanh(s * x / softcap)`` (or ``z = s * x`` without softcap, ``s = logit_scale`` or 1):
    ``loss_r = logsumexp(z_r) - z_r[label_r]`` and
    ``d loss_r / d x_r = (softmax(z_r) - onehot(label_r)) * s * (1 - tanh²(s * x_r / softcap))``; both are 0 where
    ``label_r == ignore_index``.

    Args:
        logits: [rows, vocab] floating point logits.
        labels: [rows] integer labels.
        logit_scale: Multiplier of the logits, or None.
        softcap: The cap of ``softcap * tanh(logits / softcap)``, or None.
        ignore_index: Label of rows that carry no loss.
        grad_out: [rows, vocab] tensor that receives the gradient (it may be ``logits`` itself), or None.

    Returns:
        [rows] float32 losses.
    """
    rows, vocab = logits.shape
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    step = max(1, _TORCH_BLOCK_ELEMENTS // max(vocab, 1))
    for start in range(0, rows, step):
        block = slice(start, start + step)
        # .float() may return ``logits`` itself, which may also be ``grad_out``: nothing below writes into ``x``.
        x = logits[block].float()
        z = x if logit_scale is None else x * logit_scale
        tanh = None
        if softcap is not None:
            tanh = torch.tanh(z / softcap)
            z = tanh * softcap
        valid = labels[block] != ignore_index
        targets = torch.where(valid, labels[block], 0).unsqueeze(1)
        lse = torch.logsumexp(z, dim=1, keepdim=True)
        loss[block] = torch.where(valid, (lse - z.gather(1, targets)).squeeze(1), 0.0)
        if grad_out is None:
            continue
        grad = (z - lse).exp_()
        grad.scatter_add_(1, targets, torch.full_like(targets, -1, dtype=grad.dtype))
        if tanh is not None:
            grad.mul_(1.0 - tanh.square())
        if logit_scale is not None:
            grad.mul_(logit_scale)
        grad.mul_(valid.unsqueeze(1))
        grad_out[block].copy_(grad)
    return loss


def _rows_loss(implementation: Implementation, device: torch.device) -> RowsLoss:
    """The per-row kernel that ``implementation`` names for tensors on ``device``."""
    if implementation not in ("auto", "triton", "torch"):
        raise ValueError(f"implementation={implementation!r} is not one of 'auto', 'triton', 'torch'")
    if implementation == "torch" or (implementation == "auto" and (device.type != "cuda" or not _TRITON_AVAILABLE)):
        return cross_entropy_rows_torch
    if not _TRITON_AVAILABLE:
        raise ModuleNotFoundError(f"implementation='triton' needs triton: {_TRITON_AVAILABLE.message}")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"implementation='triton' runs on CUDA tensors (or on the CPU with TRITON_INTERPRET=1 set before triton is "
            f"imported), but the tensors are on {device}; use implementation='auto' or 'torch'"
        )
    from lit_qlp.kernels.triton_cross_entropy import cross_entropy_rows

    return cross_entropy_rows


def _check_transforms(logit_scale: float | None, softcap: float | None) -> None:
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap={softcap} must be positive (or None for no softcapping)")
    if logit_scale is not None and logit_scale == 0:
        raise ValueError("logit_scale=0 makes every logit 0; pass None for no scaling")


class _CrossEntropyFunction(torch.autograd.Function):
    """Per-token losses of materialised logits; the logit gradient is computed in forward, scaled in backward."""

    @staticmethod
    def forward(
        ctx,
        logits: torch.Tensor,
        labels: torch.Tensor,
        logit_scale: float | None,
        softcap: float | None,
        ignore_index: int,
        rows_loss: RowsLoss,
        compute_grad: bool,
    ) -> torch.Tensor:
        grad = torch.empty_like(logits) if compute_grad else None
        loss = rows_loss(logits, labels, logit_scale, softcap, ignore_index, grad)
        ctx.grad_logits = grad
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad = ctx.grad_logits
        if grad is None:
            raise RuntimeError(
                "cross_entropy's logit gradient was computed in its forward pass and is used up by the first backward; "
                "run the forward again instead of backward(retain_graph=True) twice"
            )
        ctx.grad_logits = None
        return grad.mul_(grad_loss.unsqueeze(1)), None, None, None, None, None, None


def cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    logit_scale: float | None = None,
    softcap: float | None = None,
    reduction: Literal["none", "sum", "mean"] = "sum",
    ignore_index: int = IGNORE_INDEX,
    implementation: Implementation = "auto",
) -> torch.Tensor:
    """Cross-entropy of materialised logits, in float32, with the logit gradient computed in the forward pass.

    Per token, with ``z = softcap * tanh(s * x / softcap)`` (``z = s * x`` without softcap, ``s = logit_scale`` or
    1): ``loss_t = logsumexp(z_t) - z_t[label_t]``, and 0 where ``label_t == ignore_index``. The gradient
    ``(softmax(z_t) - onehot(label_t)) * dz/dx`` is stored in the logits' dtype during forward (one [tokens, vocab]
    tensor besides the logits; no float32 copy of them) and multiplied in place by the incoming gradient in backward.

    Args:
        logits: [..., vocab] float32, float16 or bfloat16 logits, aligned with ``labels`` (no shift here).
        labels: [...] target token ids.
        logit_scale: Multiplier applied to the logits first (Cohere's ``logit_scale``), or None.
        softcap: Final-logit softcapping ``softcap * tanh(logits / softcap)`` (Gemma 2), or None.
        reduction: "none": per-token losses shaped like ``labels``; "sum": their sum; "mean": their sum divided by the
            number of labelled tokens (NaN when there is none, as in torch).
        ignore_index: Label of tokens that carry no loss.
        implementation: "triton" (CUDA tensors), "torch", or "auto": Triton on CUDA when triton is installed, torch
            otherwise.

    Returns:
        The float32 loss, reduced as ``reduction`` says.
    """
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels {tuple(labels.shape)} must be shaped like logits {tuple(logits.shape)} minus vocab")
    if reduction not in ("none", "sum", "mean"):
        raise ValueError(f"reduction={reduction!r} is not one of 'none', 'sum', 'mean'")
    _check_transforms(logit_scale, softcap)
    rows_loss = _rows_loss(implementation, logits.device)
    flat_logits = logits.reshape(-1, logits.shape[-1])
    if flat_logits.stride(-1) != 1:
        flat_logits = flat_logits.contiguous()
    flat_labels = labels.reshape(-1).contiguous()
    compute_grad = torch.is_grad_enabled() and logits.requires_grad
    loss = _CrossEntropyFunction.apply(
        flat_logits, flat_labels, logit_scale, softcap, ignore_index, rows_loss, compute_grad
    )
    if reduction == "none":
        return loss.reshape(labels.shape)
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (flat_labels != ignore_index).sum()


class _FusedHeadLossFunction(torch.autograd.Function):
    """Summed loss of ``hidden @ weight.T`` a token chunk at a time; gradients made in forward, scaled in backward."""

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        logit_scale: float | None,
        softcap: float | None,
        ignore_index: int,
        chunk_size: int,
        rows_loss: RowsLoss,
        hidden_grad: bool,
        weight_grad: bool,
    ) -> torch.Tensor:
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if hidden_grad else None
        # Accumulated in the weight's dtype: one rounding per chunk, and no float32 [vocab, hidden] buffer.
        grad_weight = torch.empty_like(weight) if weight_grad else None
        if grad_weight is not None and hidden.shape[0] == 0:
            grad_weight.zero_()
        compute_grad = hidden_grad or weight_grad
        for start in range(0, hidden.shape[0], chunk_size):
            chunk = slice(start, start + chunk_size)
            logits = hidden[chunk] @ weight.T
            # The logit gradient overwrites the chunk's logits: nothing else reads them.
            loss_sum += rows_loss(
                logits, labels[chunk], logit_scale, softcap, ignore_index, logits if compute_grad else None
            ).sum()
            if grad_hidden is not None:
                torch.mm(logits, weight, out=grad_hidden[chunk])
            # The first chunk writes instead of accumulating, which saves zeroing [vocab, hidden].
            if grad_weight is not None and start == 0:
                torch.mm(logits.T, hidden[chunk], out=grad_weight)
            elif grad_weight is not None:
                grad_weight.addmm_(logits.T, hidden[chunk])
            # Freed before the next chunk's logits are allocated, so that one chunk of logits is alive, not two.
            del logits
        ctx.grads = (grad_hidden, grad_weight)
        return loss_sum

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if ctx.grads is None:
            raise RuntimeError(
                "fused_head_loss's gradients were computed in its forward pass and are used up by the first backward; "
                "run the forward again instead of backward(retain_graph=True) twice"
            )
        grad_hidden, grad_weight = ctx.grads
        ctx.grads = None
        if grad_hidden is not None:
            grad_hidden.mul_(grad_loss)
        if grad_weight is not None:
            grad_weight.mul_(grad_loss)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None, None


def fused_head_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    logit_scale: float | None = None,
    softcap: float | None = None,
    chunk_size: int = 1024,
    ignore_index: int = IGNORE_INDEX,
    implementation: Implementation = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of the LM head's logits ``hidden @ weight.T``, without holding [tokens, vocab] logits.

    ``loss_sum = sum_t [logsumexp(z_t) - z_t[label_t]]`` over tokens whose label is not ``ignore_index``, with
    ``z_t = softcap * tanh(s * hidden_t @ weight.T / softcap)`` (``z_t = s * hidden_t @ weight.T`` without softcap,
    ``s = logit_scale`` or 1). For each chunk of ``chunk_size`` tokens, forward computes the chunk's logits, its
    loss and logit gradient ``G`` (written over the logits), then ``grad_hidden[chunk] = G @ weight`` and
    ``grad_weight += G.T @ hidden[chunk]``; backward multiplies those by the incoming gradient. Memory besides the
    inputs: [chunk_size, vocab] logits in the input dtype (plus float32 temporaries of that size in the torch
    implementation), ``grad_hidden`` like ``hidden``, and ``grad_weight`` like ``weight`` only when ``weight``
    requires grad.

    Args:
        hidden: [..., hidden_size] final hidden states (after the final norm), aligned with ``labels``.
        weight: [vocab, hidden_size] LM head weight, same dtype as ``hidden``; frozen or trainable.
        labels: [...] target token ids.
        logit_scale: Multiplier applied to the logits first (Cohere's ``logit_scale``), or None.
        softcap: Final-logit softcapping ``softcap * tanh(logits / softcap)`` (Gemma 2), or None.
        chunk_size: Tokens per chunk; peak extra memory grows as ``chunk_size * vocab``, and GEMMs get slower well
            below a few hundred tokens.
        ignore_index: Label of tokens that carry no loss.
        implementation: "triton" (CUDA tensors), "torch", or "auto": Triton on CUDA when triton is installed, torch
            otherwise.

    Returns:
        ``(loss_sum, num_tokens)``: the float32 summed loss and the int64 number of labelled tokens (both 0-dim
        tensors on ``hidden``'s device), so that the caller can weight tokens exactly.
    """
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"weight {tuple(weight.shape)} must be [vocab, hidden_size] with hidden_size = hidden's last dimension "
            f"{hidden.shape[-1]}"
        )
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must have the same dtype")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels {tuple(labels.shape)} must be shaped like hidden {tuple(hidden.shape)} minus hidden")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be a positive number of tokens, e.g. 1024")
    _check_transforms(logit_scale, softcap)
    rows_loss = _rows_loss(implementation, hidden.device)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    flat_labels = labels.reshape(-1).contiguous()
    grad_enabled = torch.is_grad_enabled()
    loss_sum = _FusedHeadLossFunction.apply(
        flat_hidden,
        weight,
        flat_labels,
        logit_scale,
        softcap,
        ignore_index,
        chunk_size,
        rows_loss,
        grad_enabled and hidden.requires_grad,
        grad_enabled and weight.requires_grad,
    )
    return loss_sum, (flat_labels != ignore_index).sum()


__all__ = ["Implementation", "cross_entropy", "cross_entropy_rows_torch", "fused_head_loss"]
