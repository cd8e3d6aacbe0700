"""PipelineStrategy: a Lightning strategy over DeepSpeed's PipelineEngine (pipeline × data parallel)."""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, NamedTuple, Protocol, runtime_checkable

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.pytorch.accelerators import Accelerator
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.optim import Optimizer
from typing_extensions import override

from lit_qlp.compat.deepspeed import replace_gradient_clipping, skip_cpu_shm_comm_build
from lit_qlp.models.layout import PipelineSpec
from lit_qlp.strategies import engine as pipeline_engine
from lit_qlp.strategies.checkpointing import load_engine_checkpoint, save_engine_checkpoint
from lit_qlp.strategies.environment import DeepSpeedLauncherEnvironment
from lit_qlp.strategies.partition import check_partition_method, partition_layers
from lit_qlp.strategies.retention import remove_checkpoint
from lit_qlp.strategies.stages import all_gather_object, gather_from_stages


@runtime_checkable
class ChecksDevice(Protocol):
    """A LightningModule that can say, before anything is written, that it cannot run on the device."""

    def check_device(self, device: torch.device) -> None: ...


@runtime_checkable
class OffloadsActivations(Protocol):
    """A LightningModule whose layers want the offloaded activation checkpoint (``activation_offload``) whatever the
    strategy's own option says (``CausalLMModule``'s ``long_context``)."""

    offload_activations: bool


class BatchResult(NamedTuple):
    """What one pipeline batch returns on every stage."""

    loss: torch.Tensor
    num_tokens: int


def check_options(
    pipeline_stages: int, gradient_accumulation_steps: int, gradient_clipping: float, activation_offload: bool,
    activation_checkpointing: bool, partition_method: str,
) -> None:  # fmt: skip
    """Raises ValueError naming the strategy option that cannot work and what to change."""
    if pipeline_stages < 1:
        raise ValueError(f"pipeline_stages={pipeline_stages} must be at least 1")
    if gradient_accumulation_steps < 1:
        raise ValueError(f"gradient_accumulation_steps={gradient_accumulation_steps} must be at least 1")
    if gradient_clipping < 0:
        raise ValueError(f"gradient_clipping={gradient_clipping} must be >= 0 (0 disables clipping)")
    if activation_offload and not activation_checkpointing:
        raise ValueError(
            "activation_offload=True offloads the inputs that activation checkpointing keeps; "
            "set activation_checkpointing=True as well"
        )
    check_partition_method(partition_method)


def check_trainer(trainer: pl.Trainer) -> None:
    """Raises ValueError for the Trainer options that the strategy replaces with its own."""
    if trainer.accumulate_grad_batches != 1:
        raise ValueError(
            f"trainer.accumulate_grad_batches={trainer.accumulate_grad_batches} is not supported by "
            "PipelineStrategy; set trainer.strategy.gradient_accumulation_steps instead"
        )
    if trainer.gradient_clip_val is not None:
        raise ValueError(
            f"trainer.gradient_clip_val={trainer.gradient_clip_val} is not supported by PipelineStrategy; "
            "set trainer.strategy.gradient_clipping instead"
        )


def export_rank_environment(env: ClusterEnvironment, global_rank: int, world_size: int, local_rank: int) -> None:
    """The variables DeepSpeed reads: PipelineModule LOCAL_RANK, its comm backend the rest."""
    os.environ.setdefault("MASTER_ADDR", env.main_address)
    os.environ.setdefault("MASTER_PORT", str(env.main_port))
    os.environ["RANK"] = str(global_rank)
    os.environ["WORLD_SIZE"] = str(world_size)
    os.environ["LOCAL_RANK"] = str(local_rank)


def process_topology(pipeline_stages: int, data_parallel_size: int, column_major: bool):
    """DeepSpeed's rank layout: ``pipe`` × ``data`` (row-major: ranks 0..D-1 are stage 0), or ``data`` × ``pipe``."""
    from deepspeed.runtime.pipe.topology import ProcessTopology

    if column_major:
        return ProcessTopology(axes=["data", "pipe"], dims=[data_parallel_size, pipeline_stages])
    return ProcessTopology(axes=["pipe", "data"], dims=[pipeline_stages, data_parallel_size])


def layout_line(parts: list[int], data_parallel_size: int, micro_batches: int) -> str:
    """The console line that says how the layers are spread (``parts``: each stage's first layer, then the end)."""
    stages = len(parts) - 1
    stage_layers = ", ".join(f"{parts[s]}-{parts[s + 1] - 1}" for s in range(stages))
    return (
        f"PipelineStrategy: {stages} stage(s) × {data_parallel_size} data-parallel, "
        f"layers per stage {stage_layers}, {micro_batches} micro-batch(es) per step"
    )


class PipelineTopology:
    """The pipeline × data-parallel coordinates of this process (``topology``: DeepSpeed's ``ProcessTopology``) and
    the collectives over them that ``StageGroup`` names."""

    pipeline_stages: int
    topology: Any

    @property
    def data_parallel_size(self) -> int:
        return self.world_size // self.pipeline_stages

    @property
    def data_parallel_rank(self) -> int:
        return self.topology.get_coord(self.global_rank).data if self.topology is not None else 0

    @property
    def stage_id(self) -> int:
        return self.topology.get_coord(self.global_rank).pipe if self.topology is not None else 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage_id == self.pipeline_stages - 1

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        # Every stage of one data-parallel replica must see the same sequences.
        return {"num_replicas": self.data_parallel_size, "rank": self.data_parallel_rank}

    def gather_from_stages(self, obj: Any) -> list[Any] | None:
        """``obj`` of every stage of data-parallel replica 0, in stage order, on global rank 0 (None elsewhere)."""
        return gather_from_stages(obj, self.stage_id, self.data_parallel_rank, self.world_size, self.is_global_zero)

    def all_gather_object(self, obj: Any) -> list[Any]:
        """``obj`` of every rank, in global rank order, on every rank (collective)."""
        return all_gather_object(obj, self.world_size)


class EngineCheckpoints:
    """Lightning's checkpoint hooks over DeepSpeed checkpoint directories (``strategies.checkpointing``): only
    trainable weights, the optimizer state and Lightning's own state; restored after the engine is built."""

    @property
    @override
    def restore_checkpoint_after_setup(self) -> bool:
        return True

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        return {}

    @override
    def optimizer_state(self, optimizer: Optimizer) -> dict[str, torch.Tensor]:
        return {}

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: str | os.PathLike, storage_options: Any | None = None
    ) -> None:
        """Writes a checkpoint directory, published only when complete (``checkpointing.save_engine_checkpoint``)."""
        save_engine_checkpoint(self, checkpoint, Path(filepath))

    @override
    def load_checkpoint(self, checkpoint_path: str | os.PathLike, weights_only: bool | None = None) -> dict[str, Any]:
        """Restores the engine from a checkpoint directory (``checkpointing.load_engine_checkpoint``); returns
        Lightning's state. Every file is read with ``weights_only=True``, whatever ``weights_only`` says: lit-qlp's
        checkpoints need nothing more, and Lightning 2.6 passes None here anyway (a strategy that restores after
        setup gets no ``weights_only`` from ``Trainer._run``)."""
        fitting = self.lightning_module.trainer.state.fn == TrainerFn.FITTING
        return load_engine_checkpoint(self.engine, Path(checkpoint_path), with_optimizer=fitting)

    @override
    def remove_checkpoint(self, filepath: str | os.PathLike) -> None:
        """Deletes a checkpoint directory (global rank 0), first re-pointing a ``last.ckpt`` that still points at
        it (``retention.remove_checkpoint``)."""
        if self.is_global_zero:
            remove_checkpoint(Path(filepath))

    @override
    def load_model_state_dict(self, checkpoint: Any, strict: bool = True) -> None:
        pass

    @override
    def load_optimizer_state_dict(self, checkpoint: Any) -> None:
        pass


class PipelineStrategy(PipelineTopology, EngineCheckpoints, DDPStrategy):
    """Pipeline parallelism through DeepSpeed's PipelineEngine, with data parallelism across pipeline replicas.

    The world of ``N`` processes is ``pipeline_stages`` stages × ``N / pipeline_stages`` data-parallel replicas.
    Each process builds only its stage's layers. One Lightning batch is one optimizer step: the engine runs its
    ``gradient_accumulation_steps`` micro-batches through the pipeline, reduces gradients across the
    data-parallel replicas, clips and steps. Processes come from Lightning (``--trainer.devices N``), torchrun or
    the ``deepspeed`` launcher (with ``--no_local_rank``). Checkpoints are DeepSpeed checkpoint directories holding
    only trainable parameters, the optimizer state and Lightning's own state, so ``ModelCheckpoint`` and
    ``--ckpt_path`` work as usual.

    Args:
        pipeline_stages: Number of pipeline stages; must divide the number of processes.
        gradient_accumulation_steps: Micro-batches (of one sequence each) per optimizer step, per data-parallel
            replica. Use this instead of the Trainer's ``accumulate_grad_batches``.
        gradient_clipping: Clip the global gradient norm to this value (0 disables). Use this instead of the
            Trainer's ``gradient_clip_val``.
        partition_method: How layers are spread over stages: "compute" (balance the matmul work per token: the
            embedding lookup costs nothing, the last stage's head + loss counts as 4 FLOP per head weight, each
            decoder layer as 6 per weight with activation checkpointing, 4 without; see
            ``partition.compute_weights``), "uniform" (same number of layers), "parameters" (balance parameter
            counts, counted from the config) or "type:REGEX" (balance the layers whose class name matches
            REGEX, e.g. "type:decoder").
        use_column_major_topology: Number the ranks pipeline-first: ranks ``0..S-1`` are the S stages of replica
            0, so a whole pipeline sits on consecutive ranks (one node) and activations stay inside a node while
            the gradient all-reduce crosses nodes. By default (DeepSpeed's layout) ranks ``0..D-1`` are stage 0 of
            every replica: the all-reduce stays inside a node and activations cross nodes.
        activation_checkpointing: Recompute each decoder layer in the backward pass instead of keeping its
            activations (non-reentrant torch checkpointing); only each layer's input stays in memory.
        activation_offload: With activation checkpointing, keep those layer inputs in pinned CPU memory (copied
            on a side stream during the forward pass, back before the layer's recomputation) instead of GPU
            memory: saves seq × hidden × 2 bytes per decoder layer (1 GiB at seq 4096 for Llama-3-8B). Within 80%
            of the host memory available at the start (split between a node's GPUs): inputs past that stay in GPU
            memory, with a warning.
        timeout: Timeout of collective operations.
        accelerator: Set by the Trainer.
        parallel_devices: Set by the Trainer.
        cluster_environment: Set by the Trainer.
        checkpoint_io: Set by the Trainer.
        precision_plugin: Set by the Trainer. The model's dtype is the module's ``dtype`` option; keep the
            Trainer's ``precision`` at its default.
        process_group_backend: "gloo" or "nccl"; by default nccl on CUDA, gloo on CPU.
    """

    strategy_name = "pipeline"

    def __init__(
        self,
        pipeline_stages: int = 1,
        gradient_accumulation_steps: int = 1,
        gradient_clipping: float = 1.0,
        partition_method: str = "compute",
        use_column_major_topology: bool = False,
        activation_checkpointing: bool = True,
        activation_offload: bool = False,
        timeout: timedelta | None = None,
        accelerator: Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
        process_group_backend: str | None = None,
    ) -> None:
        if cluster_environment is None and DeepSpeedLauncherEnvironment.detect():
            cluster_environment = DeepSpeedLauncherEnvironment()
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=timeout or timedelta(minutes=30),
        )
        check_options(
            pipeline_stages, gradient_accumulation_steps, gradient_clipping, activation_offload,
            activation_checkpointing, partition_method,
        )  # fmt: skip
        self.pipeline_stages = pipeline_stages
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.gradient_clipping = gradient_clipping
        self.partition_method = partition_method
        self.use_column_major_topology = use_column_major_topology
        self.activation_checkpointing = activation_checkpointing
        self.activation_offload = activation_offload
        self.topology = None
        self.engine = None

    @override
    def setup_environment(self) -> None:
        # Runs before Lightning writes anything (logs, config.yaml), so bad options fail with nothing written.
        check_trainer(self.lightning_module.trainer)
        super().setup_environment()
        if isinstance(self.lightning_module, ChecksDevice):
            self.lightning_module.check_device(self.root_device)
        if self.module_offloads_activations() and not self.activation_checkpointing:
            raise ValueError(
                "model.long_context keeps the checkpointed layer inputs (and attention and MLP outputs) in CPU "
                "memory, which needs activation checkpointing; set trainer.strategy.activation_checkpointing=true "
                "(or turn model.long_context off)"
            )

    def module_offloads_activations(self) -> bool:
        """The LightningModule asks for the offloaded checkpoint (``OffloadsActivations``)."""
        module = self.lightning_module
        return isinstance(module, OffloadsActivations) and module.offload_activations

    @override
    def setup_distributed(self) -> None:
        import deepspeed

        self.set_world_ranks()
        if self.world_size % self.pipeline_stages:
            raise ValueError(
                f"pipeline_stages={self.pipeline_stages} must divide the number of processes ({self.world_size}); "
                f"use a divisor of {self.world_size} or change --trainer.devices / --trainer.num_nodes"
            )
        export_rank_environment(self.cluster_environment, self.global_rank, self.world_size, self.local_rank)
        super().setup_distributed()
        if self.root_device.type == "cpu":
            skip_cpu_shm_comm_build()
        deepspeed.init_distributed(dist_backend=self.process_group_backend, auto_mpi_discovery=False)
        self.topology = process_topology(self.pipeline_stages, self.data_parallel_size, self.use_column_major_topology)

    # ----------------------------------------------------------------- setup
    @override
    def setup(self, trainer: pl.Trainer) -> None:
        self.accelerator.setup(trainer)
        self.model_to_device()
        spec: PipelineSpec = self.lightning_module.pipeline_spec(self.root_device, self.pipeline_stages)
        types = [layer.typename.__name__ for layer in spec.layers]
        parts = partition_layers(
            self.partition_method, self.pipeline_stages, spec.parameter_counts, types, self.activation_checkpointing
        )
        offload = self.activation_offload or self.module_offloads_activations()
        pipe = pipeline_engine.build_pipeline(spec, parts, self.topology, self.activation_checkpointing, offload)
        self.lightning_module.pipe = pipe  # configure_optimizers sees only this stage's parameters
        optimizer = self._only_optimizer(trainer) if trainer.state.fn == TrainerFn.FITTING else None
        config = pipeline_engine.engine_config(self.gradient_accumulation_steps, self.gradient_clipping)
        self.engine = pipeline_engine.build_engine(pipe, optimizer, config)
        # DeepSpeed's own clipping measures each stage's gradients alone; clip by the whole model's norm.
        replace_gradient_clipping(self.engine, self.clip_gradients)
        rank_zero_info(layout_line(parts, self.data_parallel_size, self.gradient_accumulation_steps))

    def _only_optimizer(self, trainer: pl.Trainer) -> Optimizer:
        self.setup_optimizers(trainer)
        if len(self.optimizers) != 1 or self.lr_scheduler_configs:
            raise ValueError(
                "PipelineStrategy supports exactly one optimizer and no Lightning LR scheduler "
                "(set the learning rate from a callback)"
            )
        return self.optimizers[0]

    @override
    def configure_ddp(self) -> None:
        pass

    # ----------------------------------------------------------------- steps
    def _normalize(self, num_label_tokens: torch.Tensor, num_micro_batches: int) -> int:
        """Gives the loss this batch's normaliser (``engine.token_normalizer``); returns the label tokens of all
        replicas."""
        total = num_label_tokens.detach().to(self.root_device, torch.float64).clone()
        if self.data_parallel_size > 1:
            torch.distributed.all_reduce(total, group=self.engine.grid.get_data_parallel_group())
        normalizer = pipeline_engine.token_normalizer(total.item(), num_micro_batches, self.data_parallel_size)
        self.engine.module.loss_fn.normalize_by(normalizer)
        return int(total.item())

    def train_batch(self, micro_batches: list, num_label_tokens: torch.Tensor) -> BatchResult:
        """Forward, backward, gradient reduction, clipping and optimizer step over ``micro_batches``
        (``gradient_accumulation_steps`` items ``(inputs, labels)``, ``num_label_tokens`` labelled on this replica);
        returns the token-weighted mean loss over all micro-batches and replicas and its tokens, on every stage."""
        if len(micro_batches) != self.gradient_accumulation_steps:
            raise ValueError(
                f"a training batch holds {len(micro_batches)} micro-batches but gradient_accumulation_steps is "
                f"{self.gradient_accumulation_steps}; the data module's batch size must equal it"
            )
        num_tokens = self._normalize(num_label_tokens, len(micro_batches))
        with pipeline_engine.default_dtype(torch.float32):
            loss = self.engine.train_batch(iter(micro_batches))
        return BatchResult(loss, num_tokens)

    def eval_batch(self, micro_batches: list, num_label_tokens: torch.Tensor) -> BatchResult:
        """The token-weighted mean loss of ``micro_batches`` (no gradients) and its token count, on every stage."""
        num_tokens = self._normalize(num_label_tokens, len(micro_batches))
        self.engine.reset_activation_shape()
        with pipeline_engine.default_dtype(torch.float32):
            loss = self.engine.eval_batch(iter(micro_batches), num_micro_batches=len(micro_batches))
        self.engine.reset_activation_shape()
        return BatchResult(loss, num_tokens)

    def clip_gradients(self) -> torch.Tensor:
        """Clips to ``gradient_clipping`` by the whole model's norm (``engine.clip_global_norm``), inside the engine's
        optimizer step, after the data-parallel and tied-weight reductions; returns the norm before clipping."""
        group = self.engine.grid.get_pipe_parallel_group() if self.pipeline_stages > 1 else None
        parameters = list(self.engine.module.parameters())
        return pipeline_engine.clip_global_norm(parameters, self.gradient_clipping, self.root_device, group)

    @override
    def backward(self, closure_loss: torch.Tensor, optimizer: Optimizer | None, *args: Any, **kwargs: Any):
        return closure_loss  # the engine ran backward inside train_batch

    @override
    def optimizer_step(self, optimizer, closure: Callable[[], Any], model=None, **kwargs: Any) -> Any:
        return closure()  # the closure runs training_step, in which the engine already stepped the optimizer

    @override
    def teardown(self) -> None:
        super().teardown()
        self.engine = None
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


__all__ = [
    "BatchResult",
    "ChecksDevice",
    "OffloadsActivations",
    "PipelineStrategy",
    "check_options",
    "process_topology",
]
