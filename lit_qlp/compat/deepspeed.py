"""What lit_qlp relies on of DeepSpeed beyond its public API: one CPU workaround, the gradient-clipping hook, the
PipelineModule hooks lit_qlp overrides, the tied-weight marker, the per-layer checkpoint file names and the checkpoint
engine through which an engine reads and writes checkpoint files.

DeepSpeed is imported inside the functions.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

SHM_COMM_OP = "deepspeed_shm_comm"


def _outdated(name: str, use: str) -> RuntimeError:
    """The error for a DeepSpeed version that lacks ``name``, which lit_qlp uses for ``use``."""
    import deepspeed

    return RuntimeError(
        f"deepspeed {getattr(deepspeed, '__version__', '?')} has no {name} (lit_qlp uses it {use}); "
        "lit_qlp/compat/deepspeed.py needs updating for this DeepSpeed version"
    )


def _require_call(owner: type, method: str, callee: str, use: str) -> None:
    """Raises unless ``owner.method`` exists and refers to ``callee`` (so overriding or replacing ``callee`` has an
    effect)."""
    function = getattr(owner, method, None)
    code = getattr(inspect.unwrap(function), "__code__", None) if function is not None else None
    if code is None or callee not in code.co_names:
        raise _outdated(f"{owner.__name__}.{method} calling {callee}", use)


def skip_cpu_shm_comm_build() -> None:
    """Stops DeepSpeed from compiling its CPU shared-memory all-reduce op (idempotent); applied by PipelineStrategy
    on CPU.

    DeepSpeed 0.19's ``init_distributed`` on a CPU machine JIT-compiles a shared-memory all-reduce extension
    (``deepspeed_shm_comm``) with the host C++ compiler before anything else runs: about a minute on two cores for
    every fresh machine (CI, the demo), for a speed-up of CPU all-reduces that lit_qlp's CPU runs (tests, demo) do
    not need. DeepSpeed decides through its ``deepspeed.ops.__compatible_ops__`` table, which it computes once and
    documents as editable; marking the op incompatible makes DeepSpeed fall back to plain torch.distributed (gloo),
    as it does on non-Linux hosts. Upstream: deepspeed/comm/torch.py ``build_shm_op``; no switch exists.
    """
    import deepspeed.ops

    table = getattr(deepspeed.ops, "__compatible_ops__", {})
    if SHM_COMM_OP not in table:
        raise _outdated(f"deepspeed.ops.__compatible_ops__[{SHM_COMM_OP!r}]", "to skip compiling its CPU comm op")
    table[SHM_COMM_OP] = False


def replace_gradient_clipping(engine: Any, clip: Callable[[], torch.Tensor]) -> None:
    """Makes ``engine`` clip gradients by calling ``clip`` instead of its own ``clip_fp32_gradients``.

    DeepSpeed's engine calls ``self.clip_fp32_gradients()`` in its optimizer step (``_take_model_step``) when
    ``gradient_clipping`` is set and neither fp16, bf16 nor ZeRO is on (those clip inside their own optimizers).
    Its own clipping measures each pipeline stage's gradients alone; lit_qlp clips by the whole model's norm.

    Args:
        engine: A ``DeepSpeedEngine`` (or ``PipelineEngine``) from ``deepspeed.initialize``.
        clip: Called with no arguments where DeepSpeed would clip; returns the norm before clipping.
    """
    from deepspeed.runtime.engine import DeepSpeedEngine

    if not isinstance(engine, DeepSpeedEngine):
        raise TypeError(f"replace_gradient_clipping needs a DeepSpeedEngine, got {type(engine).__name__}")
    if not hasattr(type(engine), "clip_fp32_gradients"):
        raise _outdated(f"{type(engine).__name__}.clip_fp32_gradients", "to clip by the whole pipeline's norm")
    _require_call(type(engine), "_take_model_step", "clip_fp32_gradients", "to clip by the whole pipeline's norm")
    engine.clip_fp32_gradients = clip


# The PipelineModule methods StagePartitionedPipelineModule overrides or calls, each with the DeepSpeed method that
# must still call it for the override to take effect (DeepSpeed's _partition_layers sets the bounds _build reads).
_PIPELINE_MODULE_HOOKS = {
    "_partition_layers": "__init__",
    "_set_bounds": "_partition_layers",
    "_synchronize_tied_weights": "__init__",
    "_get_frozen_parameter_names": "save_state_dict",
}


@functools.cache
def stage_partitioned_pipeline_module_class() -> type:
    """``StagePartitionedPipelineModule``: a DeepSpeed ``PipelineModule`` whose stage boundaries are given.

    ``StagePartitionedPipelineModule(parts=[0, a, b, ..., num_layers], **pipeline_module_kwargs)`` places layers
    ``parts[s]:parts[s+1]`` on stage ``s``, instead of DeepSpeed's partitioning, which builds every layer to count
    its parameters. It also broadcasts tied weights without recording the broadcast in autograd, and leaves out of
    checkpoints (``exclude_frozen_parameters``) everything in a layer's state dict but its trainable parameters
    (also the statistics bitsandbytes keeps beside 4-bit weights). Built once, on first call.
    """
    from deepspeed.pipe import PipelineModule

    for hook, caller in _PIPELINE_MODULE_HOOKS.items():
        if not hasattr(PipelineModule, hook):
            raise _outdated(f"PipelineModule.{hook}", "to place pipeline stages at given layer boundaries")
        _require_call(PipelineModule, caller, hook, "to place pipeline stages at given layer boundaries")

    class StagePartitionedPipelineModule(PipelineModule):
        """A PipelineModule whose stage boundaries are given, not found by building every layer to count it."""

        def __init__(self, parts: list[int], **kwargs: Any) -> None:
            self._given_parts = parts
            super().__init__(**kwargs)

        def _partition_layers(self, method: str = "uniform") -> None:
            stage_id = getattr(self, "stage_id", None)
            if stage_id is None:
                raise _outdated("PipelineModule.stage_id before _partition_layers", "to place pipeline stages")
            self.parts = list(self._given_parts)
            self._set_bounds(start=self.parts[stage_id], stop=self.parts[stage_id + 1])

        def _synchronize_tied_weights(self) -> None:
            # DeepSpeed broadcasts the trainable tied weights in place; outside no_grad that records the broadcast
            # in autograd and the backward pass warns about it.
            with torch.no_grad():
                super()._synchronize_tied_weights()

        def _get_frozen_parameter_names(self, layer: Any) -> list[str]:
            # What checkpoints leave out with exclude_frozen_parameters: everything in the layer's state dict but
            # its trainable parameters, so also the statistics bitsandbytes keeps beside 4-bit weights.
            if not isinstance(layer, nn.Module):
                return []
            trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
            return [n for n in layer.state_dict() if n not in trainable]

    return StagePartitionedPipelineModule


def is_pipe_replicated(param: torch.Tensor) -> bool:
    """Whether ``param`` is a copy of a tied weight that DeepSpeed marks to count once (``ds_pipe_replicated``).

    A ``PipelineModule`` marks the copies of a tied weight on every stage but the first that holds it; gradient norms
    over the whole pipeline skip them.
    """
    from deepspeed.runtime import constants

    marker = getattr(constants, "PIPE_REPLICATED", None)
    if marker is None:
        raise _outdated("deepspeed.runtime.constants.PIPE_REPLICATED", "to count tied weights once")
    return bool(getattr(param, marker, False))


class _OneStage:
    """What ``PipelineModule.ckpt_layer_path`` reads of a module on a pipeline × data-parallel topology.

    Without a tensor-parallel axis the file names carry no rank, so they are the same on every stage and replica.
    """

    def __init__(self) -> None:
        from deepspeed.runtime.pipe.topology import ProcessTopology

        self.global_rank = 0
        self._local_start = 0
        self._grid = SimpleNamespace(_topo=ProcessTopology(axes=["pipe", "data"], dims=[1, 1]))


def layer_checkpoint_file(step_dir: Path, index: int) -> Path:
    """The file in which DeepSpeed saves pipeline layer ``index`` of a checkpoint (``layer_03-model_states.pt``).

    Computed by DeepSpeed's own ``PipelineModule.ckpt_layer_path``.

    Args:
        step_dir: The checkpoint's tag directory, which holds the layer files.
        index: The layer's index in the whole pipeline (not within its stage).
    """
    from deepspeed.pipe import PipelineModule

    name_of = getattr(PipelineModule, "ckpt_layer_path", None)
    if name_of is None:
        raise _outdated("PipelineModule.ckpt_layer_path", "to find the layer files of checkpoints")
    try:
        return Path(name_of(_OneStage(), str(step_dir), index))
    except AttributeError as error:
        raise _outdated(
            f"PipelineModule.ckpt_layer_path that reads only global_rank, _local_start and _grid._topo ({error})",
            "to find the layer files of checkpoints",
        ) from error


class _FilesReadThrough:
    """A DeepSpeed checkpoint engine that reads files with ``read(path, map_location)`` and does all else as
    ``inner``."""

    def __init__(self, inner: Any, read: Callable[[str, Any], Any]) -> None:
        self._inner = inner
        self._read = read

    def load(self, path: str, map_location: Any = None) -> Any:
        """The file at ``path``, read by the given function (``CheckpointEngine.load``'s signature)."""
        return self._read(path, map_location)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _checkpoint_engine(engine: Any, caller: str, use: str) -> Any:
    """``engine``'s checkpoint engine, which ``caller`` replaces for ``use``; a clear error for anything but a
    ``DeepSpeedEngine`` holding a ``CheckpointEngine`` (or lit_qlp's reading wrapper of one)."""
    from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine
    from deepspeed.runtime.engine import DeepSpeedEngine

    if not isinstance(engine, DeepSpeedEngine):
        raise TypeError(f"{caller} needs a DeepSpeedEngine, got {type(engine).__name__}")
    original = getattr(engine, "checkpoint_engine", None)
    if not isinstance(original, CheckpointEngine | _FilesReadThrough):
        raise _outdated(f"{type(engine).__name__}.checkpoint_engine (a CheckpointEngine)", use)
    return original


@contextmanager
def _checkpoint_engine_replaced(engine: Any, replacement: Any) -> Iterator[None]:
    """Puts ``replacement`` in ``engine.checkpoint_engine``'s place while the block runs, the original back after."""
    original = engine.checkpoint_engine
    engine.checkpoint_engine = replacement
    try:
        yield
    finally:
        engine.checkpoint_engine = original


@contextmanager
def checkpoint_files_read_with(engine: Any, read: Callable[[str, Any], Any]) -> Iterator[None]:
    """While the block runs, every file ``engine.load_checkpoint`` reads is read by ``read(path, map_location)``.

    DeepSpeed 0.19's ``TorchCheckpointEngine.load`` unpickles with ``torch.load(..., weights_only=False)`` (made
    explicit for torch 2.6's safe default by deepspeedai/DeepSpeed#6751), so a crafted checkpoint file runs code as
    it loads; no option turns that off. A pipeline engine without ZeRO (lit_qlp's) reads every file of
    ``load_checkpoint`` through its ``checkpoint_engine.load``: the ``mp_rank_*`` states (client and optimizer state
    included) through ``SDLoaderBase.load``, the layer files through ``PipelineEngine.load_module_state_dict`` and
    ``PipelineModule.load_state_dir``. The block puts a checkpoint engine that reads through ``read`` in the
    engine's place and restores the original when it ends, also on an error; nested blocks nest.

    Args:
        engine: A ``DeepSpeedEngine`` (or ``PipelineEngine``) from ``deepspeed.initialize``.
        read: Called with a file's path and DeepSpeed's ``map_location``; returns the unpickled object.
    """
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.pipe.engine import PipelineEngine
    from deepspeed.runtime.state_dict_factory import SDLoaderBase

    use = "to load checkpoints with weights_only=True"
    original = _checkpoint_engine(engine, "checkpoint_files_read_with", use)
    _require_call(DeepSpeedEngine, "_load_checkpoint", "checkpoint_engine", use)
    _require_call(SDLoaderBase, "load", "checkpoint_engine", use)
    if isinstance(engine, PipelineEngine):
        _require_call(PipelineEngine, "load_module_state_dict", "checkpoint_engine", use)
    with _checkpoint_engine_replaced(engine, _FilesReadThrough(original, read)):
        yield


class FailedWrite:
    """A DeepSpeed checkpoint engine that writes (``save``, ``makedirs``) as ``inner`` until a write fails; then it
    keeps that write's ``error`` and ``path``, skips the remaining writes and returns normally. Everything else is
    ``inner``'s."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.error: Exception | None = None
        self.path: str | None = None

    def _write(self, write: Callable[..., Any], path: str, *args: Any, **kwargs: Any) -> None:
        if self.error is not None:
            return
        try:
            write(*args, **kwargs)
        except Exception as error:  # a full disk, above all (OSError, or torch's RuntimeError)
            self.error, self.path = error, str(path)

    def save(self, state_dict: Any, path: str) -> None:
        """Writes ``state_dict`` to ``path`` unless a write failed (``CheckpointEngine.save``'s signature)."""
        self._write(self._inner.save, path, state_dict, path)

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        """Creates the directory ``path`` unless a write failed (``CheckpointEngine.makedirs``'s signature)."""
        self._write(self._inner.makedirs, path, path, exist_ok=exist_ok)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


@contextmanager
def checkpoint_write_failure_kept(engine: Any) -> Iterator[FailedWrite]:
    """While the block runs, a file write of ``engine.save_checkpoint`` that fails does not raise: the block's
    ``FailedWrite`` keeps the error, and the rest of the save runs without writing, so that it reaches DeepSpeed's
    barriers on every rank as when the save succeeds.

    DeepSpeed 0.19's ``save_checkpoint`` writes every file of a pipeline engine without ZeRO (lit_qlp's) through its
    ``checkpoint_engine`` (``save`` and ``makedirs``: the layer files in ``PipelineModule.save_state_dict``, the
    ``mp_rank_*`` states in ``_save_checkpoint``), between collectives (a barrier, the tag check) and a last barrier;
    a rank whose write raised would skip that barrier and leave the others waiting in it. Only its ``latest`` file
    is written directly: pass ``save_latest=False`` and write it after the block. The block puts a ``FailedWrite``
    in the engine's place and restores the original when it ends.

    Args:
        engine: A ``DeepSpeedEngine`` (or ``PipelineEngine``) from ``deepspeed.initialize``.
    """
    from deepspeed.pipe import PipelineModule
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.pipe.engine import PipelineEngine

    use = "to make every rank finish a checkpoint save that fails on one"
    original = _checkpoint_engine(engine, "checkpoint_write_failure_kept", use)
    _require_call(DeepSpeedEngine, "save_checkpoint", "checkpoint_engine", use)
    _require_call(DeepSpeedEngine, "_save_checkpoint", "checkpoint_engine", use)
    if isinstance(engine, PipelineEngine):
        _require_call(PipelineEngine, "module_state_dict", "checkpoint_engine", use)
        _require_call(PipelineModule, "save_state_dict", "save", use)
    failed = FailedWrite(original)
    with _checkpoint_engine_replaced(engine, failed):
        yield failed


__all__ = [
    "FailedWrite",
    "checkpoint_files_read_with",
    "checkpoint_write_failure_kept",
    "is_pipe_replicated",
    "layer_checkpoint_file",
    "replace_gradient_clipping",
    "skip_cpu_shm_comm_build",
    "stage_partitioned_pipeline_module_class",
]
