"""PipelineStrategy: a Lightning strategy over DeepSpeed's PipelineEngine (pipeline × data parallel)."""

from __future__ import annotations

import functools
import os
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.accelerators import Accelerator
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn
from torch.optim import Optimizer
from typing_extensions import override

from lit_qlp.strategies.deepspeed_patches import skip_cpu_shm_comm_build
from lit_qlp.strategies.environment import DeepSpeedLauncherEnvironment
from lit_qlp.strategies.offload import offloaded_checkpoint
from lit_qlp.strategies.partition import check_partition_method, partition_layers


@dataclass
class PipelineSpec:
    """What a LightningModule hands the strategy to build its pipeline.

    Attributes:
        layers: DeepSpeed ``LayerSpec`` s, in order; only this stage's are built.
        parameter_counts: Parameter count of each layer (for ``partition_method="parameters"``), known without
            building the layers.
        loss_fn: ``loss_fn(outputs, labels)`` on the last stage; the strategy sets its ``normalizer`` attribute
            before each batch (see ``PipelineStrategy.train_batch``).
        checkpointable_layers: Class names of the layers to activation-checkpoint.
    """

    layers: list
    parameter_counts: list[float]
    loss_fn: Callable
    checkpointable_layers: list[str]


class BatchResult(NamedTuple):
    """What one pipeline batch returns on every stage."""

    loss: torch.Tensor
    num_tokens: int


@contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


class PipelineStrategy(DDPStrategy):
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
            memory: saves seq × hidden × 2 bytes per decoder layer (1 GiB at seq 4096 for Llama-3-8B).
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
        self.pipeline_stages = pipeline_stages
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.gradient_clipping = gradient_clipping
        self.partition_method = partition_method
        self.use_column_major_topology = use_column_major_topology
        self.activation_checkpointing = activation_checkpointing
        self.activation_offload = activation_offload
        self.topology = None
        self.engine = None

    # ----------------------------------------------------------------- topology
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

    @override
    def setup_environment(self) -> None:
        # Runs before Lightning writes anything (logs, config.yaml), so bad options fail with nothing written.
        trainer = self.lightning_module.trainer
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
        super().setup_environment()
        check_device = getattr(self.lightning_module, "check_device", None)
        if check_device is not None:
            check_device(self.root_device)

    @override
    def setup_distributed(self) -> None:
        import deepspeed
        from deepspeed.runtime.pipe.topology import ProcessTopology

        self.set_world_ranks()
        if self.world_size % self.pipeline_stages:
            raise ValueError(
                f"pipeline_stages={self.pipeline_stages} must divide the number of processes ({self.world_size}); "
                f"use a divisor of {self.world_size} or change --trainer.devices / --trainer.num_nodes"
            )
        # PipelineModule reads LOCAL_RANK, DeepSpeed's comm backend the rest.
        env = self.cluster_environment
        os.environ.setdefault("MASTER_ADDR", env.main_address)
        os.environ.setdefault("MASTER_PORT", str(env.main_port))
        os.environ["RANK"] = str(self.global_rank)
        os.environ["WORLD_SIZE"] = str(self.world_size)
        os.environ["LOCAL_RANK"] = str(self.local_rank)
        super().setup_distributed()
        if self.root_device.type == "cpu":
            skip_cpu_shm_comm_build()
        deepspeed.init_distributed(dist_backend=self._process_group_backend, auto_mpi_discovery=False)
        dp = self.data_parallel_size
        if self.use_column_major_topology:
            self.topology = ProcessTopology(axes=["data", "pipe"], dims=[dp, self.pipeline_stages])
        else:
            self.topology = ProcessTopology(axes=["pipe", "data"], dims=[self.pipeline_stages, dp])

    # ----------------------------------------------------------------- setup
    @override
    def setup(self, trainer: pl.Trainer) -> None:
        import deepspeed

        assert self.accelerator is not None
        self.accelerator.setup(trainer)
        self.model_to_device()
        module = self.lightning_module
        spec: PipelineSpec = module.pipeline_spec(self.root_device)
        parts = partition_layers(
            self.partition_method,
            self.pipeline_stages,
            spec.parameter_counts,
            [layer.typename.__name__ for layer in spec.layers],
            recomputed=self.activation_checkpointing,
        )
        with _default_dtype(torch.float32):
            pipe = _pipeline_module_class()(
                parts=parts,
                layers=spec.layers,
                topology=self.topology,
                loss_fn=spec.loss_fn,
                activation_checkpoint_interval=1 if self.activation_checkpointing else 0,
                activation_checkpoint_func=offloaded_checkpoint
                if self.activation_offload
                else partial(torch.utils.checkpoint.checkpoint, use_reentrant=False),
                checkpointable_layers=spec.checkpointable_layers,
            )
        module.pipe = pipe
        config = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "gradient_clipping": self.gradient_clipping,
            "steps_per_print": 2**62,
            "wall_clock_breakdown": False,
        }
        optimizer = None
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
            if len(self.optimizers) != 1 or self.lr_scheduler_configs:
                raise ValueError(
                    "PipelineStrategy supports exactly one optimizer and no Lightning LR scheduler "
                    "(set the learning rate from a callback)"
                )
            optimizer = self.optimizers[0]
        with _default_dtype(torch.float32):
            self.engine, *_ = deepspeed.initialize(model=pipe, optimizer=optimizer, config=config)
        # DeepSpeed's own clipping measures each stage's gradients alone (its "model parallel" group is the tensor
        # slice group); clip by the norm of the whole model instead.
        self.engine.clip_fp32_gradients = self.clip_gradients
        stage_layers = ", ".join(f"{parts[s]}-{parts[s + 1] - 1}" for s in range(self.pipeline_stages))
        rank_zero_info(
            f"PipelineStrategy: {self.pipeline_stages} stage(s) × {self.data_parallel_size} data-parallel, "
            f"layers per stage {stage_layers}, {self.gradient_accumulation_steps} micro-batch(es) per step"
        )

    @override
    def _setup_model(self, model: nn.Module) -> nn.Module:
        return model

    @override
    def configure_ddp(self) -> None:
        pass

    # ----------------------------------------------------------------- steps
    def _set_normalizer(self, num_label_tokens: torch.Tensor, num_micro_batches: int) -> int:
        """Makes the engine's mean over micro-batches and replicas equal sum(token losses) / total label tokens.

        The engine averages ``loss_fn`` over its micro-batches and the data-parallel replicas average gradients,
        so each micro-batch's summed token loss is divided by ``total tokens / (micro-batches × replicas)``.
        Returns the total number of label tokens across replicas.
        """
        total = num_label_tokens.detach().to(self.root_device, torch.float64).clone()
        if self.data_parallel_size > 1:
            torch.distributed.all_reduce(total, group=self.engine.grid.get_data_parallel_group())
        per_micro_batch = total.item() / (num_micro_batches * self.data_parallel_size)
        self.engine.module.loss_fn.normalizer = max(per_micro_batch, 1e-12)
        return int(total.item())

    def train_batch(self, micro_batches: list, num_label_tokens: torch.Tensor) -> BatchResult:
        """Forward, backward, gradient reduction, clipping and optimizer step over ``micro_batches``.

        Args:
            micro_batches: ``gradient_accumulation_steps`` items ``(inputs, labels)`` for the engine.
            num_label_tokens: Number of labelled tokens in ``micro_batches`` on this replica.

        Returns:
            The token-weighted mean loss over all micro-batches and replicas, and the number of label tokens it
            covers, on every stage.
        """
        if len(micro_batches) != self.gradient_accumulation_steps:
            raise ValueError(
                f"a training batch holds {len(micro_batches)} micro-batches but gradient_accumulation_steps is "
                f"{self.gradient_accumulation_steps}; the data module's batch size must equal it"
            )
        num_tokens = self._set_normalizer(num_label_tokens, len(micro_batches))
        with _default_dtype(torch.float32):
            loss = self.engine.train_batch(iter(micro_batches))
        return BatchResult(loss, num_tokens)

    def eval_batch(self, micro_batches: list, num_label_tokens: torch.Tensor) -> BatchResult:
        """The token-weighted mean loss of ``micro_batches`` (no gradients) and its token count, on every stage."""
        num_tokens = self._set_normalizer(num_label_tokens, len(micro_batches))
        self.engine.reset_activation_shape()
        with _default_dtype(torch.float32):
            loss = self.engine.eval_batch(iter(micro_batches), num_micro_batches=len(micro_batches))
        self.engine.reset_activation_shape()
        return BatchResult(loss, num_tokens)

    def clip_gradients(self) -> torch.Tensor:
        """Scales this stage's gradients so that the whole model's gradient norm is at most ``gradient_clipping``.

        Runs inside the engine's optimizer step, after the data-parallel and tied-weight gradient reductions. The
        squared norms of all stages are summed over the pipeline group; a tied weight counts once (its copies on
        later stages are marked ``ds_pipe_replicated``). Returns the global norm before clipping.
        """
        grads = [
            p.grad
            for p in self.engine.module.parameters()
            if p.grad is not None and not getattr(p, "ds_pipe_replicated", False)
        ]
        squares = torch.zeros((), device=self.root_device, dtype=torch.float32)
        for grad in grads:
            squares += grad.detach().float().square().sum()
        if self.pipeline_stages > 1:
            torch.distributed.all_reduce(squares, group=self.engine.grid.get_pipe_parallel_group())
        norm = squares.sqrt()
        coefficient = (self.gradient_clipping / (norm + 1e-6)).clamp(max=1.0)
        for p in self.engine.module.parameters():
            if p.grad is not None:
                p.grad.detach().mul_(coefficient.to(p.grad.dtype))
        return norm

    def gather_from_stages(self, obj: Any) -> list[Any] | None:
        """Collects ``obj`` from every stage of data-parallel replica 0 onto global rank 0.

        Collective: every rank calls it. Returns the objects in stage order on global rank 0, None elsewhere.
        """
        if self.world_size == 1:
            return [obj]
        payload = (self.stage_id, obj) if self.data_parallel_rank == 0 else None
        received = [None] * self.world_size if self.is_global_zero else None
        torch.distributed.gather_object(payload, received, dst=0)
        if received is None:
            return None
        return [o for _, o in sorted((p for p in received if p is not None), key=lambda p: p[0])]

    def all_gather_object(self, obj: Any) -> list[Any]:
        """``obj`` of every rank, in global rank order, on every rank (collective)."""
        if self.world_size == 1:
            return [obj]
        gathered = [None] * self.world_size
        torch.distributed.all_gather_object(gathered, obj)
        return gathered

    @override
    def backward(self, closure_loss: torch.Tensor, optimizer: Optimizer | None, *args: Any, **kwargs: Any):
        # The engine ran backward inside train_batch.
        return closure_loss

    @override
    def optimizer_step(self, optimizer, closure: Callable[[], Any], model=None, **kwargs: Any) -> Any:
        # The closure runs training_step, in which the engine already stepped the optimizer.
        return closure()

    # ----------------------------------------------------------------- checkpoints
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
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None) -> None:
        """Every rank writes its stage's trainable weights and optimizer state into the directory ``filepath``.

        Write, then publish: the ranks write into ``<filepath>.partial``; only when all have finished does global
        rank 0 rename it to ``filepath`` (then local rank 0 of any node whose filesystem it does not share renames
        that node's copy). A crash during the save leaves a ``.partial`` directory and every earlier checkpoint,
        ``last`` included, intact.
        """
        # Weights and optimizer state are the engine's files; "optimizer_states" stays (empty) as Lightning expects it.
        client_state = {k: v for k, v in checkpoint.items() if k != "state_dict"}
        final = Path(filepath)
        partial = final.with_name(final.name + ".partial")
        if self.local_rank == 0 and partial.exists():
            shutil.rmtree(partial, ignore_errors=True)  # the remains of an interrupted save (any node may clear it)
        self.barrier("checkpoint-start")
        self.engine.save_checkpoint(str(partial), client_state=client_state, exclude_frozen_parameters=True)
        self.barrier("checkpoint-written")
        if self.is_global_zero:
            _publish(partial, final)
        self.barrier("checkpoint-published")
        if self.local_rank == 0 and not self.is_global_zero and partial.exists():
            _publish(partial, final)  # a node whose filesystem global rank 0 does not share
        self.barrier("checkpoint-published-on-every-node")

    @override
    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(checkpoint_path)
        if not path.is_dir() or not (path / "latest").is_file():
            raise FileNotFoundError(
                f"{path} is not a lit-qlp checkpoint directory (a DeepSpeed checkpoint with a 'latest' file); "
                "pass a directory from <default_root_dir>/checkpoints or 'last'"
            )
        fitting = self.lightning_module.trainer.state.fn == TrainerFn.FITTING
        _, client_state = self.engine.load_checkpoint(
            str(path),
            load_module_strict=False,
            load_optimizer_states=fitting,
            load_lr_scheduler_states=False,
        )
        if client_state is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {path}")
        return client_state

    @override
    def load_model_state_dict(self, checkpoint: Any, strict: bool = True) -> None:
        pass

    @override
    def load_optimizer_state_dict(self, checkpoint: Any) -> None:
        pass

    @override
    def teardown(self) -> None:
        super().teardown()
        self.engine = None
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _publish(partial: Path, final: Path) -> None:
    """Renames a completely written checkpoint into place; what it replaces is removed only afterwards."""
    replaced = final.with_name(final.name + ".replaced")
    if final.exists() or final.is_symlink():  # saved again (or a `last` link): kept until the new one is in
        final.rename(replaced)
    partial.rename(final)
    if replaced.is_symlink() or replaced.is_file():
        replaced.unlink()
    elif replaced.exists():
        shutil.rmtree(replaced)


@functools.cache
def _pipeline_module_class() -> type:
    from deepspeed.pipe import PipelineModule

    class StagePartitionedPipelineModule(PipelineModule):
        """A PipelineModule whose stage boundaries are given, not found by building every layer to count it."""

        def __init__(self, parts: list[int], **kwargs: Any) -> None:
            self._given_parts = parts
            super().__init__(**kwargs)

        def _partition_layers(self, method: str = "uniform") -> None:
            self.parts = list(self._given_parts)
            stage_id = self._topo.get_coord(self.global_rank).pipe
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
