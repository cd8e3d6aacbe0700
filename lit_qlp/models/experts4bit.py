"""Fused MoE experts in bitsandbytes 4-bit: each expert's slice quantised as a linear weight would be, every expert
dequantised at once inside the experts' forward.

transformers 5.x holds the experts of a layer as 3-D parameters (``mlp.experts.gate_up_proj`` [E, 2I, H] and
``down_proj`` [E, H, I]; gpt-oss stores them transposed), multiplied by the experts implementation the config names
(lit_qlp's ``lit_qlp.models.experts``: grouped matmuls over tokens sorted by expert). Each such parameter becomes a
torch parametrization (``torch.nn.utils.parametrize``) whose ``original`` is the packed 4-bit data of every expert,
[E, bytes] in uint8 and frozen; evaluating it dequantises all experts into the [E, ., .] tensor in the compute dtype,
with one bitsandbytes kernel call. The experts forward reads each weight once per forward, so each is dequantised
once per forward (and once more when activation checkpointing recomputes the layer in the backward pass); no
dequantised copy outlives the layer's computation. A later parametrization on the same tensor chains after this one
and receives the dequantised weight (LoRA on the experts is one, which lit_qlp's forward applies to the activations
instead, after this dequantisation).

Imported only when QLoRA is used (it imports bitsandbytes).
"""

from __future__ import annotations

import math

import bitsandbytes.functional as bnbf
import torch
from torch import nn
from torch.nn.utils import parametrize

from lit_qlp.models.linear4bit import dequantize_4bit
from lit_qlp.models.quantize import Quantization

NESTED_BLOCKSIZE = 256
"""bitsandbytes' blocksize for the block scales under double quantisation (shapes made on the meta device)."""


def expert_block_scales(
    codes: torch.Tensor, code: torch.Tensor, scales: torch.Tensor, blocksize: int, offset: torch.Tensor
) -> torch.Tensor:
    """The block scales of every expert from their double-quantised form, [E, blocks] in float32.

    Expert ``e``'s scale of block ``j`` is ``code[codes[e, j]] · scales[e, j // blocksize] + offset[e]``, which is
    what bitsandbytes computes for each expert's own ``QuantState`` (``dequantize_blockwise``, then ``+= offset``).

    Args:
        codes: The 8-bit codes of the block scales, [E, blocks] in uint8.
        code: The 256 values of the 8-bit codes.
        scales: The scale of each group of ``blocksize`` codes, [E, ceil(blocks / blocksize)].
        blocksize: Codes per group.
        offset: Each expert's mean block scale, subtracted before quantising, [E].
    """
    group = torch.arange(codes.shape[1], device=codes.device) // blocksize
    return code[codes.int()] * scales[:, group] + offset[:, None]


class Experts4bit(nn.Module):
    """A parametrization of one fused expert tensor: the packed 4-bit data of its E slices -> [E, ., .] in ``dtype``
    (``compute_dtype``).

    Slice ``e`` was quantised on its own by bitsandbytes' ``quantize_4bit`` (its own block scales and, with double
    quantisation, its own second-level scales and offset), so its dequantisation equals bitsandbytes' for that 2-D
    weight. The packed data of each slice is padded to whole blocks, so that the E slices dequantise together as one
    tensor of E·blocks blocks; the padding is dropped afterwards. The statistics are buffers of this module, frozen.

    Args:
        shape: The fused tensor's shape, [E, ., .].
        dtype: The dtype the tensor is dequantised to (the compute dtype).
        quant_type: "nf4" or "fp4".
        blocksize: Weights per quantisation block.
        code: The 16 values of the 4-bit codes.
        absmax: Each slice's block scales, [E, blocks]: float32, or uint8 codes under double quantisation.
        nested: Under double quantisation, the 256 code values, the second-level scales [E, groups], the codes per
            group and the offsets [E]; None otherwise.
    """

    def __init__(
        self,
        shape: torch.Size,
        dtype: torch.dtype,
        quant_type: str,
        blocksize: int,
        code: torch.Tensor,
        absmax: torch.Tensor,
        nested: tuple[torch.Tensor, torch.Tensor, int, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.shape = torch.Size(shape)
        self.compute_dtype = dtype
        self.quant_type = quant_type
        self.blocksize = blocksize
        self.register_buffer("code", code)
        self.register_buffer("absmax", absmax)
        nested_code, nested_absmax, self.nested_blocksize, nested_offset = nested or (None, None, 0, None)
        self.register_buffer("nested_code", nested_code)
        self.register_buffer("nested_absmax", nested_absmax)
        self.register_buffer("nested_offset", nested_offset)

    def extra_repr(self) -> str:
        """The tensor's shape and format, shown by ``print(module)``."""
        nested = ", double_quant" if self.nested_code is not None else ""
        return f"{tuple(self.shape)}, {self.quant_type}{nested}, blocksize={self.blocksize}, dtype={self.compute_dtype}"

    def block_scales(self) -> torch.Tensor:
        """Every slice's block scales, [E, blocks] in float32."""
        if self.nested_code is None:
            return self.absmax
        return expert_block_scales(
            self.absmax, self.nested_code, self.nested_absmax, self.nested_blocksize, self.nested_offset
        )

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        """The dequantised tensor, ``self.shape`` in ``self.compute_dtype``, from the packed data [E, bytes]."""
        scales = self.block_scales()
        experts, blocks = scales.shape
        # Flat: bitsandbytes' CPU kernel (0.50) misplaces blocks in a 2-D shape whose last dimension is not a
        # multiple of the blocksize; a flat tensor dequantises correctly on every device.
        state = bnbf.QuantState(
            absmax=scales.reshape(-1),
            shape=torch.Size((experts * blocks * self.blocksize,)),
            code=self.code,
            blocksize=self.blocksize,
            quant_type=self.quant_type,
            dtype=self.compute_dtype,
        )
        values = dequantize_4bit(packed.reshape(-1, 1), state).reshape(experts, -1)
        per_expert = self.shape[1:].numel()
        if values.shape[1] != per_expert:
            values = values[:, :per_expert]  # the padding to whole blocks
        return values.reshape(self.shape)


def quantize_expert_slices(weight: torch.Tensor, quantization: Quantization) -> tuple[torch.Tensor, Experts4bit]:
    """Each slice ``weight[e]`` quantised by bitsandbytes as a linear weight would be, on the weight's device.

    On the meta device only the shapes are made (for tools that load trained tensors into a skeleton afterwards).

    Returns:
        The packed data of every slice, [E, blocks · blocksize / 2] in uint8, and the parametrization that
        dequantises it to ``weight``'s shape in ``quantization.compute_dtype``.
    """
    experts, blocksize = weight.shape[0], quantization.blocksize
    blocks = math.ceil(weight[0].numel() / blocksize)
    packed = torch.zeros(experts, blocks * blocksize // 2, dtype=torch.uint8, device=weight.device)
    if weight.device.type == "meta":
        absmax_dtype = torch.uint8 if quantization.double_quant else torch.float32
        absmax = torch.empty(experts, blocks, dtype=absmax_dtype, device="meta")
        code = torch.empty(16, device="meta")
        nested = None
        if quantization.double_quant:
            groups = math.ceil(blocks / NESTED_BLOCKSIZE)
            scales, offset = torch.empty(experts, groups, device="meta"), torch.empty(experts, device="meta")
            nested = (torch.empty(256, device="meta"), scales, NESTED_BLOCKSIZE, offset)
    else:
        states = []
        for e in range(experts):
            data, state = bnbf.quantize_4bit(
                weight[e],
                blocksize=blocksize,
                compress_statistics=quantization.double_quant,
                quant_type=quantization.quant_type,
            )
            packed[e, : data.numel()] = data.reshape(-1)
            states.append(state)
        absmax = torch.stack([s.absmax for s in states])
        code = states[0].code
        nested = None
        if quantization.double_quant:
            inner = states[0].state2
            nested = (
                inner.code,
                torch.stack([s.state2.absmax for s in states]),
                inner.blocksize,
                torch.stack([s.offset.reshape(()) for s in states]).float(),
            )
    dequantize = Experts4bit(
        weight.shape, quantization.compute_dtype, quantization.quant_type, blocksize, code, absmax, nested
    )
    return packed, dequantize


def fused_expert_parameters(module: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """The fused expert tensors inside ``module``: its 3-D floating-point parameters (one 2-D slice per expert).

    Returns:
        ``(qualified name, owning module, parameter name)`` of each, parameters already parametrized left out.
    """
    found = []
    for module_name, owner in module.named_modules():
        if isinstance(owner, parametrize.ParametrizationList):
            continue
        for name, param in owner.named_parameters(recurse=False):
            if param.dim() == 3 and param.is_floating_point() and not parametrize.is_parametrized(owner, name):
                found.append((f"{module_name}.{name}".lstrip("."), owner, name))
    return found


def quantize_experts(module: nn.Module, quantization: Quantization) -> list[str]:
    """Stores every fused expert tensor inside ``module`` in 4-bit, one expert slice at a time, frozen.

    Each tensor's parameter is replaced by its packed data (``original`` of an ``Experts4bit`` parametrization), and
    its 16/32-bit copy is released, so the peak is one layer's worth of unquantised weights. The router and biases
    are 1-D or 2-D and stay in their dtype.

    Returns:
        The qualified names of the quantised tensors.
    """
    names = []
    for name, owner, param_name in fused_expert_parameters(module):
        packed, dequantize = quantize_expert_slices(getattr(owner, param_name).data, quantization)
        setattr(owner, param_name, nn.Parameter(packed, requires_grad=False))
        parametrize.register_parametrization(owner, param_name, dequantize, unsafe=True)
        names.append(name)
    return names


__all__ = [
    "Experts4bit",
    "expert_block_scales",
    "fused_expert_parameters",
    "quantize_expert_slices",
    "quantize_experts",
]
