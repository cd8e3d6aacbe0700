"""LoRA: a trainable low-rank update ``B A`` beside each targeted frozen linear layer, saved in PEFT's format."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lit_qlp.adapters.targeting import ALL_LINEAR, linear_names, match_targets

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


class LoraLinear(nn.Module):
    """``y = base(x) + scale · B(A(dropout(x)))`` with ``A`` [r, in] and ``B`` [out, r] trainable.

    Parameter names match PEFT's (``base_layer``, ``lora_A.weight``, ``lora_B.weight``), so the adapter saves
    under PEFT's keys. ``A`` starts Kaiming-uniform (as in PEFT), ``B`` at zero, so training starts at the base.

    Args:
        base_layer: The frozen linear layer.
        rank: Rank r of the update.
        alpha: The update is scaled by ``alpha / rank``.
        dropout: Dropout probability on the adapter's input (no copy is made when 0).
        dtype: Dtype of ``A`` and ``B``; the input is cast to it and the update cast back.
        generator: RNG for ``A``'s initialisation (seeded per layer so that every pipeline layout starts alike).
        compute_in_input_dtype: Compute the low-rank path in the input's dtype with ``A`` and ``B`` cast to it
            (bf16 matmuls, no float32 copy of the input) instead of in ``dtype``; the weights, their gradients
            and the optimizer state stay in ``dtype``.
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        dtype: torch.dtype = torch.float32,
        generator: torch.Generator | None = None,
        compute_in_input_dtype: bool = False,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.compute_in_input_dtype = compute_in_input_dtype
        device = base_layer.weight.device
        self.lora_A = nn.Linear(base_layer.in_features, rank, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(rank, base_layer.out_features, bias=False, device=device, dtype=dtype)
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        with torch.no_grad():
            weight = torch.empty(self.lora_A.weight.shape, dtype=torch.float32)
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
            self.lora_A.weight.copy_(weight)
            nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.compute_in_input_dtype:
            a, b = self.lora_A.weight.to(x.dtype), self.lora_B.weight.to(x.dtype)
            update = F.linear(F.linear(self.dropout(x), a), b)
        else:
            update = self.lora_B(self.lora_A(self.dropout(x).to(self.lora_A.weight.dtype)))
        if self.scaling != 1.0:  # alpha = r (lit-qlp's default): no multiply by one
            update = update * self.scaling
        return out + update.to(out.dtype)


def layer_generator(seed: int, index: int) -> torch.Generator:
    """The initialisation RNG of decoder layer ``index``: the same whichever stage builds the layer."""
    return torch.Generator().manual_seed((seed * 100_003 + index) % 2**63)


@torch.no_grad()
def composite_decay_(lora: LoraLinear, lr: float, weight_decay: float) -> None:
    """One gradient step of ``weight_decay · ½‖BA‖²_F`` on ``A`` and ``B``, in place (float32 weights).

    With ``W = BA``: ``∂/∂A = BᵀW`` and ``∂/∂B = WAᵀ``; both gradients are taken before either factor moves.
    """
    a, b = lora.lora_A.weight, lora.lora_B.weight
    product = b @ a
    grad_a = b.T @ product
    grad_b = product @ a.T
    a.sub_(grad_a, alpha=lr * weight_decay)
    b.sub_(grad_b, alpha=lr * weight_decay)


@torch.no_grad()
def _update_norm(lora: LoraLinear) -> torch.Tensor:
    a, b = lora.lora_A.weight.float(), lora.lora_B.weight.float()
    return ((b.T @ b) * (a @ a.T)).sum().clamp(min=0).sqrt()


def update_norm(lora: LoraLinear) -> float:
    """‖BA‖_F of a LoRA pair, as ``sqrt(Σ (BᵀB) ∘ (AAᵀ))`` in rank space (the out × in product is never formed)."""
    return float(_update_norm(lora))


def update_norms(loras: Sequence[LoraLinear]) -> list[float]:
    """``update_norm`` of each LoRA pair, read back from the device in one transfer (one synchronisation)."""
    if not loras:
        return []
    return torch.stack([_update_norm(lora) for lora in loras]).tolist()


class LoraAdapter:
    """Adds ``LoraLinear`` to the targeted linear layers of the selected decoder layers.

    Called as ``adapter(layer, layer_index, prefix)`` by each decoder pipeline layer as it is built; returns the
    layer (modified in place).

    Args:
        rank: LoRA rank r.
        alpha: Scale numerator; the update is scaled by ``alpha / rank``.
        dropout: Dropout on the adapter input.
        target_modules: Module names (``["q_proj", "v_proj"]``) or "all-linear".
        layers: Indices of the decoder layers that get adapters.
        dtype: Dtype of the LoRA weights.
        seed: Base seed of the per-layer initialisation RNG.
        compute_in_input_dtype: See ``LoraLinear``.
    """

    def __init__(
        self,
        rank: int,
        alpha: float,
        dropout: float,
        target_modules: str | Sequence[str],
        layers: Iterable[int],
        dtype: torch.dtype,
        seed: int,
        compute_in_input_dtype: bool = False,
    ) -> None:
        self.compute_in_input_dtype = compute_in_input_dtype
        self.rank = rank
        self.alpha = alpha
        self.dropout = dropout
        self.target_modules = target_modules
        self.layers = set(layers)
        self.dtype = dtype
        self.seed = seed

    def __call__(self, layer: nn.Module, index: int, prefix: str) -> nn.Module:
        if index not in self.layers:
            return layer
        generator = layer_generator(self.seed, index)
        for name in match_targets(linear_names(layer), self.target_modules):
            parent_name, _, child = name.rpartition(".")
            parent = layer.get_submodule(parent_name)
            lora = LoraLinear(
                getattr(parent, child),
                self.rank,
                self.alpha,
                self.dropout,
                self.dtype,
                generator,
                compute_in_input_dtype=self.compute_in_input_dtype,
            )
            setattr(parent, child, lora)
        return layer


def lora_tensors(layers: Iterable[nn.Module]) -> dict[str, torch.Tensor]:
    """The LoRA weights of pipeline layers under PEFT's keys (``base_model.model.<hf name>.lora_A.weight``).

    Each layer must have an ``hf_prefix`` (its name in the HF model) and hold its HF module as one child.
    """
    out: dict[str, torch.Tensor] = {}
    for layer in layers:
        for name, module in layer.named_modules():
            if isinstance(module, LoraLinear):
                hf_name = layer.hf_prefix + "." + name.split(".", 1)[1]
                for part in ("lora_A", "lora_B"):
                    weight = getattr(module, part).weight
                    out[f"{PEFT_PREFIX}{hf_name}.{part}.weight"] = weight.detach().to("cpu", copy=True).contiguous()
    return out


def peft_adapter_config(
    base_model: str,
    rank: int,
    alpha: float,
    dropout: float,
    target_modules: Sequence[str],
    layers_to_transform: Sequence[int] | None,
) -> dict:
    """A PEFT ``adapter_config.json`` for a LoRA adapter."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": sorted(set(target_modules)),
        "layers_to_transform": list(layers_to_transform) if layers_to_transform is not None else None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "inference_mode": True,
    }


def save_peft_adapter(directory: Path, tensors: dict[str, torch.Tensor], config: dict) -> None:
    """Writes ``adapter_model.safetensors`` and ``adapter_config.json`` into ``directory``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


__all__ = [
    "ALL_LINEAR",
    "LoraAdapter",
    "LoraLinear",
    "composite_decay_",
    "update_norm",
    "update_norms",
    "lora_tensors",
    "peft_adapter_config",
    "save_peft_adapter",
]
