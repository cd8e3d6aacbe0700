"""A callback that records which sequences each rank trains on (used by the end-to-end tests)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import lightning.pytorch as pl


class RecordBatches(pl.Callback):
    """Appends ``{epoch, step, rows}`` per training batch to ``<default_root_dir>/batches.rank{R}.jsonl``.

    ``rows`` identifies each sequence by a hash of its token ids. ``setup`` also asks the Trainer for
    ``estimated_stepping_batches``, which makes Lightning set up the training data early: resuming must survive it.
    """

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            assert trainer.estimated_stepping_batches > 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        rows = [hashlib.sha1(r.cpu().numpy().tobytes()).hexdigest()[:16] for r in batch["input_ids"]]
        record = {"epoch": trainer.current_epoch, "step": trainer.global_step, "rows": rows}
        with (Path(trainer.default_root_dir) / f"batches.rank{trainer.global_rank}.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")


class RecordTiedWeights(pl.Callback):
    """At the end of training, saves this rank's copy of the tied embedding matrix (full fine-tuning of a model
    with tied embeddings) to ``<default_root_dir>/tied.rank{R}.pt``."""

    def on_train_end(self, trainer, pl_module) -> None:
        import torch

        weight = pl_module.pipe.tied_modules["embeddings"].embed_tokens.weight
        assert weight.is_leaf and weight.requires_grad
        torch.save(weight.detach().cpu(), Path(trainer.default_root_dir) / f"tied.rank{trainer.global_rank}.pt")


class RecordStageParameters(pl.Callback):
    """At the start of training, writes this rank's parameter count, the bytes of the distinct tensors holding them
    (two parameters sharing one tensor count once) and the keys of the stage's DeepSpeed tied modules to
    ``<default_root_dir>/parameters.rank{R}.json``."""

    def on_train_start(self, trainer, pl_module) -> None:
        parameters = list(pl_module.pipe.parameters())
        storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in parameters}
        record = {"parameters": sum(p.numel() for p in parameters), "bytes": sum(storages.values())}
        record["tied_modules"] = sorted(pl_module.pipe.tied_modules)
        (Path(trainer.default_root_dir) / f"parameters.rank{trainer.global_rank}.json").write_text(json.dumps(record))


class KillAtStep(pl.Callback):
    """Kills its own process with SIGKILL when the given optimizer step is about to run (a crash, not an exit)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        import os
        import signal

        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class SignalAtStep(pl.Callback):
    """Sends ``signal`` (a name: ``SIGTERM``, ``SIGINT``) to its own process when the given optimizer step has just
    finished, on rank ``rank`` only (every rank when None): as ``kill -TERM <pid>`` or Ctrl-C would."""

    def __init__(self, step: int, signal: str = "SIGTERM", rank: int | None = None) -> None:
        self.step = step
        self.signal = signal
        self.rank = rank

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        import os
        import signal

        if trainer.global_step == self.step and self.rank in (None, trainer.global_rank):
            os.kill(os.getpid(), getattr(signal, self.signal))


class FailCheckpointWrites(pl.Callback):
    """From the given optimizer step on, on rank ``rank`` only, every ``torch.save`` to a file fails as on a full
    disk: it writes the first half of the file, then raises ``OSError(ENOSPC)``."""

    def __init__(self, step: int, rank: int = 0) -> None:
        self.step = step
        self.rank = rank

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            import torch

            torch.save = half_written(torch.save, OSError(28, "No space left on device"))


def half_written(save, error: Exception):
    """A ``torch.save`` that writes the first half of what ``save`` would write to a path, then raises ``error``."""
    import io

    def failing_save(obj, f, *args, **kwargs):
        if not isinstance(f, (str, Path)):
            return save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        save(obj, buffer, *args, **kwargs)
        Path(f).write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise error

    return failing_save
