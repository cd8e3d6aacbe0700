"""Control Adapters: a multiplicative, two-directional change of each selected decoder layer's residual update,
steered by the datasets' control classes."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn
from typing_extensions import override

from lit_qlp.adapters.control import ControlAdapter, ControlAdapterLayer
from lit_qlp.formats.control import control_adapter_config
from lit_qlp.formats.hf import copy_tokenizer_files
from lit_qlp.formats.peft import PEFT_PREFIX, save_peft_adapter
from lit_qlp.methods.base import TrainingMethod, check_adapter_options

if TYPE_CHECKING:
    from lightning.pytorch.callbacks import Callback

    from lit_qlp.bases import BaseFormat
    from lit_qlp.models.pipeline import ModelSource
    from lit_qlp.strategies.stages import StageGroup


class ControlAdapters(TrainingMethod):
    """Control Adapters after the decoder layers of ``layers_to_transform``: per layer ``Q`` (hidden × rank,
    orthonormal columns) and ``S`` (rank) turn the layer's residual update δ into ``δ + Q diag(expm1(±S)) Qᵀ δ``,
    + at tokens of control class 1, - at class -1, untouched at 0 (class-0 datasets get ±1 per document). Works on
    an unquantised or a 4-bit ``model.base``. Each epoch's export holds ``control_Q`` / ``control_S`` per layer
    (tools/control_adapter_to_lora.py turns it into a PEFT LoRA). Installs ``ControlAdapterRegularizer`` and
    ``AdapterNormLogging`` (train/norms_* = max |expm1(S)|).

    Args:
        rank: r, at most the hidden size.
        dropout: Dropout on δ before it enters the adapter.
        layers_to_transform: Decoder layers that get an adapter ("0:31", "1,3,5", ...); all when unset.
        weight_dtype: Dtype of Q and S and of their optimizer state.
        weight_decay: ``S ← S - lr·λ·S`` after every optimizer step; needs float32 weights.
        gamma: After every optimizer step ``Q ← Q - γ Q (QᵀQ - I)`` pulls Q back to orthonormal columns; in (0, 0.5].
    """

    uses_control_classes = True

    def __init__(
        self,
        rank: int = 64,
        dropout: float = 0.0,
        layers_to_transform: str | None = None,
        weight_dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        weight_decay: float = 0.0,
        gamma: float = 0.5,
    ) -> None:
        super().__init__(layers_to_transform)
        check_adapter_options(rank, dropout, weight_dtype, weight_decay)
        if not 0 < gamma <= 0.5:
            raise ValueError(f"model.method.gamma={gamma} must be in (0, 0.5]")
        self.rank = rank
        self.dropout = dropout
        self.weight_dtype = weight_dtype
        self.weight_decay = weight_decay
        self.gamma = gamma

    @override
    def check(self, source: ModelSource, base: BaseFormat | None) -> None:
        super().check(source, base)
        hidden = source.config.hidden_size
        if self.rank > hidden:
            raise ValueError(
                f"model.method.rank={self.rank} exceeds the hidden size {hidden}: a Control Adapter's Q has "
                "orthonormal columns, at most hidden_size of them"
            )

    @override
    def layer_adapter(self, source: ModelSource, seed: int) -> ControlAdapter:
        return ControlAdapter(
            rank=self.rank,
            dropout=self.dropout,
            layers=self.layers(source),
            hidden_size=source.config.hidden_size,
            dtype=getattr(torch, self.weight_dtype),
            seed=seed,
        )

    @override
    def callbacks(self) -> list[Callback]:
        from lit_qlp.callbacks.adapters import AdapterNormLogging, ControlAdapterRegularizer

        return [ControlAdapterRegularizer(self.gamma, self.weight_decay), AdapterNormLogging()]

    @override
    def export(self, directory: Path, layers: list, stages: StageGroup, source: ModelSource) -> None:
        """``adapter_model.safetensors`` (``...layers.{i}.control_Q`` / ``control_S``), ``adapter_config.json``
        and the tokenizer files."""
        gathered = stages.gather_from_stages(control_tensors(layers))
        if gathered is None:
            return
        tensors = {name: tensor for part in gathered for name, tensor in part.items()}
        config = control_adapter_config(str(source.model_dir), self.rank, self.dropout, self.layers(source), self.gamma)
        save_peft_adapter(directory, tensors, config)
        copy_tokenizer_files(source.model_dir, directory)


def control_tensors(layers: list) -> dict[str, torch.Tensor]:
    """``base_model.model.model.layers.{i}.control_Q`` / ``control_S`` of the pipeline layers holding adapters."""
    out = {}
    for layer in layers:
        if not isinstance(layer, nn.Module):
            continue
        for module in layer.modules():
            if isinstance(module, ControlAdapterLayer):
                for name in ("control_Q", "control_S"):
                    tensor = getattr(module, name).detach().to("cpu", copy=True).contiguous()
                    out[f"{PEFT_PREFIX}{layer.hf_prefix}.{name}"] = tensor
    return out


__all__ = ["ControlAdapters", "control_tensors"]
