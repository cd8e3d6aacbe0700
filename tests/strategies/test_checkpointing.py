"""Checkpoints load with ``weights_only=True``: a crafted file is refused, naming the file, and none of its code runs.

One tiny CLI run writes a real checkpoint; copies of it get one file replaced by a crafted one that keeps the real
content and adds an object whose unpickling would run ``touch <marker>`` through ``os.system``.
"""

from __future__ import annotations

import os
import pickle
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lit_qlp.cli import main
from tests.runs import ROOT, fit_args, run_cli

pytestmark = pytest.mark.slow
REFUSED = "refusing to unpickle GLOBAL posix.system"


class RunsCode:
    """Unpickling this runs ``touch marker`` through ``os.system``, as a crafted checkpoint's object would."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


@pytest.fixture(scope="module")
def run_root(tiny_model, corpus, tmp_path_factory) -> Path:
    """A 3-step single-process LoRA run that saved its checkpoint at step 3."""
    root = tmp_path_factory.mktemp("run")
    run_cli(
        fit_args(tiny_model("llama"), corpus, root, "--trainer.max_steps=3", "--checkpoint.every_n_train_steps=3"), ROOT
    )
    return root


def crafted_checkpoint(run_root: Path, directory: Path, name: str, marker: Path) -> tuple[Path, Path]:
    """A copy of the run's checkpoint in which file ``name`` also holds a ``RunsCode``; the copy and that file."""
    checkpoint = directory / "crafted.ckpt"
    shutil.copytree((run_root / "checkpoints" / "last.ckpt").resolve(), checkpoint)
    (file,) = checkpoint.glob(f"global_step*/{name}")
    state = torch.load(file, weights_only=True)
    state["payload"] = RunsCode(marker)
    torch.save(state, file)
    return checkpoint, file


def test_every_file_of_a_checkpoint_loads_with_weights_only(run_root):
    (step_dir,) = (run_root / "checkpoints" / "last.ckpt").resolve().glob("global_step*")
    files = sorted(step_dir.glob("*.pt"))
    assert {f.name for f in files} >= {"mp_rank_00_model_states.pt", "layer_00-model_states.pt"}
    for file in files:
        torch.load(file, weights_only=True)


@pytest.mark.usefixtures("clean_process_state")
def test_validate_reads_every_file_of_the_checkpoint_with_weights_only(run_root, tmp_path, monkeypatch):
    from lit_qlp.strategies import checkpointing

    read = []

    def spy(path, map_location="cpu"):
        read.append(Path(path).name)
        return load(path, map_location)

    load = checkpointing.load_checkpoint_file
    monkeypatch.setattr(checkpointing, "load_checkpoint_file", spy)
    monkeypatch.chdir(ROOT)
    checkpoint = run_root / "checkpoints" / "last.ckpt"
    args = ["validate", "--config", str(run_root / "config.yaml"), f"--trainer.default_root_dir={tmp_path}"]
    main([*args, "--ckpt_path", str(checkpoint)])
    (step_dir,) = checkpoint.resolve().glob("global_step*")
    assert set(read) == {f.name for f in step_dir.glob("*.pt")}


@pytest.mark.usefixtures("clean_process_state")
@pytest.mark.parametrize(
    "subcommand, name, flags",
    [
        ("validate", "mp_rank_00_model_states.pt", ["--weights_only", "true"]),
        ("fit", "layer_01-model_states.pt", []),  # Lightning's default, weights_only=None
        ("validate", "layer_00-model_states.pt", ["--weights_only", "false"]),  # never reaches the strategy
    ],
)
def test_a_crafted_checkpoint_is_refused_and_runs_nothing(subcommand, name, flags, run_root, tmp_path, monkeypatch):
    marker = tmp_path / "marker"
    checkpoint, file = crafted_checkpoint(run_root, tmp_path, name, marker)
    monkeypatch.chdir(ROOT)
    args = [subcommand, "--config", str(run_root / "config.yaml"), f"--trainer.default_root_dir={tmp_path / 'out'}"]
    with pytest.raises(pickle.UnpicklingError, match=re.escape(f"{file}: {REFUSED}")):
        main([*args, "--ckpt_path", str(checkpoint), *flags])
    assert not marker.exists(), "loading the checkpoint ran the crafted object's code"


def test_converting_a_crafted_checkpoint_is_refused_and_runs_nothing(run_root, tmp_path):
    from lit_qlp.export.checkpoint import convert_ds_checkpoint

    marker = tmp_path / "marker"
    checkpoint, file = crafted_checkpoint(run_root, tmp_path, "layer_01-model_states.pt", marker)
    with pytest.raises(pickle.UnpicklingError, match=re.escape(f"{file}: {REFUSED}")):
        convert_ds_checkpoint(checkpoint, run_root / "config.yaml", tmp_path / "export")
    assert not marker.exists(), "converting the checkpoint ran the crafted object's code"
    tool = [sys.executable, str(ROOT / "tools" / "convert_ds_checkpoint.py"), "--input", str(checkpoint)]
    tool += ["--config", str(run_root / "config.yaml"), "--output", str(tmp_path / "cli")]
    result = subprocess.run(tool, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]
    assert f"error: {file}: {REFUSED}" in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert not marker.exists(), "the converter ran the crafted object's code"
