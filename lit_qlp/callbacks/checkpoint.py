"""lit-qlp's checkpoint policy on top of Lightning's ModelCheckpoint."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint

from lit_qlp.compat.lightning import set_checkpoint_triggers


class RunCheckpoint(ModelCheckpoint):
    """Resumable checkpoints: every ``checkpoint_interval_hours`` of training, at each epoch end and when training
    stops, optionally every ``every_n_train_steps``; the newest ``max_checkpoints`` kept, ``last.ckpt`` linking
    to the newest.

    Each checkpoint is a DeepSpeed checkpoint directory named ``epoch=E-step=S.ckpt``, written under a
    ``.partial`` name and renamed when complete (see ``PipelineStrategy.save_checkpoint``); older ones are deleted
    only after a newer one is complete, so a crash never leaves the run without a good checkpoint.
    ``--ckpt_path last`` resumes from the newest.

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


__all__ = ["RunCheckpoint"]
