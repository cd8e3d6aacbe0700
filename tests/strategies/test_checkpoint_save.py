"""A checkpoint save that fails (a full disk): every rank fails with "no space left on <dir>" and the sizes, the
partial save is deleted, the earlier checkpoints and ``last`` stay, and the run resumes from ``last``."""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from lit_qlp.cli import main
from lit_qlp.strategies.checkpointing import WriteFailure, format_size, is_disk_full, save_failure_error
from tests.recording import half_written
from tests.runs import ROOT, TWO_STAGES, fit_args, scalars

DiskUsage = namedtuple("DiskUsage", "total used free")
TORCH_WRITE_ERROR = "[enforce fail at inline_container.cc:672] . unexpected pos 4352 vs 4288"


def test_format_size():
    assert [format_size(n) for n in (0, 1023, 1024, 1536, 5 * 2**20, 3 * 2**30, 2**42)] == [
        "0 B",
        "1023 B",
        "1.0 KiB",
        "1.5 KiB",
        "5.0 MiB",
        "3.0 GiB",
        "4.0 TiB",
    ]


def test_is_disk_full():
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"), free=10**12, needed=1)
    assert is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"), free=10**12, needed=1)
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"), free=0, needed=1)
    # torch's failed write carries no errno: it is a full disk when less than a checkpoint is free.
    assert is_disk_full(RuntimeError(TORCH_WRITE_ERROR), free=100, needed=1000)
    assert is_disk_full(RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"), 0, 1)
    assert not is_disk_full(RuntimeError(TORCH_WRITE_ERROR), free=10**12, needed=1000)
    assert not is_disk_full(RuntimeError("CUDA error"), free=0, needed=1000)


def test_save_failure_error_names_the_full_disk_else_the_failed_write(tmp_path):
    final = tmp_path / "epoch=0-step=6.ckpt"
    other = WriteFailure(0, "a.pt", "RuntimeError: boom", False, 10**9, 10, None, 0)
    full = WriteFailure(1, "b.pt", "OSError: [Errno 28] No space", True, 512, 3 * 2**20, "epoch=0-step=3.ckpt", 2**23)
    error = save_failure_error([other, full], final)
    assert isinstance(error, OSError) and error.errno == errno.ENOSPC
    assert f"no space left on {tmp_path} while saving checkpoint epoch=0-step=6.ckpt: 512 B free, 3.0 MiB" in str(error)
    assert "rank 1 could not write b.pt" in str(error)
    assert "the previous checkpoint, epoch=0-step=3.ckpt, takes 8.0 MiB" in str(error)
    assert "set checkpoint.dirpath" in str(error)
    error = save_failure_error([other], final)
    assert isinstance(error, RuntimeError) and "rank 0 could not write a.pt (RuntimeError: boom)" in str(error)


def assert_earlier_checkpoints_intact(checkpoints: Path, step: int) -> None:
    """Only the checkpoint of ``step`` and ``last`` (pointing to it), complete; no ``.partial`` left."""
    saved = sorted(p.name for p in checkpoints.iterdir())
    assert saved == [f"epoch=0-step={step}.ckpt", "last.ckpt"], saved
    assert (checkpoints / "last.ckpt").resolve().name == f"epoch=0-step={step}.ckpt"
    assert (checkpoints / "last.ckpt" / "latest").read_text() == f"global_step{step}"


@pytest.mark.usefixtures("clean_process_state")
def test_a_full_disk_fails_the_save_cleanly_and_the_run_resumes(tiny_model, corpus, tmp_path, monkeypatch):
    """torch's failed write (half the file written, then "unexpected pos") at the step-6 save, with 4 KiB free."""
    args = fit_args(
        tiny_model("llama"), corpus, tmp_path, "--trainer.max_steps=8", "--checkpoint.every_n_train_steps=3"
    )
    args.append("--trainer.enable_progress_bar=false")
    checkpoints = tmp_path / "checkpoints"
    real_save, real_disk_usage = torch.save, shutil.disk_usage
    failing = half_written(real_save, RuntimeError(TORCH_WRITE_ERROR))

    def save(obj, f, *args, **kwargs):
        return (failing if "step=6" in str(f) else real_save)(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: DiskUsage(2**30, 2**30 - 4096, 4096))
    monkeypatch.chdir(ROOT)
    with pytest.raises(OSError) as raised:
        main(args)
    assert raised.value.errno == errno.ENOSPC
    message = str(raised.value)
    assert f"no space left on {checkpoints} while saving checkpoint epoch=0-step=6.ckpt: 4.0 KiB free" in message
    assert re.search(r"the previous checkpoint, epoch=0-step=3\.ckpt, takes \d+\.\d KiB", message), message
    assert "unexpected pos" in message and "The partial save was deleted" in message
    assert_earlier_checkpoints_intact(checkpoints, 3)
    monkeypatch.setattr(torch, "save", real_save)
    monkeypatch.setattr(shutil, "disk_usage", real_disk_usage)
    main([*args, "--ckpt_path=last"])
    assert (checkpoints / "last.ckpt").resolve().name == "epoch=0-step=8.ckpt"
    assert sorted(scalars(tmp_path, "train/loss")) == list(range(8))


@pytest.mark.slow
def test_a_rank_whose_disk_is_full_fails_every_rank_without_a_hang(tiny_model, corpus, tmp_path):
    """Two processes; only rank 1's writes fail (ENOSPC) at the step-4 save: both stop, rank 0 with rank 1's reason."""
    args = fit_args(tiny_model("llama"), corpus, tmp_path, *TWO_STAGES, "--checkpoint.every_n_train_steps=2")
    failing = "--trainer.callbacks+={class_path: tests.recording.FailCheckpointWrites, init_args: {step: 4, rank: 1}}"
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, "-m", "lit_qlp", *args, failing]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 1, result.stderr[-3000:]
    checkpoints = tmp_path / "checkpoints"
    assert f"no space left on {checkpoints} while saving checkpoint epoch=0-step=4.ckpt" in result.stderr
    assert "rank 1 could not write" in result.stderr and "No space left on device" in result.stderr
    assert_earlier_checkpoints_intact(checkpoints, 2)
