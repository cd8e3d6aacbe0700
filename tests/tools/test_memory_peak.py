"""tools/memory_peak.py: the blocks live at the peak of a recorded trace, replayed by hand."""

from __future__ import annotations

import sys
from pathlib import Path

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
    blocks = [
        {"addr": 9, "size": 100 * MIB, "state": "active_allocated"},
        {"addr": 1, "size": 30 * MIB, "state": "inactive"},
    ]
    return {"segments": [{"device": 0, "blocks": blocks}], "device_traces": [trace]}


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
