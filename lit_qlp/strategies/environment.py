"""Cluster environment for processes started by DeepSpeed's launcher (``deepspeed ... -m lit_qlp``)."""

from __future__ import annotations

import os

from lightning.fabric.plugins import ClusterEnvironment
from typing_extensions import override

# Set by deepspeed/launcher/launch.py for every process it starts (CROSS_* describe the nodes).
_LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "CROSS_RANK", "CROSS_SIZE", "MASTER_ADDR")


class DeepSpeedLauncherEnvironment(ClusterEnvironment):
    """Ranks, node rank and main address as DeepSpeed's launcher sets them, also across several nodes.

    Lightning's default environment reads only LOCAL_RANK and NODE_RANK, which the launcher does not set, so on
    several nodes every node would believe it is node 0. PipelineStrategy selects this environment by itself
    when the launcher's variables are present.
    """

    @staticmethod
    @override
    def detect() -> bool:
        return all(v in os.environ for v in _LAUNCHER_VARIABLES) and "TORCHELASTIC_RUN_ID" not in os.environ

    @property
    @override
    def creates_processes_externally(self) -> bool:
        return True

    @property
    @override
    def main_address(self) -> str:
        return os.environ["MASTER_ADDR"]

    @property
    @override
    def main_port(self) -> int:
        return int(os.environ.get("MASTER_PORT", "29500"))

    @override
    def world_size(self) -> int:
        return int(os.environ["WORLD_SIZE"])

    @override
    def set_world_size(self, size: int) -> None:
        if size != self.world_size():
            raise ValueError(
                f"DeepSpeed's launcher started {self.world_size()} processes but the Trainer expects {size}; set "
                f"--trainer.devices {os.environ['LOCAL_SIZE']} --trainer.num_nodes {os.environ['CROSS_SIZE']}"
            )

    @override
    def global_rank(self) -> int:
        return int(os.environ["RANK"])

    @override
    def set_global_rank(self, rank: int) -> None:
        if rank != self.global_rank():
            raise ValueError(
                f"rank mismatch: DeepSpeed's launcher says RANK={self.global_rank()}, the Trainer computed {rank}; "
                f"set --trainer.devices {os.environ['LOCAL_SIZE']} --trainer.num_nodes {os.environ['CROSS_SIZE']}"
            )

    @override
    def local_rank(self) -> int:
        return int(os.environ["LOCAL_RANK"])

    @override
    def node_rank(self) -> int:
        return int(os.environ["CROSS_RANK"])
