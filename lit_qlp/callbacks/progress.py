"""Training progress: a console line per step and throughput metrics."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Protocol, runtime_checkable

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override


@runtime_checkable
class DataParallel(Protocol):
    """A strategy that runs several replicas of the model (``PipelineStrategy``)."""

    data_parallel_size: int


def format_duration(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))


class ProgressReport(Callback):
    """Every ``every_n_steps`` optimizer steps, a console line: step/total, loss, lr, sequences/s, tokens/s, elapsed
    training time and ETA; ``train/sequences_per_s`` and ``train/tokens_per_s`` go to the logger every step.

    Throughput counts every data-parallel replica's sequences. Only the time inside training steps counts, so
    evaluations, checkpoint saves and exports neither lower the throughput nor inflate the ETA (which is the
    remaining steps × the mean of the recent steps).

    With Lightning's progress bar on (``trainer.enable_progress_bar``) no line is printed: the bar is the one
    display, and shows tokens/s beside the loss.

    Args:
        every_n_steps: Steps between console lines (0: metrics only).
        window: Number of recent steps the rates and the ETA average over.
    """

    def __init__(self, every_n_steps: int = 1, window: int = 20) -> None:
        if every_n_steps < 0 or window < 1:
            raise ValueError(f"ProgressReport(every_n_steps={every_n_steps}, window={window}): need >= 0 and >= 1")
        self.every_n_steps = every_n_steps
        self.window = window
        self.train_seconds = 0.0
        self._recent: list[tuple[float, int, int]] = []
        self._start = 0.0

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        self._start = time.perf_counter()

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        seconds = time.perf_counter() - self._start
        self.train_seconds += seconds
        replicas = trainer.strategy.data_parallel_size if isinstance(trainer.strategy, DataParallel) else 1
        sequences = int(batch["input_ids"].shape[0]) * replicas
        tokens = int(batch["input_ids"].numel()) * replicas
        self._recent = (self._recent + [(seconds, sequences, tokens)])[-self.window :]
        window_seconds = sum(s for s, _, _ in self._recent)
        sequences_per_s = sum(n for _, n, _ in self._recent) / window_seconds
        tokens_per_s = sum(t for _, _, t in self._recent) / window_seconds
        pl_module.log("train/sequences_per_s", sequences_per_s, rank_zero_only=True)
        pl_module.log("train/tokens_per_s", tokens_per_s, prog_bar=True, rank_zero_only=True)
        step = trainer.global_step
        if not self.every_n_steps or step % self.every_n_steps or trainer.progress_bar_callback is not None:
            return
        total = trainer.estimated_stepping_batches
        remaining = max(0, total - step) * window_seconds / len(self._recent)
        metrics = trainer.callback_metrics
        loss = float(metrics["train/loss"]) if "train/loss" in metrics else float("nan")
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else float("nan")
        rank_zero_info(
            f"step {step}/{total} | loss {loss:.4f} | lr {lr:.3g} | {sequences_per_s:,.2f} seq/s | "
            f"{tokens_per_s:,.0f} tok/s | elapsed {format_duration(self.train_seconds)} | "
            f"ETA {format_duration(remaining)}"
        )

    @override
    def state_dict(self) -> dict:
        return {"train_seconds": self.train_seconds}

    @override
    def load_state_dict(self, state_dict: dict) -> None:
        self.train_seconds = state_dict.get("train_seconds", 0.0)


__all__ = ["ProgressReport", "format_duration"]
