"""LoRA: a trainable low-rank update ``B A`` beside each targeted frozen linear layer, saved in PEFT's format."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lit_qlp.adapters.experts import ParametrizationCache, add_expert_lora, expert_loras, fused_expert_tensors
from lit_qlp.adapters.targeting import ALL_LINEAR, linear_names, match_targets
from lit_qlp.formats.peft import (
    BASE_LAYER,
    FUSED_EXPERT_ORDER,
    PEFT_PREFIX,
    lora_scaling,
)


class LoraLinear(nn.Module):
    """``y = base(x) + scale · B(A(dropout(x)))`` with ``A`` [r, in] and ``B`` [out, r] trainable.

    Parameter names match PEFT's (``base_layer``, ``lora_A.weight``, ``lora_B.weight``), so the adapter saves
    under PEFT's keys. ``A`` starts Kaiming-uniform (as in PEFT), ``B`` at zero, so training starts at the base.

    Args:
        base_layer: The frozen linear layer.
        rank: Rank r of the update.
        alpha: The update is scaled by ``alpha / rank`` (``alpha / sqrt(rank)`` with ``use_rslora``).
        dropout: Dropout probability on the adapter's input (no copy is made when 0).
        dtype: Dtype of ``A`` and ``B``; the input is cast to it and the update cast back.
        generator: RNG for ``A``'s initialisation (seeded per layer so that every pipeline layout starts alike).
        compute_in_input_dtype: Compute the low-rank path in the input's dtype with ``A`` and ``B`` cast to it
            (bf16 matmuls, no float32 copy of the input) instead of in ``dtype``; the weights, their gradients
            and the optimizer state stay in ``dtype``.
        use_rslora: Rank-stabilised LoRA: scale by ``alpha / sqrt(rank)`` (PEFT's ``use_rslora``).
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
        use_rslora: bool = False,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.compute_in_input_dtype = compute_in_input_dtype
        device = base_layer.weight.device
        self.lora_A = nn.Linear(base_layer.in_features, rank, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(rank, base_layer.out_features, bias=False, device=device, dtype=dtype)
        self.scaling = lora_scaling(alpha, rank, use_rslora)
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

    @torch.no_grad()
    def update_norm(self) -> torch.Tensor:
        """‖BA‖_F as ``sqrt(Σ (BᵀB) ∘ (AAᵀ))`` in rank space (the out × in product is never formed); 0-dim."""
        a, b = self.lora_A.weight.float(), self.lora_B.weight.float()
        return ((b.T @ b) * (a @ a.T)).sum().clamp(min=0).sqrt()


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


def update_norm(lora: LoraLinear) -> float:
    """‖BA‖_F of a LoRA pair (see ``LoraLinear.update_norm``)."""
    return float(lora.update_norm())


class LoraAdapter:
    """Adds ``LoraLinear`` to the targeted linear layers of the selected decoder layers, and ``ExpertLora``
    (``lit_qlp.adapters.experts``) to their targeted fused expert tensors.

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
        use_rslora: See ``LoraLinear``.
        target_parameters: Fused expert tensors that get LoRA (``experts.gate_up_proj``; a name selects a tensor of
            that qualified name or ending in ``.name``). They take no dropout; PEFT's key nesting follows
            ``FUSED_EXPERT_ORDER``.
        expert_rank: Rank of the pairs on fused expert tensors; None: ``rank``.
        expert_alpha: Their scale numerator; None: ``alpha``.
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
        use_rslora: bool = False,
        target_parameters: Sequence[str] = (),
        expert_rank: int | None = None,
        expert_alpha: float | None = None,
    ) -> None:
        self.target_parameters = list(target_parameters)
        self.expert_rank = rank if expert_rank is None else expert_rank
        self.expert_alpha = alpha if expert_alpha is None else expert_alpha
        self.compute_in_input_dtype = compute_in_input_dtype
        self.use_rslora = use_rslora
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
                use_rslora=self.use_rslora,
            )
            setattr(parent, child, lora)
        if self.target_parameters:
            self.add_expert_loras(layer, generator)
        return layer

    def add_expert_loras(self, layer: nn.Module, generator: torch.Generator) -> None:
        """Registers ``ExpertLora`` on the targeted fused expert tensors of ``layer`` (after any parametrization the
        base format put there), and holds ``parametrize.cached()`` open around each adapted experts module's
        forward so that its parametrized tensors are evaluated once per forward."""
        tensors = fused_expert_tensors(layer)
        chosen = match_targets(tensors, self.target_parameters)
        by_module: dict[str, list[str]] = {}
        for name in chosen:
            module_name, _, tensor_name = name.rpartition(".")
            by_module.setdefault(module_name, []).append(tensor_name)
        for module_name, names in by_module.items():
            unknown = sorted(set(names) - set(FUSED_EXPERT_ORDER))
            if unknown:
                raise ValueError(
                    f"{module_name}.{unknown[0]} is not a fused expert tensor that PEFT's format is known for here "
                    f"({', '.join(FUSED_EXPERT_ORDER)}); remove it from model.method.target_modules"
                )
            names.sort(key=FUSED_EXPERT_ORDER.index)
            module = layer.get_submodule(module_name)
            for position, tensor_name in enumerate(names):
                add_expert_lora(
                    module,
                    tensor_name,
                    tensors[f"{module_name}.{tensor_name}"],
                    self.expert_rank,
                    self.expert_alpha,
                    self.dtype,
                    generator,
                    use_rslora=self.use_rslora,
                    peft_nesting=len(names) - 1 - position,
                )
            ParametrizationCache().attach(module)


def lora_tensors(layers: Iterable[nn.Module]) -> dict[str, torch.Tensor]:
    """The LoRA weights of pipeline layers under PEFT's keys (``base_model.model.<hf name>.lora_A.weight``; a fused
    expert tensor's pair under its experts module, nested as PEFT nests them: ``...experts.base_layer.lora_A.weight``
    for ``gate_up_proj`` when ``down_proj`` is targeted too).

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
        for module_name, _, lora in expert_loras(layer):
            hf_name = layer.hf_prefix + "." + module_name.split(".", 1)[1] + "." + BASE_LAYER * lora.peft_nesting
            for part in ("lora_A", "lora_B"):
                weight = getattr(lora, part)
                out[f"{PEFT_PREFIX}{hf_name}{part}.weight"] = weight.detach().to("cpu", copy=True).contiguous()
    return out


__all__ = [
    "ALL_LINEAR",
    "LoraAdapter",
    "LoraLinear",
    "composite_decay_",
    "lora_scaling",
    "update_norm",
    "lora_tensors",
]
