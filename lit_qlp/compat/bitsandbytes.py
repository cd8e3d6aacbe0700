"""What lit_qlp relies on of bitsandbytes beyond its public API: the fields of a 4-bit ``QuantState`` (read to
dequantise in torch ops) and ``Linear4bit``'s switch for repacking weights on AVX512-BF16 CPUs.

bitsandbytes is imported only to name its version in errors.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

# The QuantState attributes quant_state_parts reads, and those of its nested state (the quantised block scales).
STATE_FIELDS = ("code", "absmax", "blocksize", "shape", "dtype", "nested", "state2", "offset")
NESTED_FIELDS = ("code", "absmax", "blocksize")


def _outdated(name: str, use: str) -> RuntimeError:
    """The error for a bitsandbytes version that lacks ``name``, which lit_qlp uses for ``use``."""
    import bitsandbytes

    return RuntimeError(
        f"bitsandbytes {getattr(bitsandbytes, '__version__', '?')} has no {name} (lit_qlp uses it {use}); "
        "lit_qlp/compat/bitsandbytes.py needs updating for this bitsandbytes version"
    )


class NestedScales(NamedTuple):
    """The 8-bit quantisation of a double-quantised state's block scales:
    ``absmax[j] = code[a_j] · absmax2[j // blocksize] + offset`` for the stored 8-bit codes ``a``.

    Attributes:
        code: The 256 values of the 8-bit codes.
        absmax: The scale of each block of ``blocksize`` codes (``absmax2`` above).
        blocksize: Codes per block.
        offset: Added to every dequantised scale (their mean, subtracted before quantising).
    """

    code: torch.Tensor
    absmax: torch.Tensor
    blocksize: int
    offset: torch.Tensor


class QuantStateParts(NamedTuple):
    """What dequantising a 4-bit weight needs of its ``QuantState``: element ``i`` of the flattened weight is
    ``code[q_i] · absmax[i // blocksize]``.

    Attributes:
        code: The 16 values of the 4-bit codes (nf4 or fp4).
        absmax: The scale of each block of ``blocksize`` weights; 8-bit codes when ``nested`` is set.
        blocksize: Weights per block.
        shape: The unquantised weight's shape.
        dtype: The unquantised weight's dtype.
        nested: How ``absmax`` is quantised (double quantisation), or None when it is stored as it is.
    """

    code: torch.Tensor
    absmax: torch.Tensor
    blocksize: int
    shape: torch.Size
    dtype: torch.dtype
    nested: NestedScales | None


def quant_state_parts(state: Any) -> QuantStateParts:
    """The fields of the bitsandbytes ``QuantState`` of a 4-bit weight that dequantising it needs.

    Traceable by ``torch.compile`` (no graph break).
    """
    for name in STATE_FIELDS:
        if not hasattr(state, name):
            raise _outdated(f"QuantState.{name}", "to dequantise 4-bit weights in torch ops")
    nested = None
    if state.nested:
        inner = state.state2
        for name in NESTED_FIELDS:
            if not hasattr(inner, name):
                raise _outdated(f"QuantState.state2.{name}", "to dequantise double-quantised block scales")
        nested = NestedScales(inner.code, inner.absmax, inner.blocksize, state.offset)
    return QuantStateParts(state.code, state.absmax, state.blocksize, state.shape, state.dtype, nested)


def disable_avx512bf16_repack(layer: nn.Module) -> None:
    """Keeps bitsandbytes ``Linear4bit`` ``layer`` in the portable weight layout on CPUs with AVX512-BF16.

    On those CPUs its eval-mode no-grad forward otherwise repacks the weight in place for a faster kernel
    (``support_avx512bf16_for_cpu``), after which input gradients silently become None.
    """
    if not hasattr(layer, "support_avx512bf16_for_cpu"):
        raise _outdated(
            f"{type(layer).__name__}.support_avx512bf16_for_cpu", "to keep 4-bit weights differentiable on CPU"
        )
    layer.support_avx512bf16_for_cpu = False


__all__ = ["NestedScales", "QuantStateParts", "disable_avx512bf16_repack", "quant_state_parts"]
