"""A run's checkpoint directory: which checkpoints are complete, where ``last.ckpt`` points, and deleting the
surplus without ever leaving ``last`` pointing at nothing."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

LAST_NAME = "last.ckpt"


def is_complete_checkpoint(path: Path) -> bool:
    """A published lit-qlp checkpoint: a directory named ``*.ckpt`` (not ``.partial``) with DeepSpeed's ``latest``."""
    return path.suffix == ".ckpt" and path.is_dir() and (path / "latest").is_file()


def complete_checkpoints(directory: Path) -> list[Path]:
    """The complete checkpoints in ``directory`` other than ``last.ckpt``, oldest first (by when each was written)."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.glob("*.ckpt") if p.name != LAST_NAME and not p.is_symlink()]
    return sorted((p for p in found if is_complete_checkpoint(p)), key=lambda p: (p / "latest").stat().st_mtime_ns)


def point_link(link: Path, target: Path) -> None:
    """Makes ``link`` a relative symbolic link to ``target`` in one atomic rename: at every moment ``link`` is
    either the old link or the new one (a real directory in its place, as left by a copy, is removed first)."""
    temporary = link.with_name(f"{link.name}.{os.getpid()}.link")
    if temporary.is_symlink() or temporary.exists():
        temporary.unlink()
    os.symlink(os.path.relpath(target, link.parent), temporary)
    if link.is_dir() and not link.is_symlink():
        shutil.rmtree(link)
    os.replace(temporary, link)


def remove_checkpoint(filepath: Path) -> None:
    """Deletes a checkpoint the retention policy drops. If ``last.ckpt`` beside it still points at it (Lightning
    deletes before it re-points ``last``), ``last`` is first re-pointed at the newest other complete checkpoint;
    with none, the checkpoint is kept."""
    filepath = Path(filepath)
    last = filepath.parent / LAST_NAME
    if last.is_symlink() and last.resolve() == filepath.resolve():
        others = [p for p in complete_checkpoints(filepath.parent) if p.resolve() != filepath.resolve()]
        if not others:
            return
        point_link(last, others[-1])
    if filepath.is_symlink() or filepath.is_file():
        filepath.unlink()
    elif filepath.exists():
        shutil.rmtree(filepath)


__all__ = ["LAST_NAME", "complete_checkpoints", "is_complete_checkpoint", "point_link", "remove_checkpoint"]
