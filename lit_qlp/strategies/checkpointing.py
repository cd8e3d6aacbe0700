"""Checkpoints as DeepSpeed checkpoint directories: written under a ``.partial`` name, published when complete, read
with ``weights_only=True``."""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import torch

from lit_qlp.compat.deepspeed import checkpoint_files_read_with, checkpoint_write_failure_kept
from lit_qlp.strategies.retention import complete_checkpoints


def save_engine_checkpoint(strategy: Any, checkpoint: dict[str, Any], filepath: Path) -> None:
    """Every rank writes its stage's trainable weights and optimizer state into the directory ``filepath``.

    Write, then publish: the ranks write into ``<filepath>.partial``; only when all have finished does global rank 0
    rename it to ``filepath`` (then local rank 0 of any node whose filesystem it does not share renames that node's
    copy). A crash during the save leaves a ``.partial`` directory and every earlier checkpoint, ``last``
    included, intact. Lightning's own state travels as DeepSpeed's client state.

    A write that fails on any rank (a full disk, above all) fails the save on every rank, none left waiting: the
    ranks agree on the outcome before publishing, delete the ``.partial`` directory, so that its space is free for
    the resumed run, and raise ``save_failure_error``'s error (``OSError(ENOSPC)`` naming the directory and the
    sizes for a full disk). The earlier checkpoints stay as they were.

    Args:
        strategy: The ``PipelineStrategy`` (its engine, ranks and collectives).
        checkpoint: Lightning's checkpoint dict.
        filepath: The checkpoint directory to publish.
    """
    # Weights and optimizer state are the engine's files; "optimizer_states" stays (empty) as Lightning expects it.
    client_state = {k: v for k, v in checkpoint.items() if k != "state_dict"}
    final = Path(filepath)
    partial = final.with_name(final.name + ".partial")
    if strategy.local_rank == 0 and partial.exists():
        shutil.rmtree(partial, ignore_errors=True)  # the remains of an interrupted save (any node may clear it)
    strategy.barrier("checkpoint-start")
    error, failure = write_partial(strategy.engine, partial, client_state, strategy.global_rank)
    failures = [f for f in strategy.all_gather_object(failure) if f is not None]  # every rank learns the outcome
    if failures:
        if strategy.local_rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
        strategy.barrier("checkpoint-discarded")
        raise save_failure_error(failures, final) from error
    if strategy.is_global_zero:
        publish(partial, final)
    strategy.barrier("checkpoint-published")
    if strategy.local_rank == 0 and not strategy.is_global_zero and partial.exists():
        publish(partial, final)  # a node whose filesystem global rank 0 does not share
    strategy.barrier("checkpoint-published-on-every-node")


class WriteFailure(NamedTuple):
    """What a rank whose checkpoint write failed tells the others (``write_failure``)."""

    rank: int
    path: str  # the file or directory that could not be written
    error: str
    disk_full: bool
    free: int  # bytes free on the checkpoint directory's filesystem after the failure
    written: int  # bytes of the partial checkpoint on disk after the failure
    previous: str | None  # the newest complete checkpoint beside it
    previous_size: int


def write_partial(
    engine: Any, partial: Path, client_state: dict[str, Any], rank: int
) -> tuple[Exception | None, WriteFailure | None]:
    """This rank's part of the checkpoint, written into ``partial`` (global rank 0 also writes DeepSpeed's
    ``latest``); the error of a write that failed and its ``write_failure``, or ``(None, None)``. Collective."""
    tag = f"global_step{engine.global_steps}"
    with checkpoint_write_failure_kept(engine) as kept:
        engine.save_checkpoint(
            str(partial), tag=tag, client_state=client_state, exclude_frozen_parameters=True, save_latest=False
        )
    error, path = kept.error, kept.path
    if error is None and rank == 0:
        try:
            (partial / "latest").write_text(tag)  # DeepSpeed's own write of it is outside its checkpoint engine
        except OSError as latest_error:
            error, path = latest_error, str(partial / "latest")
    if error is None:
        return None, None
    return error, write_failure(error, Path(path or partial), rank, partial)


def write_failure(error: Exception, path: Path, rank: int, partial: Path) -> WriteFailure:
    """Measures, before ``partial`` is deleted, what the error message of a failed write reports."""
    directory = partial.parent
    written = directory_size(partial)
    complete = complete_checkpoints(directory)
    previous = complete[-1] if complete else None
    previous_size = directory_size(previous) if previous is not None else 0
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        free = 0
    disk_full = is_disk_full(error, free, needed=previous_size or written)
    message = f"{type(error).__name__}: {error}"
    shown = path.relative_to(partial) if path.is_relative_to(partial) else path
    return WriteFailure(rank, str(shown), message, disk_full, free, written, previous and previous.name, previous_size)


# What torch raises when writing a checkpoint file fails (its errno is lost on the way).
TORCH_WRITE_FAILURES = ("unexpected pos", "file write failed")


def is_disk_full(error: BaseException, free: int, needed: int) -> bool:
    """Whether a failed write ran out of space: ``ENOSPC`` (or ``EDQUOT``, a quota), or torch's ``RuntimeError`` of
    a failed write (``unexpected pos``, ``file write failed``), which carries no errno, while less than ``needed``
    bytes (a checkpoint's size) are free."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    failed_write = isinstance(error, RuntimeError) and any(m in str(error) for m in TORCH_WRITE_FAILURES)
    return failed_write and free < needed


def save_failure_error(failures: list[WriteFailure], final: Path) -> Exception:
    """The error every rank raises for a save that failed: ``OSError(ENOSPC)`` "no space left on <dir>" with the
    free space, what was written and the previous checkpoint's size when a disk is full, else ``RuntimeError``."""
    full = [f for f in failures if f.disk_full]
    failure = (full or failures)[0]
    kept = f"The partial save was deleted; the earlier checkpoints in {final.parent}, last.ckpt included, are intact"
    if not full:
        return RuntimeError(
            f"saving checkpoint {final.name} failed: rank {failure.rank} could not write {failure.path} "
            f"({failure.error}). {kept}"
        )
    previous = (
        f"; the previous checkpoint, {failure.previous}, takes {format_size(failure.previous_size)}"
        if failure.previous
        else ""
    )
    return OSError(
        errno.ENOSPC,
        f"no space left on {final.parent} while saving checkpoint {final.name}: {format_size(failure.free)} free, "
        f"{format_size(failure.written)} of it written when rank {failure.rank} could not write {failure.path} "
        f"({failure.error}){previous}. {kept}. Free space there, or set checkpoint.dirpath to a filesystem with "
        "room, then resume with --ckpt_path last",
    )


def format_size(size: int) -> str:
    """``size`` bytes in binary units: ``512 B``, ``1.5 KiB``, ``3.2 GiB``."""
    if size < 1024:
        return f"{size} B"
    value = float(size)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024:
            return f"{value:.1f} {unit}"
    return f"{value / 1024:.1f} TiB"


def directory_size(path: Path) -> int:
    """Bytes in the files under ``path`` (0 when it does not exist); links are not followed."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def load_checkpoint_file(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """One file of a lit-qlp checkpoint, unpickled with ``weights_only=True``, so that loading it runs no code.

    lit-qlp's checkpoint files hold only what torch's weights-only unpickler accepts without an allow-list
    (tensors, dicts, lists, tuples, strings, numbers, None): the layer files hold state dicts; the ``mp_rank_*``
    files DeepSpeed's own entries (its config as a dict, its version as a string) and Lightning's state (loops,
    callbacks' and the data module's state dicts, and the hyperparameters of the CLI's config as plain values).
    A file that needs any other object is refused, naming the file and the object.

    Args:
        path: The file.
        map_location: ``torch.load``'s ``map_location``.
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise pickle.UnpicklingError(
            f"{path}: refusing to unpickle {refused_object(str(error))}: lit-qlp loads checkpoints with "
            "weights_only=True, which admits only tensors and plain Python values, so that no file can run code as "
            "it loads. lit-qlp writes nothing else into its checkpoints: this file was made or changed by other "
            "code; use a checkpoint that lit-qlp wrote"
        ) from None


def refused_object(message: str) -> str:
    """What torch's weights-only unpickler refused, from its error ``message`` (``GLOBAL posix.system``)."""
    # torch's message suggests allow-listing what it refused, which for a crafted file is the wrong advice; only the
    # name is kept, which torch writes as "GLOBAL module.name".
    found = re.search(r"GLOBAL ([\w.]+)", message)
    return f"GLOBAL {found.group(1)}" if found else "an object that is not a tensor or a plain Python value"


def load_engine_checkpoint(engine: Any, checkpoint_path: Path, with_optimizer: bool) -> dict[str, Any]:
    """Restores the engine's weights (and optimizer state) from a lit-qlp checkpoint directory, every file read
    with ``load_checkpoint_file`` (``weights_only=True``) instead of DeepSpeed's ``torch.load(weights_only=False)``;
    returns Lightning's state (DeepSpeed's client state).

    Args:
        engine: The ``PipelineEngine``.
        checkpoint_path: The checkpoint directory (with DeepSpeed's ``latest`` file).
        with_optimizer: Restore the optimizer state too (when fitting).
    """
    path = Path(checkpoint_path)
    if not path.is_dir() or not (path / "latest").is_file():
        raise FileNotFoundError(
            f"{path} is not a lit-qlp checkpoint directory (a DeepSpeed checkpoint with a 'latest' file); "
            "pass a directory from <default_root_dir>/checkpoints or 'last'"
        )
    with checkpoint_files_read_with(engine, load_checkpoint_file):
        _, client_state = engine.load_checkpoint(
            str(path), load_module_strict=False, load_optimizer_states=with_optimizer, load_lr_scheduler_states=False
        )
    if client_state is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {path}")
    return client_state


def publish(partial: Path, final: Path) -> None:
    """Renames a completely written checkpoint into place; what it replaces is removed only afterwards."""
    replaced = final.with_name(final.name + ".replaced")
    if final.exists() or final.is_symlink():  # saved again (or a `last` link): kept until the new one is in
        final.rename(replaced)
    partial.rename(final)
    if replaced.is_symlink() or replaced.is_file():
        replaced.unlink()
    elif replaced.exists():
        shutil.rmtree(replaced)


__all__ = [
    "WriteFailure",
    "format_size",
    "is_disk_full",
    "load_checkpoint_file",
    "load_engine_checkpoint",
    "publish",
    "refused_object",
    "save_engine_checkpoint",
    "save_failure_error",
    "write_partial",
]
