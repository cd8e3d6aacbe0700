"""The pieces PipelineStrategy builds DeepSpeed's pipeline from, as functions (the tests build engines with them)."""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from typing import Any

import torch

from lit_qlp.compat.deepspeed import is_pipe_replicated, stage_partitioned_pipeline_module_class
from lit_qlp.models.layout import PipelineSpec
from lit_qlp.strategies.offload import offloaded_checkpoint


@contextmanager
def default_dtype(dtype: torch.dtype):
    """Sets torch's default dtype inside the block. DeepSpeed's engine keeps a loss buffer in the default dtype,
    which must stay float32 whatever dtype the model computes in."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_pipeline(
    spec: PipelineSpec,
    parts: list[int],
    topology: Any,
    activation_checkpointing: bool = True,
    activation_offload: bool = False,
) -> torch.nn.Module:
    """The ``PipelineModule`` of this process's stage: only the layers ``parts[stage]:parts[stage + 1]`` are built.

    Args:
        spec: The model's layers, loss and checkpointable layer classes.
        parts: Stage boundaries, ``[0, ..., len(spec.layers)]`` (``partition.partition_layers``).
        topology: DeepSpeed's ``ProcessTopology`` of pipe × data ranks.
        activation_checkpointing: Recompute each checkpointable layer in the backward pass (non-reentrant: the
            reentrant form crashes on stage 0).
        activation_offload: Keep the checkpointed layer inputs in pinned CPU memory (``offloaded_checkpoint``).
    """
    checkpoint = (
        offloaded_checkpoint if activation_offload else partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
    )
    with default_dtype(torch.float32):
        return stage_partitioned_pipeline_module_class()(
            parts=parts,
            layers=spec.layers,
            topology=topology,
            loss_fn=spec.loss_fn,
            activation_checkpoint_interval=1 if activation_checkpointing else 0,
            activation_checkpoint_func=checkpoint,
            checkpointable_layers=spec.checkpointable_layers,
        )


def engine_config(gradient_accumulation_steps: int, gradient_clipping: float) -> dict[str, Any]:
    """DeepSpeed's config for a pipeline of one-sequence micro-batches. No ``bf16`` section: optimi's Kahan
    summation, not float32 master weights, handles bf16 parameters."""
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "gradient_clipping": gradient_clipping,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


def build_engine(pipe: torch.nn.Module, optimizer: torch.optim.Optimizer | None, config: dict[str, Any]) -> Any:
    """``deepspeed.initialize`` of ``pipe`` (a ``PipelineEngine``), with float32 as the default dtype."""
    import deepspeed

    with default_dtype(torch.float32):
        engine, *_ = deepspeed.initialize(model=pipe, optimizer=optimizer, config=config)
    return engine


def clip_global_norm(
    parameters: list[torch.nn.Parameter], max_norm: float, device: torch.device, group: Any = None
) -> torch.Tensor:
    """Scales the gradients of ``parameters`` so that the norm of the whole model's gradient is at most
    ``max_norm``: ``g ← g · min(1, max_norm / (‖g‖ + 1e-6))``, with ‖g‖ summed over the stages of ``group``.

    A tied weight's copies on later stages (marked by DeepSpeed) count once. Returns the norm before clipping.
    """
    squares = torch.zeros((), device=device, dtype=torch.float32)
    for p in parameters:
        if p.grad is not None and not is_pipe_replicated(p):
            squares += p.grad.detach().float().square().sum()
    if group is not None:
        torch.distributed.all_reduce(squares, group=group)
    norm = squares.sqrt()
    coefficient = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for p in parameters:
        if p.grad is not None:
            p.grad.detach().mul_(coefficient.to(p.grad.dtype))
    return norm


def token_normalizer(total_label_tokens: float, num_micro_batches: int, data_parallel_size: int) -> float:
    """What each micro-batch's summed token loss is divided by, so that DeepSpeed's mean over micro-batches and
    data-parallel replicas is ``sum(token losses) / total label tokens``: ``total / (micro-batches × replicas)``."""
    return max(total_label_tokens / (num_micro_batches * data_parallel_size), 1e-12)


__all__ = [
    "build_engine",
    "build_pipeline",
    "clip_global_norm",
    "default_dtype",
    "engine_config",
    "token_normalizer",
]
