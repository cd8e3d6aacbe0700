"""What holds the GPU memory at the peak of a recorded step, by where each tensor was allocated.

    python tools/memory_peak.py snapshot.pickle          # a torch.cuda.memory._dump_snapshot() file

``tools/benchmark.py --memory DIR`` records the allocator's history (``torch.cuda.memory._record_memory_history``)
over one step and writes this breakdown of its snapshot. The snapshot's trace of allocations and frees is replayed
from the memory live when the recording started (blocks the trace never allocated: weights, optimizer state,
checkpointed activations of earlier steps) to the moment the total peaked; the blocks live then are grouped by the
innermost stack frame in lit_qlp, transformers, PEFT, bitsandbytes or DeepSpeed (else the innermost frame).
"""

from __future__ import annotations

import argparse
import pickle
from collections import defaultdict
from pathlib import Path

OWN_CODE = ("lit_qlp/", "transformers/", "peft/", "bitsandbytes/", "deepspeed/")
"""Where a frame names the code that asked for a tensor (rather than torch's own machinery)."""

BEFORE = "live before the recorded step (weights, optimizer state, ...)"


def where(frames: list[dict]) -> str:
    """``file:line function`` of the innermost frame in ``OWN_CODE``, else the innermost frame, else unknown."""
    for frame in frames:
        if any(part in frame["filename"] for part in OWN_CODE):
            break
    else:
        if not frames:
            return "unknown"
        frame = frames[0]
    name = frame["filename"]
    for part in OWN_CODE:
        if part in name:
            name = part + name.split(part, 1)[1]
            break
    return f"{name}:{frame['line']} {frame['name']}"


def peak_blocks(snapshot: dict, device: int = 0) -> tuple[int, list[tuple[int, str]]]:
    """The peak of allocated bytes over the recorded trace of ``device`` and the ``(size, where)`` of every block
    live at it."""
    trace = [e for e in snapshot["device_traces"][device] if e["action"] in ("alloc", "free_completed")]
    allocated_in_trace = {e["addr"] for e in trace if e["action"] == "alloc"}
    live: dict[int, tuple[int, str]] = {}
    for segment in snapshot["segments"]:
        if segment.get("device", device) != device:
            continue
        address = segment["address"]  # a segment's blocks lie end to end from its address, in order
        for block in segment["blocks"]:
            if block["state"] == "active_allocated" and address not in allocated_in_trace:
                live[address] = (block["size"], BEFORE)
            address += block["size"]
    seen: set[int] = set()
    for event in trace:  # blocks freed during the trace that it never allocated were live at its start
        if event["action"] == "alloc":
            seen.add(event["addr"])
        elif event["addr"] not in seen:
            live.setdefault(event["addr"], (event["size"], BEFORE))

    total = sum(size for size, _ in live.values())
    peak, peak_index = total, -1
    for index, event in enumerate(trace):
        total += event["size"] if event["action"] == "alloc" else -event["size"]
        if total > peak:
            peak, peak_index = total, index
    for event in trace[: peak_index + 1]:
        if event["action"] == "alloc":
            live[event["addr"]] = (event["size"], where(event.get("frames", [])))
        else:
            live.pop(event["addr"], None)
    return peak, list(live.values())


def peak_breakdown(snapshot: dict, device: int = 0, rows: int = 30) -> str:
    """A table of the memory live at the peak of ``snapshot``'s trace, grouped by ``where``, largest first."""
    peak, blocks = peak_blocks(snapshot, device)
    groups: dict[str, list[int]] = defaultdict(list)
    for size, place in blocks:
        groups[place].append(size)
    ordered = sorted(groups.items(), key=lambda item: -sum(item[1]))
    lines = [f"peak {peak / 2**30:.2f} GiB allocated, {len(blocks)} blocks", "| GiB | blocks | allocated at |"]
    lines.append("| --- | --- | --- |")
    for place, sizes in ordered[:rows]:
        lines.append(f"| {sum(sizes) / 2**30:.3f} | {len(sizes)} | {place} |")
    rest = ordered[rows:]
    if rest:
        lines.append(f"| {sum(sum(s) for _, s in rest) / 2**30:.3f} | {sum(len(s) for _, s in rest)} | the rest |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("snapshot", type=Path)
    parser.add_argument("--device", type=int, default=0)
    parser.add_argument("--rows", type=int, default=30)
    args = parser.parse_args()
    with args.snapshot.open("rb") as file:
        print(peak_breakdown(pickle.load(file), args.device, args.rows), end="")


if __name__ == "__main__":
    main()
