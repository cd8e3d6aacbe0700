"""tools/memory_peak.py: the blocks live at the peak of a recorded trace, replayed by hand."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

from memory_peak import BEFORE, peak_blocks, peak_breakdown  # noqa: E402

MIB = 2**20


def frame(path: str, line: int, name: str) -> dict:
    return {"filename": path, "line": line, "name": name}


MLP = [frame("/x/torch/nn/functional.py", 10, "linear"), frame("/y/site/transformers/models/llama.py", 7, "forward")]
LOSS = [frame("/w/lit_qlp/kernels/fused_loss.py", 99, "chunk")]


def snapshot() -> dict:
    """A weight of 100 MiB allocated before the recording (live at the end), a 5 MiB buffer freed during it; the
    trace allocates 30 (MLP) and 20 (loss), frees the 5, allocates 40 (MLP) = peak 185 MiB, then frees all three."""
    trace = [
        {"action": "alloc", "addr": 1, "size": 30 * MIB, "frames": MLP},
        {"action": "segment_alloc", "addr": 0, "size": 0},
        {"action": "alloc", "addr": 2, "size": 20 * MIB, "frames": LOSS},
        {"action": "free_requested", "addr": 7, "size": 5 * MIB},
        {"action": "free_completed", "addr": 7, "size": 5 * MIB},
        {"action": "alloc", "addr": 3, "size": 40 * MIB, "frames": MLP},
        {"action": "free_completed", "addr": 1, "size": 30 * MIB},
        {"action": "free_completed", "addr": 3, "size": 40 * MIB},
        {"action": "free_completed", "addr": 2, "size": 20 * MIB},
    ]
    # torch's snapshot format: a segment's blocks carry no address; they lie end to end from the segment's.
    weights = {"size": 100 * MIB, "requested_size": 100 * MIB, "state": "active_allocated", "frames": []}
    free = {"size": 30 * MIB, "requested_size": 30 * MIB, "state": "inactive", "frames": []}
    segments = [
        {"device": 0, "address": 9, "total_size": 100 * MIB, "blocks": [weights]},
        {"device": 0, "address": 1, "total_size": 70 * MIB, "blocks": [free, dict(free, size=40 * MIB)]},
    ]
    return {"segments": segments, "device_traces": [trace]}


def test_peak_blocks_replays_the_trace_from_what_was_live_before():
    peak, blocks = peak_blocks(snapshot())
    assert peak == (100 + 5 + 30 + 20 - 5 + 40) * MIB
    assert sorted(blocks) == sorted(
        [
            (100 * MIB, BEFORE),
            (30 * MIB, "transformers/models/llama.py:7 forward"),
            (20 * MIB, "lit_qlp/kernels/fused_loss.py:99 chunk"),
            (40 * MIB, "transformers/models/llama.py:7 forward"),
        ]
    )


def test_peak_breakdown_groups_by_place_largest_first():
    lines = peak_breakdown(snapshot()).splitlines()
    assert lines[0] == "peak 0.19 GiB allocated, 4 blocks"
    assert lines[3].endswith("| 1 | " + BEFORE + " |")
    assert lines[4] == "| 0.068 | 2 | transformers/models/llama.py:7 forward |"
    assert lines[5] == "| 0.020 | 1 | lit_qlp/kernels/fused_loss.py:99 chunk |"


@pytest.mark.gpu
def test_peak_of_a_real_cuda_snapshot_is_torchs_peak():
    """A snapshot of torch's own allocator (its format, not a hand-made one): the replayed peak equals
    ``torch.cuda.max_memory_allocated`` over the recording, weights allocated before it included."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    weights = torch.empty(64 * MIB, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.memory._record_memory_history(max_entries=10_000, stacks="python")
    try:
        first = torch.empty(32 * MIB, dtype=torch.uint8, device="cuda")
        second = torch.empty(16 * MIB, dtype=torch.uint8, device="cuda")
        del first
        third = torch.empty(8 * MIB, dtype=torch.uint8, device="cuda")
        del second, third
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    peak, blocks = peak_blocks(snapshot, torch.cuda.current_device())
    assert peak == torch.cuda.max_memory_allocated()
    assert any(size == weights.numel() and place == BEFORE for size, place in blocks)
