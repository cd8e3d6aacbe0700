"""The RMS-ratio learning-rate schedule."""

from __future__ import annotations

import math

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override


def rms_ratio(beta2: float, step: int) -> float:
    """``sqrt((1 - β2^t) / (1 + β2^t))`` for optimizer step ``t`` (counting from 1).

    Adam's second moment averages about ``(1 + β2) / (1 - β2)`` squared gradients at equilibrium but only ``t``
    early on; this factor scales the step to what the under-filled average supports, rising from
    ``sqrt((1 - β2) / (1 + β2))`` at t = 1 to 1.
    """
    if step < 1:
        raise ValueError(f"optimizer steps count from 1, got {step}")
    decay = beta2**step
    return math.sqrt((1 - decay) / (1 + decay))


def adam_beta2(group: dict) -> float:
    """β2 of an Adam parameter group (torch's ``betas`` or optimi's ``beta2``)."""
    if "betas" in group:
        return group["betas"][1]
    if "beta2" in group:
        return group["beta2"]
    raise ValueError(f"RMSRatioSchedule needs an Adam-style optimizer with beta2; the group has {sorted(group)}")


class RMSRatioSchedule(Callback):
    """Sets the learning rate of each optimizer step to ``lr · sqrt((1 - β2^t) / (1 + β2^t))``.

    ``lr`` is each parameter group's learning rate when training first starts (kept in the group as
    ``initial_lr``, so it travels in checkpoints), β2 the group's Adam beta2 and ``t`` the number of the optimizer
    step being taken, from 1. The schedule depends on the step alone: resuming, and raising the epoch count of a
    finished run, continue it seamlessly. No warm-up or decay is needed beside it.
    """

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        step = trainer.global_step + 1
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group.setdefault("initial_lr", group["lr"])
                group["lr"] = group["initial_lr"] * rms_ratio(adam_beta2(group), step)


__all__ = ["RMSRatioSchedule", "rms_ratio"]
