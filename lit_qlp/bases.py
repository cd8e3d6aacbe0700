"""How the frozen base is held: the format of the decoder layers' frozen weights, one of the two choices of a run.

``CausalLMModule(base=None)`` keeps the base in the model's ``dtype``; ``base=BitsAndBytes4bit(...)`` stores the
linear weights and fused MoE experts of every decoder layer in bitsandbytes 4-bit as each stage loads them (QLoRA).
Every adapter method (LoRA, Control Adapters) trains on either; full fine-tuning needs the unquantised base. In YAML::

    model:
      base:
        class_path: lit_qlp.bases.BitsAndBytes4bit
        init_args: {quant_type: nf4, double_quant: true}
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Literal

import torch
from torch import nn

from lit_qlp.models.quantize import Quantization, check_bitsandbytes, import_bitsandbytes, quantize_layer


class BaseFormat(ABC):
    """How the frozen weights of the decoder layers are stored and multiplied."""

    @abstractmethod
    def convert(self, layer: nn.Module, compute_dtype: torch.dtype) -> None:
        """Converts the frozen weights of one loaded decoder layer, in place, as its stage builds it.

        Args:
            layer: The HF decoder layer, with its weights loaded in ``compute_dtype``.
            compute_dtype: The activations' dtype, in which the converted weights are multiplied.
        """

    def check_device(self, device: torch.device) -> None:
        """Raises a clear error before training when this format cannot run on ``device``."""


class BitsAndBytes4bit(BaseFormat):
    """The decoder layers' linear weights and fused MoE experts frozen in bitsandbytes 4-bit (QLoRA), quantised as
    each stage loads them, never more than one layer unquantised; embeddings, norms, MoE routers, biases and the LM
    head stay in ``dtype``. Each matmul dequantises to the model's ``dtype``; the experts of a layer are dequantised
    together, once per forward, for transformers' grouped expert matmul (``lit_qlp.models.experts4bit``).

    Args:
        quant_type: The 4-bit format: "nf4" (normal-float, the QLoRA default) or "fp4".
        double_quant: Also quantise the per-block scales (saves about 0.4 bits per weight).
    """

    blocksize = 64

    def __init__(self, quant_type: Literal["nf4", "fp4"] = "nf4", double_quant: bool = True) -> None:
        if quant_type not in ("nf4", "fp4"):
            raise ValueError(f"model.base.quant_type={quant_type!r} must be 'nf4' or 'fp4'")
        import_bitsandbytes()
        self.quant_type = quant_type
        self.double_quant = double_quant

    def __repr__(self) -> str:
        return f"BitsAndBytes4bit(quant_type={self.quant_type!r}, double_quant={self.double_quant})"

    def quantization(self, compute_dtype: torch.dtype) -> Quantization:
        """The layer-level record of this format for weights multiplied in ``compute_dtype``."""
        return Quantization(self.quant_type, self.double_quant, compute_dtype, self.blocksize)

    def convert(self, layer: nn.Module, compute_dtype: torch.dtype) -> None:
        quantize_layer(layer, self.quantization(compute_dtype))

    def check_device(self, device: torch.device) -> None:
        check_bitsandbytes(device)


__all__ = ["BaseFormat", "BitsAndBytes4bit"]
