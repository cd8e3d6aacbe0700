"""lit_qlp.compat.deepspeed against the installed DeepSpeed, in a one-process gloo group; and its errors when a
target is gone."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
from torch import nn

deepspeed = pytest.importorskip("deepspeed")

from deepspeed.pipe import PipelineModule  # noqa: E402
from deepspeed.runtime import constants  # noqa: E402
from deepspeed.runtime.engine import DeepSpeedEngine  # noqa: E402
from deepspeed.runtime.pipe.topology import ProcessTopology  # noqa: E402

from lit_qlp.compat import deepspeed as compat  # noqa: E402

OUTDATED = r"deepspeed \S+ has no .*lit_qlp/compat/deepspeed.py needs updating"


@pytest.fixture(scope="module")
def process_group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.MonkeyPatch.context() as env:
        for name, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1").items():
            env.setenv(name, value)
        env.setenv("LOCAL_RANK", "0")
        torch.distributed.init_process_group("gloo", rank=0, world_size=1)
        try:
            compat.skip_cpu_shm_comm_build()
            deepspeed.init_distributed("gloo")
            yield
        finally:
            torch.distributed.destroy_process_group()


@pytest.fixture(autouse=True)
def fresh_class():
    """Each test builds the PipelineModule subclass (and so runs its checks) again."""
    compat.stage_partitioned_pipeline_module_class.cache_clear()
    yield
    compat.stage_partitioned_pipeline_module_class.cache_clear()


class Frozen(nn.Module):
    """A layer with a trainable bias, a frozen weight and a buffer: only the bias belongs in checkpoints."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 4), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(4))
        self.register_buffer("scale", torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T * self.scale + self.bias


def pipeline(parts: list[int], num_layers: int = 3):
    return compat.stage_partitioned_pipeline_module_class()(
        parts=parts,
        layers=[nn.Linear(4, 4) if i % 2 == 0 else Frozen() for i in range(num_layers)],
        topology=ProcessTopology(axes=["pipe", "data"], dims=[1, 1]),
        loss_fn=nn.functional.mse_loss,
    )


@pytest.fixture
def engine(process_group):
    pipe = pipeline([0, 3])
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "steps_per_print": 2**62,
    }
    optimizer = torch.optim.SGD([p for p in pipe.parameters() if p.requires_grad], lr=0.1)
    engine, *_ = deepspeed.initialize(model=pipe, optimizer=optimizer, config=config)
    return engine


def micro_batch():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, generator=generator), torch.randn(2, 4, generator=generator)


def test_skip_cpu_shm_comm_build_marks_the_op_incompatible(monkeypatch):
    table = deepspeed.ops.__compatible_ops__
    monkeypatch.setitem(table, compat.SHM_COMM_OP, True)
    compat.skip_cpu_shm_comm_build()
    compat.skip_cpu_shm_comm_build()  # idempotent
    assert table[compat.SHM_COMM_OP] is False
    monkeypatch.delitem(table, compat.SHM_COMM_OP)
    with pytest.raises(RuntimeError, match=OUTDATED):
        compat.skip_cpu_shm_comm_build()


def test_replaced_gradient_clipping_runs_in_the_optimizer_step(engine):
    calls = []
    compat.replace_gradient_clipping(engine, lambda: calls.append(1) or torch.tensor(0.0))
    engine.train_batch(iter([micro_batch()]))
    assert calls == [1]
    with pytest.raises(TypeError, match="DeepSpeedEngine"):
        compat.replace_gradient_clipping(object(), lambda: torch.tensor(0.0))


def test_replace_gradient_clipping_needs_deepspeeds_hook(engine, monkeypatch):
    monkeypatch.delattr(DeepSpeedEngine, "clip_fp32_gradients")
    with pytest.raises(RuntimeError, match=OUTDATED):
        compat.replace_gradient_clipping(engine, lambda: torch.tensor(0.0))
    monkeypatch.undo()
    monkeypatch.setattr(DeepSpeedEngine, "_take_model_step", lambda self, lr_kwargs=None: None)
    with pytest.raises(RuntimeError, match="_take_model_step calling clip_fp32_gradients"):
        compat.replace_gradient_clipping(engine, lambda: torch.tensor(0.0))


def test_stage_partitioned_module_builds_the_given_layers_only(process_group):
    pipe = pipeline([0, 2])  # DeepSpeed itself would place all three layers on the only stage
    assert pipe.parts == [0, 2]
    assert len(pipe.forward_funcs) == 2
    assert compat.stage_partitioned_pipeline_module_class() is type(pipe)  # built once


@pytest.mark.parametrize("hook", ["_partition_layers", "_set_bounds", "_synchronize_tied_weights"])
def test_stage_partitioned_module_needs_deepspeeds_hooks(hook, monkeypatch):
    monkeypatch.delattr(PipelineModule, hook)
    with pytest.raises(RuntimeError, match=OUTDATED) as error:
        compat.stage_partitioned_pipeline_module_class()
    assert f"PipelineModule.{hook}" in str(error.value)


def test_stage_partitioned_module_needs_deepspeed_to_call_its_hooks(monkeypatch):
    monkeypatch.setattr(PipelineModule, "save_state_dict", lambda self, *args, **kwargs: None)
    with pytest.raises(RuntimeError, match="save_state_dict calling _get_frozen_parameter_names"):
        compat.stage_partitioned_pipeline_module_class()


def test_checkpoints_hold_trained_tensors_in_the_named_layer_files(engine, tmp_path):
    engine.save_checkpoint(str(tmp_path), tag="step", exclude_frozen_parameters=True)
    step_dir = tmp_path / "step"
    written = set(step_dir.glob("layer_*"))
    assert written == {compat.layer_checkpoint_file(step_dir, index) for index in range(3)}
    assert compat.layer_checkpoint_file(step_dir, 1) == step_dir / "layer_01-model_states.pt"
    frozen = torch.load(compat.layer_checkpoint_file(step_dir, 1), weights_only=True)
    assert set(frozen) == {"bias"}  # not the frozen weight, nor the buffer
    assert set(torch.load(compat.layer_checkpoint_file(step_dir, 2), weights_only=True)) == {"weight", "bias"}


def test_layer_checkpoint_file_needs_deepspeeds_naming(tmp_path, monkeypatch):
    monkeypatch.delattr(PipelineModule, "ckpt_layer_path")
    with pytest.raises(RuntimeError, match=OUTDATED):
        compat.layer_checkpoint_file(tmp_path, 0)
    monkeypatch.undo()
    monkeypatch.setattr(PipelineModule, "ckpt_layer_path", lambda self, ckpt_dir, index: self._layer_offset)
    with pytest.raises(RuntimeError, match=OUTDATED):
        compat.layer_checkpoint_file(tmp_path, 0)


def test_is_pipe_replicated_reads_deepspeeds_marker(process_group, monkeypatch):
    pipe = pipeline([0, 3])
    params = list(pipe.parameters())
    assert not any(compat.is_pipe_replicated(p) for p in params)  # DeepSpeed marks every parameter False
    setattr(params[0], constants.PIPE_REPLICATED, True)  # what it does to later stages' tied copies
    assert compat.is_pipe_replicated(params[0])
    assert not compat.is_pipe_replicated(torch.zeros(1))
    monkeypatch.delattr(constants, "PIPE_REPLICATED")
    with pytest.raises(RuntimeError, match=OUTDATED):
        compat.is_pipe_replicated(params[0])


def test_checkpoint_files_read_with_reads_every_file_load_checkpoint_reads(engine, tmp_path):
    engine.save_checkpoint(str(tmp_path), tag="step", exclude_frozen_parameters=True)
    original, read = engine.checkpoint_engine, []

    def read_file(path, map_location):
        read.append(Path(path).name)
        return torch.load(path, map_location=map_location, weights_only=True)

    with compat.checkpoint_files_read_with(engine, read_file):
        load_path, _ = engine.load_checkpoint(str(tmp_path), tag="step", load_module_strict=False)
    assert load_path is not None
    assert set(read) == {f.name for f in (tmp_path / "step").glob("*.pt")}
    assert engine.checkpoint_engine is original

    def refuse(path, map_location):
        raise OSError(f"refused {path}")

    with pytest.raises(OSError, match="refused"), compat.checkpoint_files_read_with(engine, refuse):
        engine.load_checkpoint(str(tmp_path), tag="step", load_module_strict=False)
    assert engine.checkpoint_engine is original  # restored on the error too
    with pytest.raises(TypeError, match="DeepSpeedEngine"), compat.checkpoint_files_read_with(object(), refuse):
        pass


def test_checkpoint_files_read_with_needs_deepspeed_to_read_through_its_checkpoint_engine(engine, monkeypatch):
    from deepspeed.runtime.state_dict_factory import SDLoaderBase

    monkeypatch.setattr(SDLoaderBase, "load", lambda self, *args, **kwargs: None)
    with pytest.raises(RuntimeError, match="SDLoaderBase.load calling checkpoint_engine"):
        with compat.checkpoint_files_read_with(engine, torch.load):
            pass
    monkeypatch.undo()
    monkeypatch.setattr(engine, "checkpoint_engine", None)
    with pytest.raises(RuntimeError, match=OUTDATED), compat.checkpoint_files_read_with(engine, torch.load):
        pass


def test_checkpoint_write_failure_kept_lets_a_failed_save_finish(engine, tmp_path, monkeypatch):
    """The first failed write is kept, the later ones skipped, and save_checkpoint returns (reaching its barriers)."""
    original, attempted = engine.checkpoint_engine, []

    def save(state_dict, path):
        attempted.append(Path(path).name)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(original, "save", save)
    with compat.checkpoint_write_failure_kept(engine) as kept:
        assert engine.save_checkpoint(str(tmp_path), tag="step", exclude_frozen_parameters=True, save_latest=False)
    assert isinstance(kept.error, OSError) and kept.error.errno == 28
    assert attempted == ["layer_00-model_states.pt"] and kept.path.endswith(attempted[0])
    assert engine.checkpoint_engine is original
    monkeypatch.undo()
    with compat.checkpoint_write_failure_kept(engine) as kept:  # a save that works writes every file
        engine.save_checkpoint(str(tmp_path), tag="ok", exclude_frozen_parameters=True, save_latest=False)
    assert kept.error is None and len(list((tmp_path / "ok").glob("*.pt"))) == 4
    with pytest.raises(TypeError, match="DeepSpeedEngine"), compat.checkpoint_write_failure_kept(object()):
        pass


def test_checkpoint_write_failure_kept_needs_deepspeed_to_write_through_its_checkpoint_engine(engine, monkeypatch):
    monkeypatch.setattr(PipelineModule, "save_state_dict", lambda self, *args, **kwargs: None)
    with pytest.raises(RuntimeError, match="PipelineModule.save_state_dict calling save"):
        with compat.checkpoint_write_failure_kept(engine):
            pass
    monkeypatch.undo()
    monkeypatch.setattr(engine, "checkpoint_engine", None)
    with pytest.raises(RuntimeError, match=OUTDATED), compat.checkpoint_write_failure_kept(engine):
        pass
