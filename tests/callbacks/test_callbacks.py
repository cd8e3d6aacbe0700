"""Callbacks: the RMS-ratio schedule and the evaluation report, against their formulas."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from lit_qlp.callbacks.evaluation import evaluation_line
from lit_qlp.callbacks.schedule import RMSRatioSchedule, rms_ratio


def test_rms_ratio_is_the_formula_and_starts_above_zero():
    for beta2 in (0.9, 0.99, 0.999):
        for t in (1, 2, 10, 1000):
            assert rms_ratio(beta2, t) == pytest.approx(math.sqrt((1 - beta2**t) / (1 + beta2**t)), rel=1e-12)
        assert rms_ratio(beta2, 1) == pytest.approx(math.sqrt((1 - beta2) / (1 + beta2)))
        values = [rms_ratio(beta2, t) for t in range(1, 5000, 50)]
        assert all(b >= a for a, b in zip(values, values[1:])) and values[1] > values[0] and values[-1] <= 1
    with pytest.raises(ValueError, match="count from 1"):
        rms_ratio(0.99, 0)


@pytest.mark.parametrize("optimizer", ["optimi", "torch"])
def test_schedule_sets_each_steps_lr_from_the_initial_lr(optimizer):
    params = [torch.nn.Parameter(torch.zeros(3))]
    if optimizer == "optimi":
        from optimi import Adam

        opt = Adam(params, lr=0.1, betas=(0.9, 0.95))
    else:
        opt = torch.optim.AdamW(params, lr=0.1, betas=(0.9, 0.95))
    schedule = RMSRatioSchedule()
    for step in (0, 1, 2, 7):  # global_step before the step: the step taken is step + 1
        trainer = SimpleNamespace(global_step=step, optimizers=[opt])
        schedule.on_train_batch_start(trainer, None, None, 0)
        assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * rms_ratio(0.95, step + 1))
    assert opt.param_groups[0]["initial_lr"] == 0.1
    state = opt.state_dict()["param_groups"][0]
    assert state["initial_lr"] == 0.1  # travels in checkpoints with the optimizer state


def test_evaluation_line():
    assert evaluation_line(2.5, None) == "new evaluation loss: 2.5000"
    assert evaluation_line(2.4, 2.5) == "new evaluation loss: 2.4000 (last: 2.5000, Δ: -4.00%)"


def FakeEngine(crash: bool = False):
    """A DeepSpeed engine that only saves: a DeepSpeed-like checkpoint directory, written through its checkpoint
    engine as DeepSpeed's own, or dies half-way when ``crash`` is set."""
    from pathlib import Path

    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.engine import DeepSpeedEngine

    class SavingEngine(DeepSpeedEngine):
        def __init__(self) -> None:
            torch.nn.Module.__init__(self)  # none of DeepSpeed's set-up: this engine only saves
            self.global_steps = 1
            self.checkpoint_engine = TorchCheckpointEngine()

        def save_checkpoint(
            self, save_dir, tag=None, client_state=None, exclude_frozen_parameters=False, save_latest=True
        ):
            self.checkpoint_engine.makedirs(save_dir, exist_ok=True)
            self.checkpoint_engine.save({"weight": torch.zeros(1)}, str(Path(save_dir) / "layer_00-model_states.pt"))
            if crash:
                raise RuntimeError("killed during the save")
            if save_latest:
                (Path(save_dir) / "latest").write_text(tag or f"global_step{self.global_steps}")

    return SavingEngine()


def test_checkpoints_are_written_then_published(tmp_path):
    from lit_qlp.strategies import PipelineStrategy

    strategy = PipelineStrategy()
    good = tmp_path / "step=1.ckpt"
    strategy.engine = FakeEngine()
    strategy.save_checkpoint({"state_dict": {}, "epoch": 0}, good)
    assert (good / "latest").is_file() and not (tmp_path / "step=1.ckpt.partial").exists()

    strategy.engine = FakeEngine(crash=True)
    with pytest.raises(RuntimeError, match="killed"):
        strategy.save_checkpoint({"epoch": 0}, tmp_path / "step=2.ckpt")
    assert not (tmp_path / "step=2.ckpt").exists()  # nothing half-written under the published name
    assert (tmp_path / "step=2.ckpt.partial").exists() and (good / "latest").is_file()
    with pytest.raises(RuntimeError, match="killed"):
        strategy.save_checkpoint({"epoch": 0}, good)  # a failed re-save of the same name keeps the old one
    assert (good / "latest").read_text() == "global_step1"

    strategy.engine = FakeEngine()
    strategy.save_checkpoint({"epoch": 0}, tmp_path / "step=2.ckpt")  # the leftover .partial is cleared first
    assert (tmp_path / "step=2.ckpt" / "latest").is_file() and not (tmp_path / "step=2.ckpt.partial").exists()


def test_saving_over_a_last_link_replaces_the_link_not_its_target(tmp_path):
    from lit_qlp.strategies import PipelineStrategy

    strategy = PipelineStrategy()
    strategy.engine = FakeEngine()
    target = tmp_path / "step=1.ckpt"
    strategy.save_checkpoint({"epoch": 0}, target)
    (tmp_path / "last.ckpt").symlink_to(target.name)
    strategy.save_checkpoint({"epoch": 0}, tmp_path / "last.ckpt")
    assert not (tmp_path / "last.ckpt").is_symlink() and (tmp_path / "last.ckpt" / "latest").is_file()
    assert sorted(p.name for p in target.iterdir()) == ["latest", "layer_00-model_states.pt"]


def test_checkpoint_options_are_checked():
    from lit_qlp.callbacks import RunCheckpoint

    with pytest.raises(ValueError, match="checkpoint.max_checkpoints=0 must be at least 1"):
        RunCheckpoint(max_checkpoints=0)
    with pytest.raises(ValueError, match="checkpoint_interval_hours=-1"):
        RunCheckpoint(checkpoint_interval_hours=-1)
