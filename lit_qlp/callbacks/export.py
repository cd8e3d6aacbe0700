"""Writes the trained weights in their deployable format after each epoch."""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lit_qlp.callbacks.interrupt import interrupting_signal


class EpochExport(Callback):
    """After each training epoch, writes ``<default_root_dir>/epoch{N}/`` (N counts from 1).

    A run that stops part-way through an epoch (``max_steps``) writes ``<default_root_dir>/step{global_step}/``
    instead, so that the resumed run can still write the epoch's directory when it completes the epoch.

    For LoRA that is a PEFT adapter (``adapter_config.json``, ``adapter_model.safetensors``) with the tokenizer
    files, loadable with ``peft.PeftModel.from_pretrained`` over the base model. An existing directory of the same
    name is not overwritten: the run refuses to start when one of those it will write exists (``planned``).

    Args:
        dirname: Name of the directory, formatted with ``epoch`` (the 1-based epoch number).
    """

    def __init__(self, dirname: str = "epoch{epoch}") -> None:
        self.dirname = dirname

    def directory(self, trainer: pl.Trainer, epoch: int) -> Path:
        return Path(trainer.default_root_dir) / self.dirname.format(epoch=epoch)

    def _refuse_existing(self, trainer: pl.Trainer, epochs: range) -> None:
        self._refuse_existing_dirs(trainer, [self.directory(trainer, e) for e in epochs])

    @staticmethod
    def _refuse_existing_dirs(trainer: pl.Trainer, directories: list[Path]) -> None:
        existing = trainer.strategy.broadcast([str(d) for d in directories if d.exists()])
        if existing:
            raise FileExistsError(
                f"{', '.join(existing)} already exist(s); lit-qlp does not overwrite exports. Move them away or "
                "set trainer.default_root_dir to a new directory"
            )

    def planned(self, trainer: pl.Trainer) -> list[Path]:
        """The export directories this run will write from where it starts: ``epoch{N}`` for each epoch it will
        complete and, when ``max_steps`` stops it part-way through an epoch, ``step{max_steps}``."""
        first = trainer.current_epoch + 1
        last = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else first
        steps_per_epoch = trainer.num_training_batches
        if trainer.max_steps is None or trainer.max_steps < 0 or not math.isfinite(steps_per_epoch):
            return [self.directory(trainer, e) for e in range(first, last + 1)]
        stop = min(trainer.max_steps, last * int(steps_per_epoch))
        completed = stop // int(steps_per_epoch)
        planned = [self.directory(trainer, e) for e in range(first, completed + 1)]
        if stop % int(steps_per_epoch) and stop > trainer.global_step:
            planned.append(Path(trainer.default_root_dir) / f"step{stop}")
        return planned

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Fail before the first step, not after an epoch of training.
        self._refuse_existing_dirs(trainer, self.planned(trainer))

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if interrupting_signal(trainer) is not None:
            return  # an interrupted run (InterruptCheckpoint) only checkpoints; the resumed run writes the export
        if not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            # Stopped part-way (max_steps): the epoch's export is written when a resumed run completes it.
            directory = Path(trainer.default_root_dir) / f"step{trainer.global_step}"
            self._refuse_existing_dirs(trainer, [directory])
            pl_module.export(directory)
            return
        epoch = trainer.current_epoch + 1
        self._refuse_existing(trainer, range(epoch, epoch + 1))
        pl_module.export(self.directory(trainer, epoch))
