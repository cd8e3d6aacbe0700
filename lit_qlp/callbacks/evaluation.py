"""Evaluation before training and a console line after each evaluation."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

from lit_qlp.compat.lightning import keep_first_loop_iter


def evaluation_line(loss: float, last: float | None) -> str:
    """``new evaluation loss: X (last: Y, Δ: Z%)``; the first evaluation has no previous one."""
    if last is None:
        return f"new evaluation loss: {loss:.4f}"
    change = (loss - last) / last * 100 if last else float("nan")
    return f"new evaluation loss: {loss:.4f} (last: {last:.4f}, Δ: {change:+.2f}%)"


class EvaluationReport(Callback):
    """Evaluates once before the first training step and prints a line after every evaluation.

    The initial evaluation gives the base model's loss at step 0 (logged as ``eval/loss``), so every later one is
    compared with where training started. It is skipped on resume and when there is no evaluation data.

    Args:
        initial: Run the evaluation before training.
        monitor: The logged metric to report.
    """

    def __init__(self, initial: bool = True, monitor: str = "eval/loss") -> None:
        self.initial = initial
        self.monitor = monitor
        self.last: float | None = None

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.initial or trainer.global_step > 0 or self.last is not None:
            return
        loop = trainer.fit_loop.epoch_loop.val_loop
        loop.setup_data()
        if not sum(loop.max_batches):
            return
        # As Lightning's training loop runs its own evaluations.
        with keep_first_loop_iter(trainer):
            trainer.validating = True
            try:
                loop.run()
            finally:
                trainer.training = True

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        loss = float(trainer.callback_metrics[self.monitor])
        if trainer.progress_bar_callback is None:  # else the bar shows the evaluation loss: one display
            rank_zero_info(evaluation_line(loss, self.last))
        self.last = loss

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"last": self.last}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last = state_dict.get("last")


__all__ = ["EvaluationReport", "evaluation_line"]
