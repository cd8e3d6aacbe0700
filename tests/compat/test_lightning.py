"""lit_qlp.compat.lightning against the installed Lightning; and its errors when a target is gone."""

from __future__ import annotations

import pytest
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel

from lit_qlp.compat.lightning import keep_first_loop_iter, set_checkpoint_triggers

OUTDATED = r"lightning \S+ has no .*lit_qlp/compat/lightning.py needs updating"


def trainer(tmp_path, **kwargs) -> Trainer:
    return Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def test_keep_first_loop_iter_restores_the_flag_also_after_an_error(tmp_path):
    connector = trainer(tmp_path)._logger_connector
    connector._first_loop_iter = True
    with keep_first_loop_iter(connector.trainer):
        connector.reset_results()  # what an evaluation loop does
        assert connector._first_loop_iter is None
    assert connector._first_loop_iter is True
    with pytest.raises(ValueError), keep_first_loop_iter(connector.trainer):
        connector._first_loop_iter = None
        raise ValueError
    assert connector._first_loop_iter is True


def test_keep_first_loop_iter_needs_the_logger_connectors_flag(tmp_path, monkeypatch):
    run = trainer(tmp_path)
    monkeypatch.delattr(run._logger_connector, "_first_loop_iter")
    with pytest.raises(RuntimeError, match=OUTDATED):
        with keep_first_loop_iter(run):
            pass
    monkeypatch.delattr(run, "_logger_connector")
    with pytest.raises(RuntimeError, match=OUTDATED):
        with keep_first_loop_iter(run):
            pass


@pytest.mark.parametrize(
    "every_n_train_steps,every_n_epochs,saved",
    [(2, 0, {"epoch=0-step=2", "epoch=0-step=4", "epoch=1-step=6", "epoch=1-step=8", "epoch=1-step=10"}),
     (0, 1, {"epoch=0-step=5", "epoch=1-step=10"}),
     (4, 1, {"epoch=0-step=4", "epoch=0-step=5", "epoch=1-step=8", "epoch=1-step=10"}),
     (0, 0, set())],
)  # fmt: skip
def test_set_checkpoint_triggers_decides_when_model_checkpoint_saves(
    tmp_path, every_n_train_steps, every_n_epochs, saved
):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_train_steps=3, every_n_epochs=0)
    set_checkpoint_triggers(checkpoint, every_n_train_steps, every_n_epochs)
    run = trainer(tmp_path, max_epochs=2, limit_train_batches=5, limit_val_batches=0, callbacks=[checkpoint])
    run.fit(BoringModel())
    assert {p.stem for p in (tmp_path / "ckpt").glob("*.ckpt")} == saved


def test_set_checkpoint_triggers_needs_model_checkpoints_triggers(monkeypatch):
    with pytest.raises(ValueError, match="must be >= 0"):
        set_checkpoint_triggers(ModelCheckpoint(), -1, 0)
    for name in ("_every_n_train_steps", "_every_n_epochs"):
        checkpoint = ModelCheckpoint()
        monkeypatch.delattr(checkpoint, name)
        with pytest.raises(RuntimeError, match=OUTDATED) as error:
            set_checkpoint_triggers(checkpoint, 1, 1)
        assert f"ModelCheckpoint.{name}" in str(error.value)
