"""A run's directory (``trainer.default_root_dir``): what a run may write into it, and its lock.

A run owns its root: its checkpoints (``<root>/checkpoints`` unless ``checkpoint.dirpath`` says otherwise), its
exports (``epoch{N}/``, ``step{S}/``), ``config.yaml`` and its logs. The CLI checks these rules before anything
is written:

- a new run (no ``--ckpt_path``) refuses a root that holds another run's checkpoints or exports;
- ``--ckpt_path last`` resumes from the checkpoint ``last.ckpt`` points at, or, when that link is broken, from the
  newest complete checkpoint, saying so;
- while a run trains, its first process holds an exclusive lock on ``<root>/.lit-qlp.lock`` (deleted when the
  run ends; a killed run's lock goes with its process); a second run into the same root fails at once, naming the
  first one's pid.
"""

from __future__ import annotations

import fcntl
import os
import re
import time
from pathlib import Path
from typing import IO

from lit_qlp.strategies.retention import LAST_NAME, complete_checkpoints, is_complete_checkpoint, point_link

LOCK_NAME = ".lit-qlp.lock"


def export_pattern(dirname: str) -> re.Pattern[str]:
    """The directory names of a run's exports: ``dirname`` (``export.dirname``, with ``{epoch}``) and ``step{S}``."""
    epoch = re.escape(dirname).replace(re.escape("{epoch}"), r"\d+")
    return re.compile(rf"^(?:{epoch}|step\d+)$")


def check_new_run(root: Path, checkpoint_dir: Path, export_dirname: str) -> None:
    """Refuses to start a new run (no ``--ckpt_path``) in a root that holds another run's checkpoints or exports.

    Raises:
        FileExistsError: naming what is there and the two ways on.
    """
    found = sorted(str(p) for p in checkpoint_dir.glob("*.ckpt") if p.exists()) if checkpoint_dir.is_dir() else []
    pattern = export_pattern(export_dirname)
    if root.is_dir():
        found += sorted(str(p) for p in root.iterdir() if p.is_dir() and pattern.match(p.name))
    if found:
        listed = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
        raise FileExistsError(
            f"trainer.default_root_dir={str(root)!r} holds another run's checkpoints or exports ({listed}); a new "
            "run does not write over them. Resume that run with --ckpt_path last, or set trainer.default_root_dir "
            "to a new directory"
        )


def resolve_last(checkpoint_dir: Path, root: Path, repair: bool) -> Path | None:
    """What ``--ckpt_path last`` resumes from: ``None`` when ``last.ckpt`` points at a complete checkpoint
    (Lightning resolves it), else the newest complete checkpoint, announced on the console; with ``repair``,
    ``last.ckpt`` is re-pointed at it.

    Raises:
        FileNotFoundError: no complete checkpoint in ``checkpoint_dir``.
    """
    last = checkpoint_dir / LAST_NAME
    if is_complete_checkpoint(last):
        return None
    complete = complete_checkpoints(checkpoint_dir)
    if not complete:
        raise FileNotFoundError(
            f"--ckpt_path last: no checkpoint in {checkpoint_dir} (trainer.default_root_dir={str(root)!r}); point "
            "trainer.default_root_dir at the run to resume, or leave out --ckpt_path to start a new run"
        )
    newest = complete[-1]
    if last.is_symlink():
        broken = f"{last} points at {os.readlink(last)}, which is {'incomplete' if last.exists() else 'missing'}"
    else:
        broken = f"{last} is {'not a complete checkpoint' if last.exists() else 'missing'}"
    if repair:
        point_link(last, newest)
    print(f"lit-qlp: {broken}; resuming from the newest complete checkpoint, {newest}", flush=True)
    return newest


def is_first_process() -> bool:
    """Whether this is the run's first process (global rank 0), read from the launchers' variables: torchrun and
    DeepSpeed's launcher set ``RANK``; Lightning starts further local processes with ``LOCAL_RANK`` (and nodes with
    ``NODE_RANK``)."""
    return all(int(os.environ.get(name, "0")) == 0 for name in ("RANK", "LOCAL_RANK", "NODE_RANK"))


class RunLock:
    """An exclusive lock on a run's root, held while the run trains (``fcntl.flock`` on ``<root>/.lit-qlp.lock``).

    The lock file records the holder's pid and start time and is deleted when the run ends, however ``fit`` ends
    (a root the lock had to create is removed again if it is still empty). A killed run leaves the file but not
    the lock: the operating system releases it with the process, and the next run takes it.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.path = self.root / LOCK_NAME
        self._file: IO[str] | None = None
        self._created_root = False

    def acquire(self) -> None:
        """Takes the lock or fails at once.

        Raises:
            RuntimeError: another process holds it (its pid in the message).
        """
        self._created_root = not self.root.exists()
        self.root.mkdir(parents=True, exist_ok=True)
        while True:
            handle = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 (held open while the run lasts)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "pid unknown"
                handle.close()
                raise RuntimeError(
                    f"trainer.default_root_dir={str(self.root)!r} is in use by another lit-qlp run ({holder}; lock "
                    f"{self.path}); wait for it to end, or set trainer.default_root_dir to a new directory"
                ) from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(handle.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            handle.close()  # the holder deleted the file as it ended: lock the file that is there now
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        self._file = handle

    def release(self) -> None:
        """Deletes the lock file while still holding the lock, then releases it."""
        if self._file is None:
            return
        self.path.unlink(missing_ok=True)
        fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()
        self._file = None
        if self._created_root and not any(self.root.iterdir()):
            self.root.rmdir()


__all__ = ["LOCK_NAME", "RunLock", "check_new_run", "export_pattern", "is_first_process", "resolve_last"]
