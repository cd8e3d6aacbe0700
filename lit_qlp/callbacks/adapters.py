"""After each optimizer step: the composite B·A decay of LoRA pairs, the Control Adapter regulariser, and the
adapter norm metrics. One behaviour per callback; the training methods install them by default
(``CausalLMModule.configure_callbacks``), and each can be replaced or left out like any Lightning callback."""

from __future__ import annotations

from collections.abc import Iterable

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from typing_extensions import override

from lit_qlp.adapters import AdapterModule
from lit_qlp.adapters.control import ControlAdapterLayer, regularize_
from lit_qlp.adapters.lora import LoraLinear, composite_decay_


def adapter_modules(pl_module: pl.LightningModule, kind: type = AdapterModule) -> list[tuple[str, nn.Module]]:
    """The ``kind`` modules of this process's pipeline layers, with their names (unique across stages: the pipeline
    names each layer by its global index)."""
    return [(name, m) for name, m in pl_module.pipe.named_modules() if isinstance(m, kind)]


def update_norms(modules: Iterable[nn.Module]) -> list[float]:
    """``update_norm()`` of each adapter, read back from the device in one transfer (one synchronisation)."""
    norms = [m.update_norm() for m in modules]
    return torch.stack(norms).tolist() if norms else []


def current_lr(trainer: pl.Trainer) -> float:
    return trainer.optimizers[0].param_groups[0]["lr"]


def log_statistics(trainer: pl.Trainer, pl_module: pl.LightningModule, prefix: str, values: dict[str, float]) -> None:
    """Logs ``{prefix}_avg``, ``_min`` and ``_max`` of ``values`` (adapter name -> value) over all stages.

    Collective: every rank calls it. Data-parallel replicas report the same adapters with the same values.
    """
    merged: dict[str, float] = {}
    for part in trainer.strategy.all_gather_object(values):
        merged.update(part)
    if not merged:
        return
    numbers = list(merged.values())
    pl_module.log(f"{prefix}_avg", sum(numbers) / len(numbers), rank_zero_only=True)
    pl_module.log(f"{prefix}_min", min(numbers), rank_zero_only=True)
    pl_module.log(f"{prefix}_max", max(numbers), rank_zero_only=True)


class CompositeWeightDecay(Callback):
    """After each optimizer step, one gradient step on ``weight_decay · ½‖BA‖²_F`` of every LoRA pair
    (``A -= lr·λ·BᵀBA``, ``B -= lr·λ·BAAᵀ``): it shrinks the update ``BA`` itself rather than A and B apart.
    Logs ``train/weight_decay_{avg,min,max}``, how much it lowered each ‖BA‖_F. Needs float32 LoRA weights.

    Args:
        weight_decay: λ (> 0).
    """

    def __init__(self, weight_decay: float) -> None:
        if weight_decay <= 0:
            raise ValueError(f"CompositeWeightDecay weight_decay={weight_decay} must be > 0 (leave it out for none)")
        self.weight_decay = weight_decay

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx):
        named = adapter_modules(pl_module, LoraLinear)
        before = update_norms(m for _, m in named)
        lr = current_lr(trainer)
        for _, module in named:
            composite_decay_(module, lr, self.weight_decay)
        after = update_norms(m for _, m in named)
        decays = {name: b - a for (name, _), b, a in zip(named, before, after)}
        log_statistics(trainer, pl_module, "train/weight_decay", decays)


class ControlAdapterRegularizer(Callback):
    """After each optimizer step, per Control Adapter: ``Q ← Q - γ Q (QᵀQ - I)`` pulls Q back to orthonormal
    columns and, with ``weight_decay``, ``S ← S - lr·λ·S``. Logs ``train/orthogonality_{avg,min,max}`` (‖QᵀQ - I‖²_F
    after the step) and, with decay, ``train/weight_decay_*`` (how much it lowered max|expm1(S)|).

    Args:
        gamma: γ in (0, 0.5].
        weight_decay: λ (>= 0).
    """

    def __init__(self, gamma: float = 0.5, weight_decay: float = 0.0) -> None:
        if not 0 < gamma <= 0.5:
            raise ValueError(f"ControlAdapterRegularizer gamma={gamma} must be in (0, 0.5]")
        if weight_decay < 0:
            raise ValueError(f"ControlAdapterRegularizer weight_decay={weight_decay} must be >= 0")
        self.gamma = gamma
        self.weight_decay = weight_decay

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx):
        lr = current_lr(trainer)
        stats = {
            name: regularize_(m, self.gamma, lr, self.weight_decay)
            for name, m in adapter_modules(pl_module, ControlAdapterLayer)
        }
        log_statistics(trainer, pl_module, "train/orthogonality", {n: s["orthogonality"] for n, s in stats.items()})
        if self.weight_decay:
            log_statistics(trainer, pl_module, "train/weight_decay", {n: s["weight_decay"] for n, s in stats.items()})


class AdapterNormLogging(Callback):
    """Logs ``train/norms_{avg,min,max}`` after each optimizer step over every adapter of every stage: ‖BA‖_F of
    each LoRA pair, max |expm1(S)| of each Control Adapter. Runs after the regularising callbacks that the method
    installs with it (so it reports the adapters as the next step sees them)."""

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx):
        named = adapter_modules(pl_module)
        norms = dict(zip((name for name, _ in named), update_norms(m for _, m in named)))
        log_statistics(trainer, pl_module, "train/norms", norms)


__all__ = [
    "AdapterNormLogging",
    "CompositeWeightDecay",
    "ControlAdapterRegularizer",
    "adapter_modules",
    "log_statistics",
    "update_norms",
]
