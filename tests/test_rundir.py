"""A run directory never loses work: ``last`` never dangles, a new run never writes into another run's root, the
root is locked while a run trains, ``config.yaml`` is only written by a run that starts, exports are never
overwritten, and a resumed run may change ``max_checkpoints``.

The runs go through the real CLI in this process (``lit_qlp.cli.main``) on the tiny llama; one finished run
(module fixture) is copied into each test's own root.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest

from lit_qlp.cli import main
from lit_qlp.rundir import LOCK_NAME, RunLock
from lit_qlp.strategies.retention import is_complete_checkpoint
from tests.runs import ROOT, fit_args, scalars

pytestmark = pytest.mark.usefixtures("clean_process_state")  # tests/conftest.py: the CLI runs in this process

# Checkpoints at steps 2, 4 and 6, all three kept; the run stops mid-epoch, so its export is step6/.
FINISHED = ("--trainer.max_steps=6", "--checkpoint.every_n_train_steps=2", "--checkpoint.max_checkpoints=3")
QUIET = ("--trainer.enable_progress_bar=false", "--data.evals_per_epoch=1")


def fit(tiny_model, corpus, root: Path, *extra: str) -> None:
    """``lit-qlp fit`` of the tiny llama into ``root``, from the repository (the config's relative paths)."""
    args = fit_args(tiny_model("llama"), corpus, root, *QUIET, *extra)
    os.chdir(ROOT)
    try:
        main(args)
    except SystemExit as exit_:
        assert not exit_.code, f"lit-qlp exited with {exit_.code}"


def snapshot(root: Path) -> dict[str, tuple[bool, int, bytes | None]]:
    """Every path under ``root`` with whether it is a link, its size and (for files) its bytes."""
    found = {}
    for path in sorted(root.rglob("*")):
        link = path.is_symlink()
        content = path.read_bytes() if path.is_file() and not link else os.readlink(path).encode() if link else None
        found[str(path.relative_to(root))] = (link, path.lstat().st_size if not path.is_dir() else 0, content)
    return found


def step_checkpoints(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "checkpoints").iterdir() if p.name != "last.ckpt")


def new_events(root: Path, before: set[Path]) -> Path:
    """A copy of ``root`` holding only the TensorBoard files written since ``before``."""
    view = root.parent / f"{root.name}-new-events"
    view.mkdir()
    for events in set(root.glob("events.out.tfevents.*")) - before:
        shutil.copy(events, view)
    return view


@pytest.fixture(scope="module")
def finished_run(tiny_model, corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("finished") / "root"
    saved = dict(os.environ), os.getcwd(), sys.argv
    sys.argv = ["lit-qlp"]
    try:
        fit(tiny_model, corpus, root, *FINISHED)
    finally:
        os.environ.clear()
        os.environ.update(saved[0])
        os.chdir(saved[1])
        sys.argv = saved[2]
    assert step_checkpoints(root) == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt", "epoch=0-step=6.ckpt"]
    assert (root / "step6").is_dir()
    return root


@pytest.fixture
def run_root(finished_run, tmp_path) -> Path:
    """This test's copy of the finished run (links copied as links)."""
    root = tmp_path / "root"
    shutil.copytree(finished_run, root, symlinks=True)
    return root


# ----------------------------------------------------------------------------------------------------- last


def test_last_points_at_a_complete_checkpoint_when_a_save_is_killed_while_deleting(
    tiny_model, corpus, tmp_path, monkeypatch
):
    """``max_checkpoints 1``: the run dies while the save at step 4 deletes the step-2 checkpoint. ``last`` must
    already point at step 4 (Lightning deletes first and re-points ``last`` afterwards)."""
    from lit_qlp.strategies import PipelineStrategy

    class Killed(Exception):
        pass

    remove = PipelineStrategy.remove_checkpoint

    def remove_then_die(self, filepath):
        remove(self, filepath)
        raise Killed(filepath)

    monkeypatch.setattr(PipelineStrategy, "remove_checkpoint", remove_then_die)
    root = tmp_path / "root"
    extra = ("--trainer.max_steps=6", "--checkpoint.every_n_train_steps=2", "--checkpoint.max_checkpoints=1")
    with pytest.raises(Killed, match="step=2"):
        fit(tiny_model, corpus, root, *extra)
    last = root / "checkpoints" / "last.ckpt"
    assert is_complete_checkpoint(last), f"last.ckpt -> {os.readlink(last)} is not a complete checkpoint"
    assert last.resolve().name == "epoch=0-step=4.ckpt"


def test_a_broken_last_resumes_from_the_newest_complete_checkpoint_and_says_so(run_root, tiny_model, corpus, capsys):
    """``last`` points at the deleted step-2 checkpoint while steps 4 and 6 are complete: the resume continues
    from step 6 (not from scratch), says so, and re-points ``last``."""
    checkpoints = run_root / "checkpoints"
    shutil.rmtree(checkpoints / "epoch=0-step=2.ckpt")
    (checkpoints / "last.ckpt").unlink()
    (checkpoints / "last.ckpt").symlink_to("epoch=0-step=2.ckpt")
    before = set(run_root.glob("events.out.tfevents.*"))
    fit(tiny_model, corpus, run_root, *FINISHED[1:], "--trainer.max_steps=8", "--ckpt_path=last")
    out = capsys.readouterr().out
    assert "epoch=0-step=2.ckpt, which is missing" in out, out[-2000:]
    assert f"resuming from the newest complete checkpoint, {checkpoints / 'epoch=0-step=6.ckpt'}" in out
    assert sorted(scalars(new_events(run_root, before), "train/loss")) == [6, 7]
    assert (checkpoints / "last.ckpt").resolve().name == "epoch=0-step=8.ckpt"


def test_validate_with_a_broken_last_uses_the_newest_complete_checkpoint_and_repairs_nothing(run_root, capsys):
    checkpoints = run_root / "checkpoints"
    (checkpoints / "last.ckpt").unlink()
    before = snapshot(run_root)
    assert run_validate(run_root) == 0
    assert "resuming from the newest complete checkpoint" in capsys.readouterr().out
    assert not (checkpoints / "last.ckpt").exists()
    assert_only_new_logs(run_root, before)


@pytest.mark.parametrize("moved", [False, True], ids=["same_root", "moved_root"])
def test_fewer_max_checkpoints_on_resume_keeps_the_newest_only(moved, finished_run, tiny_model, corpus, tmp_path):
    """A run that kept 3 checkpoints, resumed with ``max_checkpoints 1``, keeps only its newest (also when its
    directory was moved since)."""
    root = tmp_path / "root"
    if moved:
        shutil.copytree(finished_run, root, symlinks=True)
    else:
        fit(tiny_model, corpus, root, *FINISHED)
    extra = ("--trainer.max_steps=10", "--checkpoint.every_n_train_steps=2", "--checkpoint.max_checkpoints=1")
    fit(tiny_model, corpus, root, *extra, "--ckpt_path=last")
    assert step_checkpoints(root) == ["epoch=0-step=10.ckpt"]
    assert (root / "checkpoints" / "last.ckpt").resolve().name == "epoch=0-step=10.ckpt"


# ----------------------------------------------------------------------------------------------------- new runs


@pytest.mark.parametrize("kind", ["checkpoint", "epoch_export", "step_export"])
def test_a_new_run_refuses_a_root_holding_another_runs_work(kind, tiny_model, corpus, tmp_path):
    root = tmp_path / "root"
    held = {
        "checkpoint": root / "checkpoints" / "epoch=0-step=10.ckpt",
        "epoch_export": root / "epoch1",
        "step_export": root / "step7",
    }[kind]
    held.mkdir(parents=True)
    (root / "config.yaml").write_text("the other run's config\n")
    before = snapshot(root)
    with pytest.raises(FileExistsError) as info:
        fit(tiny_model, corpus, root)
    message = str(info.value)
    for fragment in (str(held), "--ckpt_path last", "trainer.default_root_dir"):
        assert fragment in message, message
    assert snapshot(root) == before


def test_a_finished_run_is_refused_as_the_root_of_a_new_run_and_left_untouched(run_root, tiny_model, corpus):
    before = snapshot(run_root)
    with pytest.raises(FileExistsError, match="--ckpt_path last"):
        fit(tiny_model, corpus, run_root, *FINISHED)
    assert snapshot(run_root) == before


HOLD_LOCK = (
    "import sys, time; from lit_qlp.rundir import RunLock; lock = RunLock(sys.argv[1]); lock.acquire(); "
    "print('held', flush=True); time.sleep(60)"
)


def test_a_second_run_into_a_locked_root_fails_at_once_naming_the_first_ones_pid(tiny_model, corpus, tmp_path):
    root = tmp_path / "root"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(root)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RuntimeError, match=f"in use by another lit-qlp run \\(pid {holder.pid},"):
            fit(tiny_model, corpus, root)
        assert sorted(p.name for p in root.iterdir()) == [LOCK_NAME]
    finally:
        holder.kill()
        holder.wait()
    lock = RunLock(root)
    lock.acquire()  # the holder's lock went with its process
    lock.release()


class ProbeLock(pl.Callback):
    """After the first training step, tries to take the root's lock from another process (``results``)."""

    results: list[subprocess.CompletedProcess] = []

    def on_train_batch_end(self, trainer, *args) -> None:
        if not self.results:
            command = [sys.executable, "-c", HOLD_LOCK.replace("time.sleep(60)", "0"), trainer.default_root_dir]
            self.results.append(subprocess.run(command, cwd=ROOT, capture_output=True, text=True))


def test_a_training_run_holds_the_lock_and_releases_it(tiny_model, corpus, tmp_path):
    root = tmp_path / "root"
    ProbeLock.results.clear()
    fit(tiny_model, corpus, root, "--trainer.max_steps=2", "--trainer.callbacks+=tests.test_rundir.ProbeLock")
    probe = ProbeLock.results[0]
    assert probe.returncode != 0 and f"pid {os.getpid()}," in probe.stderr, probe.stderr[-2000:]
    assert not (root / LOCK_NAME).exists()
    lock = RunLock(root)
    lock.acquire()
    lock.release()


# ----------------------------------------------------------------------------------------------------- config.yaml


def run_validate(root: Path, *extra: str) -> int:
    config = str(root / "config.yaml")
    try:
        main(["validate", "--config", config, f"--trainer.default_root_dir={root}", "--ckpt_path=last", *extra])
    except SystemExit as exit_:
        return exit_.code or 0
    return 0


def assert_only_new_logs(root: Path, before: dict) -> None:
    """Nothing in ``root`` changed but new TensorBoard event files."""
    after = snapshot(root)
    changed = {k for k in before if after.get(k) != before[k]}
    added = {k for k in after if k not in before}
    assert not changed, f"changed: {sorted(changed)}"
    assert all(k.startswith("events.out.tfevents.") for k in added), f"added: {sorted(added)}"


def test_validate_writes_nothing_into_the_root_but_its_log(run_root):
    before = snapshot(run_root)
    assert run_validate(run_root, "--trainer.max_epochs=3") == 0
    assert_only_new_logs(run_root, before)


def test_a_bad_ckpt_path_leaves_the_config_as_it_was(run_root, tiny_model, corpus, tmp_path):
    not_a_checkpoint = tmp_path / "not_a_checkpoint.ckpt"
    not_a_checkpoint.mkdir()
    config = (run_root / "config.yaml").read_bytes()
    with pytest.raises(FileNotFoundError, match="not a lit-qlp checkpoint directory"):
        fit(tiny_model, corpus, run_root, *FINISHED, "--model.method.rank=8", f"--ckpt_path={not_a_checkpoint}")
    assert (run_root / "config.yaml").read_bytes() == config


def test_the_config_survives_refused_runs_and_validate_and_still_converts(run_root, tiny_model, corpus, tmp_path):
    """The issue's sequence: a refused run with another rank, then validate; the run's config still converts
    its checkpoint."""
    with pytest.raises(FileExistsError):
        fit(tiny_model, corpus, run_root, "--model.method.rank=8")
    assert run_validate(run_root) == 0
    command = [sys.executable, "tools/convert_ds_checkpoint.py", "--input", str(run_root / "checkpoints" / "last.ckpt")]
    command += ["--config", str(run_root / "config.yaml"), "--output", str(tmp_path / "converted")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "converted" / "adapter_model.safetensors").is_file()


# ----------------------------------------------------------------------------------------------------- exports


def test_an_export_the_run_would_overwrite_is_refused_before_step_one(run_root, tiny_model, corpus):
    """Resuming from step 4 with ``max_steps 6`` would write step6/ again: refused before training."""
    before = snapshot(run_root)
    events = set(run_root.glob("events.out.tfevents.*"))
    start = run_root / "checkpoints" / "epoch=0-step=4.ckpt"
    with pytest.raises(FileExistsError, match="step6"):
        fit(tiny_model, corpus, run_root, *FINISHED, f"--ckpt_path={start}")
    assert not scalars(new_events(run_root, events), "train/loss")
    for name in ("checkpoints/last.ckpt", "checkpoints/epoch=0-step=6.ckpt/latest", "config.yaml"):
        assert snapshot(run_root)[name] == before[name], name
