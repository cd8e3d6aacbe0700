"""LoRA: trainable low-rank updates beside the frozen linear layers of the decoder layers, exported as a PEFT
adapter."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn
from typing_extensions import override

from lit_qlp.adapters.experts import fused_expert_tensors
from lit_qlp.adapters.lora import LoraAdapter, lora_tensors
from lit_qlp.adapters.targeting import (
    ALL_LINEAR,
    check_targets,
    expert_target_name,
    linear_names,
    match_expert_targets,
    match_targets,
)
from lit_qlp.formats.hf import copy_tokenizer_files
from lit_qlp.formats.peft import peft_adapter_config, save_peft_adapter
from lit_qlp.methods.base import TrainingMethod, check_adapter_options

if TYPE_CHECKING:
    from lightning.pytorch.callbacks import Callback

    from lit_qlp.bases import BaseFormat
    from lit_qlp.models.pipeline import ModelSource
    from lit_qlp.strategies.stages import StageGroup


class LoRA(TrainingMethod):
    """Low-rank adapters ``y = W x + s · B A x`` on the frozen linear layers (QLoRA with a 4-bit ``model.base``).

    ``A`` starts Kaiming-uniform (per layer, from the run's seed), ``B`` at zero. alpha is the rank, so the scale
    ``s`` is 1 (or ``sqrt(rank)`` with ``use_rslora``): tune the learning rate instead of alpha. Each epoch's export
    is a PEFT adapter (``PeftModel.from_pretrained`` loads it). Installs ``AdapterNormLogging`` (train/norms_* =
    ‖BA‖_F) and, with ``weight_decay``, ``CompositeWeightDecay``.

    Args:
        rank: LoRA rank r.
        dropout: Dropout on the adapters' input.
        target_modules: The linear layers and fused MoE expert tensors of the decoder layers that get adapters:
            "all-linear" (every linear layer and, in an MoE model, every fused expert tensor) or names such as
            ``[q_proj, v_proj]`` (a name selects a layer of that name or ending in ``.name``). An expert tensor is
            named with its module, ``experts.gate_up_proj`` and ``experts.down_proj`` (a bare ``down_proj`` selects
            linear layers only); its LoRA is PEFT's ``target_parameters`` LoRA (one rank-r pair per expert) and
            takes no dropout.
        expert_rank: Rank of the LoRA pairs on fused expert tensors only (one pair per expert, ``r·E·(in + out)``
            parameters per tensor); unset: ``rank``. Their alpha is ``expert_rank``, as ``rank`` is the linear
            pairs' alpha, so both scales are 1 (``sqrt`` of their rank with ``use_rslora``); the export writes it
            as PEFT's ``rank_pattern`` and ``alpha_pattern`` on the ``experts.*`` tensors.
        layers_to_transform: Decoder layers that get adapters, e.g. "0:31", "0:10,20:25,30" or "1,3,5" (inclusive
            ranges); all layers when unset.
        use_rslora: Rank-stabilised LoRA: scale by ``alpha / sqrt(r)`` = ``sqrt(r)`` instead of ``alpha / r`` = 1
            (PEFT's ``use_rslora``; the export says so and PEFT, merge and the GGUF export apply it).
        weight_dtype: Dtype of A and B and of their optimizer state.
        compute_in_weight_dtype: Compute the low-rank path in ``weight_dtype`` (true, as PEFT does: the layer input
            is copied to float32) or in the activations' dtype with A and B cast to it (false: bf16 matmuls and no
            float32 copies, faster; weights, gradients and optimizer state stay in ``weight_dtype``).
        weight_decay: Composite weight decay λ of each pair after every optimizer step, a gradient step on
            ½‖BA‖²_F that shrinks the update ``BA`` itself (``CompositeWeightDecay``); needs float32 weights.
    """

    def __init__(
        self,
        rank: int = 64,
        dropout: float = 0.0,
        target_modules: str | list[str] = ALL_LINEAR,
        expert_rank: int | None = None,
        layers_to_transform: str | None = None,
        use_rslora: bool = False,
        weight_dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        compute_in_weight_dtype: bool = True,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(layers_to_transform)
        check_adapter_options(rank, dropout, weight_dtype, weight_decay)
        if expert_rank is not None and (
            not isinstance(expert_rank, int) or isinstance(expert_rank, bool) or expert_rank < 1
        ):
            raise ValueError(
                f"model.method.expert_rank={expert_rank!r} is not a positive integer; set the rank of the fused "
                "expert tensors' LoRA pairs, or leave it unset for model.method.rank"
            )
        self.rank = rank
        self.expert_rank = rank if expert_rank is None else expert_rank
        self.dropout = dropout
        self.target_modules = target_modules
        self.use_rslora = use_rslora
        self.weight_dtype = weight_dtype
        self.compute_in_weight_dtype = compute_in_weight_dtype
        self.weight_decay = weight_decay

    def targets(self, source: ModelSource) -> list[str]:
        """The leaf names (``q_proj``, ...) of the decoder layers' linear layers that get adapters."""
        decoder_linears = linear_names(source.submodule("model.layers.0"))
        experts = decoder_expert_tensors(source)
        check_targets(decoder_linears, self.target_modules, f"{source.model_dir.name}'s decoder layers", experts)
        return [n.rsplit(".", 1)[-1] for n in match_targets(decoder_linears, self.target_modules)]

    def expert_targets(self, source: ModelSource) -> list[str]:
        """The fused expert tensors that get adapters, as ``experts.gate_up_proj`` names (PEFT's
        ``target_parameters``), in the order the decoder layers hold them; empty for a dense model."""
        chosen = match_expert_targets(decoder_expert_tensors(source), self.target_modules)
        return list(dict.fromkeys(expert_target_name(n) for n in chosen))

    def peft_target_parameters(self, source: ModelSource, adapted: list[int], every_layer: bool) -> list[str]:
        """PEFT's ``target_parameters``: the ``experts.gate_up_proj`` names when every layer is adapted, else the
        qualified tensors of the adapted layers (``model.layers.1.mlp.experts.gate_up_proj``), since PEFT applies
        no ``layers_to_transform`` to ``target_parameters``."""
        targets = self.expert_targets(source)
        if every_layer or not targets:
            return targets
        return [
            f"model.layers.{index}.{name}"
            for index in adapted
            for name in match_expert_targets(fused_expert_tensors(source.submodule(f"model.layers.{index}")), targets)
        ]

    @override
    def check(self, source: ModelSource, base: BaseFormat | None) -> None:
        super().check(source, base)
        self.targets(source)
        experts = self.expert_targets(source)
        if experts and self.dropout:
            raise ValueError(
                f"model.method.dropout={self.dropout}: LoRA on the fused expert tensors {experts} takes no dropout "
                "(it changes the weight, not the input, as PEFT's target_parameters LoRA does); set dropout: 0, or "
                "list target_modules without the experts.* tensors"
            )
        if experts and self.weight_decay:
            raise ValueError(
                f"model.method.weight_decay={self.weight_decay}: the composite decay is applied to linear LoRA pairs "
                f"only, not to the fused expert tensors {experts}; set weight_decay: 0, or list target_modules "
                "without the experts.* tensors"
            )

    @override
    def layer_adapter(self, source: ModelSource, seed: int) -> LoraAdapter:
        return LoraAdapter(
            rank=self.rank,
            alpha=self.rank,
            dropout=self.dropout,
            target_modules=self.targets(source),
            layers=self.layers(source),
            dtype=getattr(torch, self.weight_dtype),
            seed=seed,
            compute_in_input_dtype=not self.compute_in_weight_dtype,
            use_rslora=self.use_rslora,
            target_parameters=self.expert_targets(source),
            expert_rank=self.expert_rank,
            expert_alpha=self.expert_rank,
        )

    @override
    def callbacks(self) -> list[Callback]:
        from lit_qlp.callbacks.adapters import AdapterNormLogging, CompositeWeightDecay

        decay = [CompositeWeightDecay(self.weight_decay)] if self.weight_decay else []
        return [*decay, AdapterNormLogging()]

    @override
    def export(self, directory: Path, layers: list, stages: StageGroup, source: ModelSource) -> None:
        """A PEFT adapter (``adapter_config.json``, ``adapter_model.safetensors``) and the tokenizer files; the
        stages send their tensors to global rank 0, which writes."""
        gathered = stages.gather_from_stages(lora_tensors([f for f in layers if isinstance(f, nn.Module)]))
        if gathered is None:
            return
        tensors = {name: tensor for part in gathered for name, tensor in part.items()}
        adapted = self.layers(source)
        every_layer = len(adapted) == source.quirks.num_layers
        config = peft_adapter_config(
            base_model=str(source.model_dir),
            rank=self.rank,
            alpha=self.rank,
            dropout=self.dropout,
            target_modules=self.targets(source),
            layers_to_transform=None if every_layer else adapted,
            target_parameters=self.peft_target_parameters(source, adapted, every_layer),
            expert_rank=self.expert_rank,
            expert_alpha=self.expert_rank,
        )
        if self.use_rslora:
            config["use_rslora"] = True
        save_peft_adapter(directory, tensors, config)
        copy_tokenizer_files(source.model_dir, directory)


def decoder_expert_tensors(source: ModelSource) -> list[str]:
    """The fused expert tensors of the decoder layers, by their names in a layer (``mlp.experts.gate_up_proj``),
    over all layers (a model may keep some layers dense)."""
    names: dict[str, None] = {}
    for index in range(source.quirks.num_layers):
        names.update(dict.fromkeys(fused_expert_tensors(source.submodule(f"model.layers.{index}"))))
    return list(names)


__all__ = ["LoRA"]
