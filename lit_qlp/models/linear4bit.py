"""A bitsandbytes ``Linear4bit`` with a lean training path: dequantise, matmul, and nothing else.

bitsandbytes' own forward goes through ``matmul_4bit`` → ``MatMul4Bit`` → the ``gemm_4bit`` custom op, whose
Python dispatch and per-call heuristics cost about 0.3 ms of CPU time per call: with seven projections per
decoder layer, an 8B QLoRA step spends more CPU time launching than the GPU spends computing (profiled on an
H200: 2.9 s of GPU work in a 5 s step). Here one autograd function dequantises the weight and multiplies; its
backward dequantises again (the dequantised weight is never saved). Eager, the dequantisation is bitsandbytes'
own kernel; under ``torch.compile`` it is written in torch ops (``dequantize_4bit_torch``), which Inductor fuses
into one kernel inside the compiled decoder layer, so a projection costs no Python at all.

Imported only when QLoRA is used (it imports bitsandbytes).
"""

from __future__ import annotations

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import torch
import torch.nn.functional as F

from lit_qlp.compat.bitsandbytes import quant_state_parts


def dequantize_4bit_torch(packed: torch.Tensor, state: bnbf.QuantState) -> torch.Tensor:
    """The weight ``packed`` holds, in ``state.dtype``, computed with torch ops (bit-identical to bitsandbytes).

    Each byte holds two 4-bit codes, the first in its high nibble; element ``i`` of the flattened weight is
    ``code[q_i] · absmax[i // blocksize]``. With double quantisation the block scales are themselves 8-bit:
    ``absmax[j] = code2[a_j] · absmax2[j // blocksize2] + offset``.
    """
    parts = quant_state_parts(state)
    numel = parts.shape.numel()
    codes = packed.reshape(-1, 1)
    codes = torch.cat((codes >> 4, codes & 15), dim=1).reshape(-1)[:numel]
    absmax = parts.absmax
    if parts.nested is not None:
        scales = parts.nested
        block = torch.arange(absmax.numel(), device=absmax.device) // scales.blocksize
        absmax = scales.code[absmax.int()] * scales.absmax[block] + scales.offset
    block = torch.arange(numel, device=packed.device) // parts.blocksize
    values = parts.code[codes.int()] * absmax.float()[block]
    return values.to(parts.dtype).reshape(parts.shape)


def dequantize_4bit(packed: torch.Tensor, state: bnbf.QuantState) -> torch.Tensor:
    """bitsandbytes' dequantisation kernel when eager; the torch formulation while ``torch.compile`` traces."""
    if torch.compiler.is_compiling():
        return dequantize_4bit_torch(packed, state)
    return bnbf.dequantize_4bit(packed, state)


class _Linear4bitFunction(torch.autograd.Function):
    """``x @ W.T`` with ``W`` dequantised from ``packed`` in the forward and again in the backward.

    The weight is frozen: only ``x`` gets a gradient. Saving ``packed`` (a view of the frozen parameter) instead
    of ``W`` keeps the dequantised copy alive only during each matmul.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, packed: torch.Tensor, state: bnbf.QuantState) -> torch.Tensor:
        ctx.state = state
        ctx.save_for_backward(packed)
        return F.linear(x, dequantize_4bit(packed, state).to(x.dtype))

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (packed,) = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_output @ dequantize_4bit(packed, ctx.state).to(grad_output.dtype)
        return grad_x, None, None


class Linear4bit(bnb.nn.Linear4bit):
    """bitsandbytes' 4-bit linear layer (same parameters, state and state dict) with the lean forward above.

    Like bitsandbytes' layer, it computes in ``compute_dtype`` and returns the input's dtype; the bias stays
    in its own dtype and is cast for the addition.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if self.compute_dtype is not None:
            x = x.to(self.compute_dtype)
        out = _Linear4bitFunction.apply(x, self.weight.data, self.weight.quant_state)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.to(dtype)


__all__ = ["Linear4bit", "dequantize_4bit", "dequantize_4bit_torch"]
