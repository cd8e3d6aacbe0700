"""What gathers the tensors of all pipeline stages for an export: the strategy, or one process holding them all."""

from __future__ import annotations

from typing import Any, Protocol


class StageGroup(Protocol):
    """The collectives an export needs (``PipelineStrategy`` implements them across processes)."""

    stage_id: int
    data_parallel_rank: int
    is_global_zero: bool

    def gather_from_stages(self, obj: Any) -> list[Any] | None:
        """``obj`` of every stage of data-parallel replica 0, in stage order, on global rank 0; None elsewhere."""
        ...

    def all_gather_object(self, obj: Any) -> list[Any]:
        """``obj`` of every rank, in global rank order, on every rank."""
        ...

    def barrier(self, name: str | None = None) -> None: ...


def gather_from_stages(obj: Any, stage_id: int, data_parallel_rank: int, world_size: int, is_global_zero: bool):
    """Collects ``obj`` from every stage of data-parallel replica 0 onto global rank 0.

    Collective: every rank calls it. Returns the objects in stage order on global rank 0, None elsewhere.
    """
    import torch.distributed as dist

    if world_size == 1:
        return [obj]
    payload = (stage_id, obj) if data_parallel_rank == 0 else None
    received = [None] * world_size if is_global_zero else None
    dist.gather_object(payload, received, dst=0)
    if received is None:
        return None
    return [o for _, o in sorted((p for p in received if p is not None), key=lambda p: p[0])]


def all_gather_object(obj: Any, world_size: int) -> list[Any]:
    """``obj`` of every rank, in global rank order, on every rank (collective)."""
    import torch.distributed as dist

    if world_size == 1:
        return [obj]
    gathered = [None] * world_size
    dist.all_gather_object(gathered, obj)
    return gathered


class SingleProcessStages:
    """Stands in for the strategy when one process holds every pipeline layer (exports outside training)."""

    stage_id = 0
    data_parallel_rank = 0
    is_global_zero = True

    def gather_from_stages(self, obj: Any) -> list[Any]:
        return [obj]

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def barrier(self, name: str | None = None) -> None:
        pass


__all__ = ["SingleProcessStages", "StageGroup", "all_gather_object", "gather_from_stages"]
