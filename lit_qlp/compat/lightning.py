"""What lit_qlp relies on of Lightning beyond its public API: the logger connector's first-iteration flag around an
evaluation run from a callback, and ModelCheckpoint's triggers after construction.

Lightning is imported inside the functions.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint


def _outdated(name: str, use: str) -> RuntimeError:
    """The error for a Lightning version that lacks ``name``, which lit_qlp uses for ``use``."""
    import lightning

    return RuntimeError(
        f"lightning {getattr(lightning, '__version__', '?')} has no {name} (lit_qlp uses it {use}); "
        "lit_qlp/compat/lightning.py needs updating for this Lightning version"
    )


@contextmanager
def keep_first_loop_iter(trainer: pl.Trainer) -> Iterator[None]:
    """Restores the logger connector's first-loop-iteration flag when the block ends, also on an error.

    An evaluation loop resets the flag, which tells Lightning whether values logged in the running loop are
    step-level. Lightning's training epoch loop saves and restores it around the evaluations it runs itself
    (``training_epoch_loop.py``); an evaluation a callback runs inside training does the same with this.
    """
    connector = getattr(trainer, "_logger_connector", None)
    if connector is None:
        raise _outdated("Trainer._logger_connector", "to run an evaluation from a callback")
    if not hasattr(connector, "_first_loop_iter"):
        raise _outdated("_LoggerConnector._first_loop_iter", "to run an evaluation from a callback")
    first_loop_iter = connector._first_loop_iter
    try:
        yield
    finally:
        connector._first_loop_iter = first_loop_iter


def set_checkpoint_triggers(checkpoint: ModelCheckpoint, every_n_train_steps: int, every_n_epochs: int) -> None:
    """Makes ``checkpoint`` save every ``every_n_train_steps`` optimizer steps and every ``every_n_epochs`` epochs.

    ``ModelCheckpoint``'s constructor accepts one of its three triggers (steps, epochs, training time); its checks in
    ``on_train_batch_end`` and ``on_train_epoch_end`` handle all three together, so the others are set afterwards.

    Args:
        checkpoint: The callback, built with at most one trigger.
        every_n_train_steps: Save every this many optimizer steps (0 disables).
        every_n_epochs: Save at the end of every this many epochs (0 disables).
    """
    if every_n_train_steps < 0 or every_n_epochs < 0:
        raise ValueError(
            f"every_n_train_steps={every_n_train_steps} and every_n_epochs={every_n_epochs} must be >= 0 (0 disables)"
        )
    for name in ("_every_n_train_steps", "_every_n_epochs"):
        if not hasattr(checkpoint, name):
            raise _outdated(f"ModelCheckpoint.{name}", "to combine checkpoint triggers")
    checkpoint._every_n_train_steps = every_n_train_steps
    checkpoint._every_n_epochs = every_n_epochs


def save_checkpoint_now(checkpoint: ModelCheckpoint, trainer: pl.Trainer) -> None:
    """Makes ``checkpoint`` save the current step now, with its retention and ``last`` link, as its own triggers
    do (nothing if it saved this step already)."""
    for name in ("_last_global_step_saved", "_monitor_candidates", "_save_topk_checkpoint", "_save_last_checkpoint"):
        if not hasattr(checkpoint, name):
            raise _outdated(f"ModelCheckpoint.{name}", "to save a checkpoint outside its schedule")
    if checkpoint._last_global_step_saved == trainer.global_step:
        return
    candidates = checkpoint._monitor_candidates(trainer)
    checkpoint._save_topk_checkpoint(trainer, candidates)
    checkpoint._save_last_checkpoint(trainer, candidates)


def last_saved_step(checkpoint: ModelCheckpoint) -> int:
    """The global step ``checkpoint`` last saved at in this run (-1 before its first save)."""
    if not hasattr(checkpoint, "_last_global_step_saved"):
        raise _outdated("ModelCheckpoint._last_global_step_saved", "to know when a checkpoint was saved")
    step = checkpoint._last_global_step_saved
    return -1 if step is None else int(step)


__all__ = ["keep_first_loop_iter", "last_saved_step", "save_checkpoint_now", "set_checkpoint_triggers"]
