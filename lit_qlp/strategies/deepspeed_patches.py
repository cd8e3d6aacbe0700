"""The one workaround lit_qlp applies to DeepSpeed, applied explicitly by PipelineStrategy on CPU.

DeepSpeed 0.19's ``init_distributed`` on a CPU machine JIT-compiles a shared-memory all-reduce extension
(``deepspeed_shm_comm``) with the host C++ compiler before anything else runs: about a minute on two cores for
every fresh machine (CI, the demo), for a speed-up of CPU all-reduces that lit_qlp's CPU runs (tests, demo)
do not need. DeepSpeed decides through its ``deepspeed.ops.__compatible_ops__`` table, which it computes once
and documents as editable; marking the op incompatible makes DeepSpeed fall back to plain torch.distributed
(gloo), as it does on non-Linux hosts. Upstream: deepspeed/comm/torch.py ``build_shm_op``; no switch exists.
"""

from __future__ import annotations

SHM_COMM_OP = "deepspeed_shm_comm"


def skip_cpu_shm_comm_build() -> None:
    """Stops DeepSpeed from compiling its CPU shared-memory all-reduce op (idempotent)."""
    import deepspeed.ops

    table = deepspeed.ops.__compatible_ops__
    if SHM_COMM_OP not in table:
        raise RuntimeError(
            f"deepspeed.ops.__compatible_ops__ has no {SHM_COMM_OP!r} entry; this DeepSpeed version changed "
            "how it builds its CPU communication op, so lit_qlp.strategies.deepspeed_patches needs updating"
        )
    table[SHM_COMM_OP] = False
