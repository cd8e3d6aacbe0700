"""lit-qlp's checkpoint policy on top of Lightning's ModelCheckpoint."""

from __future__ import annotations

import os
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from typing_extensions import override

from lit_qlp.compat.lightning import last_saved_step, save_checkpoint_now, set_checkpoint_triggers


class RunCheckpoint(ModelCheckpoint):
    """Resumable checkpoints: every ``checkpoint_interval_hours`` of training, at each epoch end and when training
    stops, optionally every ``every_n_train_steps``; the newest ``max_checkpoints`` kept, ``last.ckpt`` linking
    to the newest.

    Each checkpoint is a DeepSpeed checkpoint directory named ``epoch=E-step=S.ckpt``, written under a
    ``.partial`` name and renamed when complete (see ``PipelineStrategy.save_checkpoint``). ``last.ckpt`` is then
    re-pointed at it; a checkpoint beyond ``max_checkpoints`` is deleted only once ``last`` points at a newer
    complete one (``PipelineStrategy.remove_checkpoint``), so a crash at any moment leaves ``last`` pointing at a
    complete checkpoint, or missing for an instant, which ``--ckpt_path last`` then recovers from. A resumed run
    may change ``max_checkpoints``: the surplus is deleted after its first save.

    Args:
        checkpoint_interval_hours: Hours of training between time-based saves (0 disables them). The clock starts
            when training starts; a resumed run starts it again.
        max_checkpoints: How many checkpoints to keep (at least 1).
        every_n_train_steps: Also save every this many optimizer steps (0 disables).
        save_on_epoch_end: Save at the end of each epoch (and when ``max_steps`` stops training mid-epoch).
        dirpath: Directory of the checkpoints; ``<default_root_dir>/checkpoints`` by default.
        filename: Name pattern of the checkpoints (Lightning's ``ModelCheckpoint`` format).
    """

    def __init__(
        self,
        checkpoint_interval_hours: float = 1.0,
        max_checkpoints: int = 3,
        every_n_train_steps: int = 0,
        save_on_epoch_end: bool = True,
        dirpath: Path | None = None,
        filename: str | None = None,
    ) -> None:
        if checkpoint_interval_hours < 0:
            raise ValueError(f"checkpoint.checkpoint_interval_hours={checkpoint_interval_hours} must be >= 0")
        if max_checkpoints < 1:
            raise ValueError(f"checkpoint.max_checkpoints={max_checkpoints} must be at least 1")
        if every_n_train_steps < 0:
            raise ValueError(f"checkpoint.every_n_train_steps={every_n_train_steps} must be >= 0 (0 disables)")
        interval = timedelta(hours=checkpoint_interval_hours) if checkpoint_interval_hours else None
        super().__init__(
            dirpath=dirpath,
            filename=filename,
            monitor="step",
            mode="max",
            save_top_k=max_checkpoints,
            save_last="link",
            # A resumed run re-points last.ckpt instead of adding last-v1.ckpt beside it.
            enable_version_counter=False,
            train_time_interval=interval,
            every_n_train_steps=0 if interval else every_n_train_steps,
            every_n_epochs=0,
            save_on_train_epoch_end=True,
        )
        # Lightning takes one trigger at construction; its checks in on_train_batch_end and on_train_epoch_end
        # handle all three together.
        set_checkpoint_triggers(self, every_n_train_steps, every_n_epochs=1 if save_on_epoch_end else 0)
        self.checkpoint_interval_hours = checkpoint_interval_hours
        self.max_checkpoints = max_checkpoints
        self._pending_removals: list[str] = []  # deleted once last.ckpt points at a newer complete checkpoint

    def save_now(self, trainer: pl.Trainer) -> None:
        """Saves a checkpoint of the current step (unless one of it exists), with retention and ``last`` as for a
        scheduled save: for callbacks that must save outside the schedule (an interrupted run)."""
        save_checkpoint_now(self, trainer)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.dirpath is None:
            # Lightning would put them under the logger's directory (CSV: lightning_logs/version_N/checkpoints,
            # MLflow: its experiment), where resume and the new-run check do not look: the run's root holds them.
            self.dirpath = os.path.join(trainer.default_root_dir, "checkpoints")
        with warnings.catch_warnings():
            # A new run never starts in a directory holding checkpoints (lit_qlp.rundir): a resumed one does.
            warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
            super().setup(trainer, pl_module, stage)

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores the kept checkpoints of the resumed run, reconciled with this run's ``max_checkpoints`` and
        with the disk: vanished ones are forgotten, the oldest beyond ``max_checkpoints`` are deleted after the
        next save. A run whose directory was moved keeps them (their paths are rebased onto ``dirpath``)."""
        super().load_state_dict(rebased(state_dict, self.dirpath))
        kept = {path: score for path, score in self.best_k_models.items() if Path(path).exists()}
        by_step = sorted(kept, key=lambda path: float(kept[path]))
        surplus, keep = by_step[: -self.max_checkpoints], by_step[-self.max_checkpoints :]
        self._pending_removals.extend(surplus)
        self.best_k_models = {path: kept[path] for path in keep}
        if len(keep) == self.save_top_k:
            self.kth_best_model_path, self.kth_value = keep[0], kept[keep[0]]
        else:
            self.kth_best_model_path, self.kth_value = "", torch.tensor(float("-inf"))
        if keep:
            self.best_model_path, self.best_model_score = keep[-1], kept[keep[-1]]

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        super().on_train_batch_end(trainer, *args, **kwargs)
        self._remove_surplus(trainer)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        self._remove_surplus(trainer)

    def _remove_surplus(self, trainer: pl.Trainer) -> None:
        """Deletes the checkpoints a resumed run keeps beyond ``max_checkpoints`` once it has saved one of its own
        (``last`` then points at it)."""
        if not self._pending_removals or self.best_model_path in self._pending_removals or not self.best_model_path:
            return
        if trainer.global_step != last_saved_step(self):
            return  # no save of this run yet
        pending, self._pending_removals = self._pending_removals, []
        for filepath in pending:
            trainer.strategy.remove_checkpoint(filepath)


def rebased(state_dict: dict[str, Any], dirpath: str | None) -> dict[str, Any]:
    """ModelCheckpoint's state with the checkpoint paths of the directory it was saved in moved to ``dirpath``
    (the same run, resumed after its directory moved); unchanged when the directory is the same."""
    saved = state_dict.get("dirpath")
    if not saved or not dirpath or os.path.abspath(saved) == os.path.abspath(dirpath):
        return state_dict

    def move(path: str) -> str:
        return os.path.join(dirpath, os.path.basename(path)) if path and os.path.dirname(path) == saved else path

    state = dict(state_dict, dirpath=dirpath)
    for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
        if key in state:
            state[key] = move(state[key])
    state["best_k_models"] = {move(p): score for p, score in state.get("best_k_models", {}).items()}
    return state


__all__ = ["RunCheckpoint"]
