"""QLoRA's frozen base: the linear layers and fused MoE experts of each decoder layer in bitsandbytes 4-bit,
quantised as they load."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lit_qlp.compat.bitsandbytes import disable_avx512bf16_repack


@dataclass(frozen=True)
class Quantization:
    """How the frozen linear weights are stored (bitsandbytes ``Linear4bit``).

    Attributes:
        quant_type: "nf4" (normal-float 4-bit, the QLoRA default) or "fp4".
        double_quant: Also quantise the per-block scales (about 0.4 bits per weight saved).
        compute_dtype: Dtype the 4-bit weights are dequantised to for each matmul.
        blocksize: Weights per quantisation block.
    """

    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: torch.dtype = torch.bfloat16
    blocksize: int = 64


def import_bitsandbytes():
    """The bitsandbytes module, or a clear error saying how to get it (QLoRA needs it)."""
    try:
        import bitsandbytes
    except ImportError as error:
        raise RuntimeError(
            f"model.base BitsAndBytes4bit needs bitsandbytes, which failed to import ({error}); "
            "install it with `pip install bitsandbytes` or remove model.base (an unquantised base)"
        ) from error
    return bitsandbytes


def check_bitsandbytes(device: torch.device) -> None:
    """Raises a clear error unless bitsandbytes can quantise and multiply 4-bit weights on ``device``.

    Runs one tiny quantise + 4-bit matmul there, which is what fails when bitsandbytes lacks its binary for this
    CUDA version (or is a CPU-only build on a GPU machine).
    """
    bnb = import_bitsandbytes()
    try:
        weight = torch.randn(64, 64, device=device, dtype=torch.float32)
        packed, state = bnb.functional.quantize_4bit(weight, blocksize=64, quant_type="nf4")
        x = torch.randn(2, 64, device=device, dtype=torch.float32)
        bnb.matmul_4bit(x, packed.t(), quant_state=state)
    except Exception as error:
        raise RuntimeError(
            f"model.base BitsAndBytes4bit: bitsandbytes {getattr(bnb, '__version__', '?')} cannot run 4-bit matmuls on "
            f"{device} ({type(error).__name__}: {error}); install a bitsandbytes build with binaries for this "
            f"device (CUDA {torch.version.cuda}) or remove model.base (an unquantised base)"
        ) from error


def quantize_linears(module: nn.Module, quantization: Quantization) -> list[str]:
    """Replaces every ``nn.Linear`` inside ``module`` by a 4-bit ``Linear4bit`` holding the same weight.

    ``Linear4bit`` is bitsandbytes' layer with a lean forward (``lit_qlp.models.linear4bit``): the same
    parameters, quantisation state and results, a fraction of the CPU time per call, and traceable by
    ``torch.compile``.

    Each weight is quantised on the device it lives on and its 16/32-bit copy is released, so the peak is one
    layer's worth of unquantised weights. Biases stay in their dtype. The new layers are frozen.

    Returns:
        The qualified names of the replaced layers.
    """
    import bitsandbytes as bnb

    from lit_qlp.models.linear4bit import Linear4bit

    replaced = []
    for name, linear in [(n, m) for n, m in module.named_modules() if type(m) is nn.Linear]:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name)
        device = linear.weight.device
        layer = Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=quantization.compute_dtype,
            compress_statistics=quantization.double_quant,
            quant_type=quantization.quant_type,
            device="meta",
        )
        layer.weight = bnb.nn.Params4bit(
            linear.weight.data,
            requires_grad=False,
            blocksize=quantization.blocksize,
            compress_statistics=quantization.double_quant,
            quant_type=quantization.quant_type,
            module=layer,
        ).to(device)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.data, requires_grad=False)
        if device.type == "cpu":
            # On CPUs with AVX512-BF16, an eval-mode no-grad forward repacks the weight in place, after which
            # input gradients silently become None: keep the portable layout.
            disable_avx512bf16_repack(layer)
        setattr(parent, child, layer)
        replaced.append(name)
    return replaced


def quantize_layer(module: nn.Module, quantization: Quantization) -> list[str]:
    """Stores the frozen weights of a decoder layer in 4-bit: every ``nn.Linear`` (``quantize_linears``) and every
    fused MoE expert tensor, one expert slice at a time (``lit_qlp.models.experts4bit.quantize_experts``).

    Returns:
        The qualified names of the quantised layers and expert tensors.
    """
    from lit_qlp.models.experts4bit import quantize_experts

    return quantize_linears(module, quantization) + quantize_experts(module, quantization)


__all__ = ["Quantization", "check_bitsandbytes", "import_bitsandbytes", "quantize_layer", "quantize_linears"]
