"""An interrupted run keeps its progress: SIGINT and SIGTERM stop training with a checkpoint of the last step."""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lit_qlp.callbacks.checkpoint import RunCheckpoint

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def exit_status(signum: int) -> int:
    """The exit status of a command stopped by signal ``signum``, as shells report it: 128 + the signal's number
    (130 for SIGINT, 143 for SIGTERM)."""
    return 128 + signum


def agreed_signal(strategy: Any, received: int | None) -> int:
    """The largest signal number that any process of the run received (0: none). Collective: every process calls
    it, so all stop at the same step also when the signal reached only some of them (``kill`` of one pid)."""
    flag = torch.tensor(received or 0, dtype=torch.int64, device=strategy.root_device)
    return int(strategy.reduce(flag, reduce_op="max"))


def epoch_ends_after_this_step(trainer: pl.Trainer) -> bool:
    """Whether the optimizer step that just finished ends the epoch: its last batch, or ``max_steps`` reached."""
    if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
        return True
    return 0 <= trainer.max_steps <= trainer.global_step


class InterruptCheckpoint(Checkpoint):
    """On SIGINT (Ctrl-C) or SIGTERM (what schedulers send before they kill a job), training finishes the current
    optimizer step, saves it through ``RunCheckpoint`` (with its retention and ``last``) and stops; the command then
    exits with ``exit_status`` (130 or 143), and ``--ckpt_path last`` resumes exactly where it stopped. A second
    SIGINT quits at once, without a checkpoint.

    From the start of training to its end the signal handlers only note the signal; after each optimizer step the
    processes agree on it (``agreed_signal``). Lightning's own SIGTERM handler is replaced meanwhile: it makes the
    loops exit with status 0 and no checkpoint (and with several processes its broadcast from inside the handler of
    one of them hangs the run). An interrupted run writes no export (``EpochExport``): the resumed run writes it.
    Lightning evaluates once more when training stops; the checkpoint is saved before.

    After the last step of an epoch (or of training) the epoch ends first, with its evaluation and export, and the
    checkpoint is the epoch's: a run resumed from the last step of an epoch would not end that epoch again.

    A ``Checkpoint``, so that Lightning runs it after every other callback of the step, among them the methods'
    post-step updates (``CompositeWeightDecay``): the checkpoint holds the step's final weights.
    """

    def __init__(self) -> None:
        self.signum: int | None = None  # the agreed signal once training stopped for it
        self.received: int | None = None  # the first signal this process got, before the processes agree
        self._at_epoch_end: int | None = None  # an agreed signal waiting for the end of the epoch
        self._previous_handlers: dict[int, Any] = {}

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.signum = self.received = self._at_epoch_end = None
        self.install_handlers()

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        signum = agreed_signal(trainer.strategy, self.received)
        if not signum or self.signum is not None or self._at_epoch_end is not None:
            return
        if epoch_ends_after_this_step(trainer):
            self._at_epoch_end = signum
        else:
            self.stop(trainer, signum)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._at_epoch_end is not None and self.signum is None:
            self.stop(trainer, self._at_epoch_end)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.restore_handlers()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.restore_handlers()

    def install_handlers(self) -> None:
        """Makes SIGINT and SIGTERM only note the signal (Python runs handlers in the main thread alone)."""
        if threading.current_thread() is not threading.main_thread() or self._previous_handlers:
            return
        for signum in SIGNALS:
            self._previous_handlers[signum] = signal.signal(signum, self.note_signal)

    def restore_handlers(self) -> None:
        """Puts back the handlers that ``install_handlers`` replaced (Lightning's, which it restores in turn)."""
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}

    def note_signal(self, signum: int, frame: FrameType | None) -> None:
        """The signal handler: notes the first signal; a SIGINT after one quits (raises ``KeyboardInterrupt``)."""
        # Nothing is printed here: a handler that writes to a stream the interrupted code was writing to fails.
        if self.received is not None and signum == signal.SIGINT:
            self.restore_handlers()
            raise KeyboardInterrupt
        if self.received is None:
            self.received = signum

    def stop(self, trainer: pl.Trainer, signum: int) -> None:
        """Saves the current step through ``RunCheckpoint`` and tells the Trainer to stop, with a console line."""
        self.signum = signum
        trainer.should_stop = True
        name = signal.Signals(signum).name
        checkpoint = next((c for c in trainer.checkpoint_callbacks if isinstance(c, RunCheckpoint)), None)
        if checkpoint is None:
            rank_zero_warn(
                f"{name} received at step {trainer.global_step}: stopping without a checkpoint (no RunCheckpoint)"
            )
            return
        checkpoint.save_now(trainer)
        saved = checkpoint.best_model_path or checkpoint.last_model_path
        rank_zero_info(f"{name} received at step {trainer.global_step}: saved {saved}; resume with --ckpt_path last")


def interrupting_signal(trainer: pl.Trainer) -> int | None:
    """The signal that stopped the trainer's training (``InterruptCheckpoint``), None if none did."""
    stopped = [c.signum for c in trainer.callbacks if isinstance(c, InterruptCheckpoint) and c.signum is not None]
    return stopped[0] if stopped else None


__all__ = ["InterruptCheckpoint", "agreed_signal", "epoch_ends_after_this_step", "exit_status", "interrupting_signal"]
