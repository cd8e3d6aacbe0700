"""LoRA on fused MoE expert tensors: ``W_e ← W_e + s · B_e A_e`` for every expert ``e`` of a 3-D parameter.

transformers 5.x holds the experts of a layer as 3-D parameters of one experts module (``mlp.experts.gate_up_proj``
[E, 2I, H] and ``mlp.experts.down_proj`` [E, H, I], used as ``F.linear(x, W[e])``; gpt-oss stores them transposed,
[E, H, 2I] and [E, I, H], and says so with ``is_transposed``). ``ExpertLora`` adapts such a parameter as a torch
parametrization, so any experts forward (transformers' eager loop, grouped or batched matmul) that reads the tensor
sees the adapted weight; it chains after any earlier parametrization of the same tensor (the 4-bit base's
dequantisation), taking whatever that yields as ``W``. lit_qlp's own experts forward (``lit_qlp.models.experts``)
reads the pair apart instead and adds ``s · (x A_eᵀ) B_eᵀ`` to each row, which is the same product without forming
the [E, out, in] update.

The factors are stored as PEFT's ``ParamWrapper`` stores them, so they save under PEFT's keys unchanged and the
first step equals PEFT's ``target_parameters`` LoRA: ``lora_A`` [r·E, in] and ``lora_B`` [out, r·E], where the
rows of A are grouped by expert (``A.view(E, r, in)``) but the columns of B are interleaved (``B.view(out, r, E)``,
expert last). See ``lit_qlp.formats.peft.expert_factors``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

from lit_qlp.formats.peft import expert_factors, lora_scaling


class ExpertLora(nn.Module):
    """Parametrization ``W ↦ W + s · B_e A_e`` of a fused expert tensor, all experts in one batched product.

    ``W`` is [E, out, in] (``transposed`` false) or [E, in, out] (``transposed``: gpt-oss). The update is formed in
    ``W``'s dtype (a parametrization may not change it), as PEFT does; ``lora_A`` and ``lora_B`` stay in ``dtype``.

    Args:
        num_experts: E.
        in_features: Input size of each expert's matrix.
        out_features: Output size of each expert's matrix.
        rank: r of each expert's pair.
        alpha: The update is scaled by ``alpha / rank`` (``alpha / sqrt(rank)`` with ``use_rslora``).
        transposed: Whether ``W`` is stored [E, in, out].
        dtype: Dtype of ``lora_A`` and ``lora_B``.
        device: Where they live (the device of the adapted tensor).
        generator: RNG of ``lora_A``'s Kaiming-uniform initialisation (``lora_B`` starts at zero).
        use_rslora: Rank-stabilised scaling.
        peft_nesting: How many ``base_layer.`` PEFT puts before this pair's keys: PEFT nests one wrapper per
            targeted tensor of a module in registration order, so every targeted tensor registered after this one
            adds one.
    """

    def __init__(
        self,
        num_experts: int,
        in_features: int,
        out_features: int,
        rank: int,
        alpha: float,
        transposed: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
        use_rslora: bool = False,
        peft_nesting: int = 0,
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.transposed = transposed
        self.peft_nesting = peft_nesting
        self.scaling = lora_scaling(alpha, rank, use_rslora)
        self.lora_A = nn.Parameter(torch.empty(rank * num_experts, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank * num_experts, device=device, dtype=dtype))
        with torch.no_grad():
            # PEFT initialises its lora_A (an nn.Linear of in -> r·E) Kaiming-uniform over the whole [r·E, in] matrix.
            weight = torch.empty(self.lora_A.shape, dtype=torch.float32)
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
            self.lora_A.copy_(weight)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-expert ``(A_e, B_e)``: [E, r, in] and [E, out, r] (views of the stored factors)."""
        return expert_factors(self.lora_A, self.lora_B, self.num_experts)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` plus the scaled update, as one ``baddbmm`` over the experts."""
        a, b = self.factors()
        a, b = a.to(weight.dtype), b.to(weight.dtype)
        lhs, rhs = (a.transpose(1, 2), b.transpose(1, 2)) if self.transposed else (b, a)
        with torch.autocast(device_type=weight.device.type, enabled=False):
            return torch.baddbmm(weight, lhs, rhs, alpha=self.scaling)

    @torch.no_grad()
    def update_norm(self) -> torch.Tensor:
        """‖B_e A_e‖_F over all experts together (unscaled, as ``LoraLinear.update_norm``):
        ``sqrt(Σ_e Σ (B_eᵀB_e) ∘ (A_e A_eᵀ))``, in rank space (no [E, out, in] product is formed); 0-dim."""
        a, b = self.factors()
        a, b = a.float(), b.float()
        return ((b.transpose(1, 2) @ b) * (a @ a.transpose(1, 2))).sum().clamp(min=0).sqrt()


class ParametrizationCache:
    """Forward hooks that hold ``torch.nn.utils.parametrize.cached()`` open around one module's forward.

    Inside, every read of a parametrized tensor (an eager experts loop reads ``gate_up_proj`` once per active
    expert) reuses one evaluation of its parametrizations: the 4-bit dequantisation and the LoRA update run once
    per forward. ``cached()`` nests, so a base format that holds it open as well does no harm.
    """

    def __init__(self) -> None:
        self._open: list = []

    def before(self, module: nn.Module, args) -> None:
        """Forward pre-hook: opens a cache."""
        context = parametrize.cached()
        context.__enter__()
        self._open.append(context)

    def after(self, module: nn.Module, args, output) -> None:
        """Forward hook (also run when the forward raises): closes the cache ``before`` opened."""
        self._open.pop().__exit__(None, None, None)

    def attach(self, module: nn.Module) -> None:
        """Registers both hooks on ``module``."""
        module.register_forward_pre_hook(self.before)
        module.register_forward_hook(self.after, always_call=True)


def fused_expert_tensors(module: nn.Module) -> dict[str, torch.Size]:
    """Qualified names and shapes of the fused expert tensors inside ``module``: its 3-D weights, parametrized or
    not (a parametrized tensor is evaluated once, under no_grad, for its shape)."""
    found: dict[str, torch.Size] = {}
    for name, sub in module.named_modules():
        if "parametrizations" in name.split("."):
            continue
        prefix = f"{name}." if name else ""
        for param_name, param in sub.named_parameters(recurse=False):
            if param.dim() == 3:
                found[prefix + param_name] = param.shape
        if parametrize.is_parametrized(sub):
            with torch.no_grad():
                for tensor_name in sub.parametrizations:
                    shape = getattr(sub, tensor_name).shape
                    if len(shape) == 3:
                        found[prefix + tensor_name] = shape
    return found


def add_expert_lora(
    module: nn.Module,
    tensor_name: str,
    shape: torch.Size,
    rank: int,
    alpha: float,
    dtype: torch.dtype,
    generator: torch.Generator | None,
    use_rslora: bool = False,
    peft_nesting: int = 0,
) -> ExpertLora:
    """Registers an ``ExpertLora`` on ``module.<tensor_name>`` after its existing parametrizations.

    The orientation comes from the module, as PEFT reads it: ``is_transposed`` (gpt-oss) means [E, in, out]. The
    frozen original stays frozen; only ``lora_A`` and ``lora_B`` train.

    Args:
        module: The experts module.
        tensor_name: Its 3-D tensor (``gate_up_proj``).
        shape: That tensor's shape, as the forward sees it.
        rank: See ``ExpertLora``.
        alpha: See ``ExpertLora``.
        dtype: See ``ExpertLora``.
        generator: See ``ExpertLora``.
        use_rslora: See ``ExpertLora``.
        peft_nesting: See ``ExpertLora``.
    """
    transposed = bool(getattr(module, "is_transposed", False))
    num_experts, first, second = shape
    in_features, out_features = (first, second) if transposed else (second, first)
    if parametrize.is_parametrized(module, tensor_name):
        device = module.parametrizations[tensor_name].original.device
    else:
        device = getattr(module, tensor_name).device
    lora = ExpertLora(
        num_experts,
        in_features,
        out_features,
        rank,
        alpha,
        transposed=transposed,
        dtype=dtype,
        device=device,
        generator=generator,
        use_rslora=use_rslora,
        peft_nesting=peft_nesting,
    )
    parametrize.register_parametrization(module, tensor_name, lora)
    return lora


def expert_loras(module: nn.Module) -> Iterator[tuple[str, str, ExpertLora]]:
    """``(module name, tensor name, ExpertLora)`` for every expert LoRA inside ``module``."""
    for name, sub in module.named_modules():
        if "parametrizations" in name.split(".") or not parametrize.is_parametrized(sub):
            continue
        for tensor_name, chain in sub.parametrizations.items():
            for step in chain:
                if isinstance(step, ExpertLora):
                    yield name, tensor_name, step


__all__ = [
    "ExpertLora",
    "ParametrizationCache",
    "add_expert_lora",
    "expert_loras",
    "fused_expert_tensors",
]
