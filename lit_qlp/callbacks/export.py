"""Writes the trained weights in their deployable format after each epoch."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override


class EpochExport(Callback):
    """After each training epoch, writes ``<default_root_dir>/epoch{N}/`` (N counts from 1).

    For LoRA that is a PEFT adapter (``adapter_config.json``, ``adapter_model.safetensors``) with the tokenizer
    files, loadable with ``peft.PeftModel.from_pretrained`` over the base model. An existing directory of the same
    name is not overwritten: the run stops with an error before writing anything there.

    Args:
        dirname: Name of the directory, formatted with ``epoch`` (the 1-based epoch number).
    """

    def __init__(self, dirname: str = "epoch{epoch}") -> None:
        self.dirname = dirname

    def directory(self, trainer: pl.Trainer, epoch: int) -> Path:
        return Path(trainer.default_root_dir) / self.dirname.format(epoch=epoch)

    def _refuse_existing(self, trainer: pl.Trainer, epochs: range) -> None:
        existing = [str(d) for e in epochs if (d := self.directory(trainer, e)).exists()]
        existing = trainer.strategy.broadcast(existing)
        if existing:
            raise FileExistsError(
                f"{', '.join(existing)} already exist(s); lit-qlp does not overwrite exports. Move them away or "
                "set trainer.default_root_dir to a new directory"
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Fail before the first step, not after an epoch of training.
        last = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else trainer.current_epoch + 1
        self._refuse_existing(trainer, range(trainer.current_epoch + 1, last + 1))

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        self._refuse_existing(trainer, range(epoch, epoch + 1))
        pl_module.export(self.directory(trainer, epoch))
