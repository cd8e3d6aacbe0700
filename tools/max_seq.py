"""The longest sequence a training command completes a step of: doubling from ``--start``, then bisection.

    python tools/max_seq.py --start 65536 -- python tools/benchmark.py --shape llama3-8b --random-weights \\
        --seq {seq} --micro-batches 1 --warmup 0 --steps 1 --modes lit-qlora-long
    PYTHONPATH=/tmp/site-peers python tools/max_seq.py --start 65536 -- \\
        python .peers/anchor_unsloth.py --modes unsloth-qlora --seq {seq} --micro-batches 1 --warmup 0 --steps 1

Each trial runs the command with ``{seq}`` replaced by the length; it trains when the command exits with 0 (and its
output matches ``--success`` if given) within ``--timeout`` seconds. Lengths double from ``--start`` until one
fails (or ``--max`` is passed), then the interval between the longest that trained and the shortest that failed is
halved until it is at most ``--resolution`` tokens; every length tried is a multiple of ``--resolution``. Prints
each trial (tokens, outcome, seconds) and the longest that trained. ``--budget-s`` stops the search early (the
answer is then a lower bound, and says so).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

OUT_OF_MEMORY = re.compile(r"OutOfMemoryError|CUDA out of memory|out of memory", re.IGNORECASE)


@dataclass
class Trial:
    """One length tried: ``outcome`` is "trained", "out of memory", "timed out" or "failed (exit N)"."""

    seq: int
    outcome: str
    seconds: float

    @property
    def trained(self) -> bool:
        return self.outcome == "trained"


def search(
    attempt: Callable[[int], Trial], start: int, maximum: int, resolution: int, budget_s: float | None = None
) -> tuple[int | None, list[Trial], bool]:
    """Doubling from ``start`` while ``attempt(seq)`` trains (up to ``maximum``), then bisection to
    ``resolution``.

    Returns:
        The longest length that trained (None if not even ``start``), every trial in order, and whether the search
        finished (False: ``budget_s`` ran out first, so the longest is only a lower bound).
    """
    if start % resolution or maximum < start:
        raise ValueError(f"--start={start} must be a multiple of --resolution={resolution} and at most --max={maximum}")
    began = time.perf_counter()
    trials: list[Trial] = []

    def out_of_time() -> bool:
        return budget_s is not None and time.perf_counter() - began > budget_s

    longest, shortest_failed = None, None
    seq = start
    while seq <= maximum:
        if out_of_time():
            return longest, trials, False
        trials.append(attempt(seq))
        if not trials[-1].trained:
            shortest_failed = seq
            break
        longest = seq
        seq *= 2
    if longest is None or shortest_failed is None:
        return longest, trials, True
    while shortest_failed - longest > resolution:
        if out_of_time():
            return longest, trials, False
        middle = (longest + shortest_failed) // 2 // resolution * resolution
        trials.append(attempt(middle))
        if trials[-1].trained:
            longest = middle
        else:
            shortest_failed = middle
    return longest, trials, True


def run_command(command: list[str], seq: int, timeout: float, success: re.Pattern | None) -> Trial:
    """Runs ``command`` with ``{seq}`` replaced by ``seq``; its ``Trial``."""
    argv = [part.replace("{seq}", str(seq)) for part in command]
    start = time.perf_counter()
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return Trial(seq, "timed out", time.perf_counter() - start)
    seconds = time.perf_counter() - start
    output = proc.stdout + proc.stderr
    if proc.returncode == 0 and (success is None or success.search(proc.stdout)):
        return Trial(seq, "trained", seconds)
    if OUT_OF_MEMORY.search(output):
        return Trial(seq, "out of memory", seconds)
    last = output.strip().splitlines()[-1:] or [""]
    return Trial(seq, f"failed (exit {proc.returncode}): {last[0][:160]}", seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--start", type=int, default=65536, help="first length tried (a multiple of --resolution)")
    parser.add_argument("--max", type=int, default=4 * 2**20, help="longest length tried")
    parser.add_argument("--resolution", type=int, default=4096, help="the answer is within this many tokens")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds a trial may take; longer fails")
    parser.add_argument("--budget-s", type=float, default=None, help="stop trying new lengths after this long")
    parser.add_argument("--success", default=None, help="regex the command's stdout must match besides exit 0")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command, with {seq} for the length")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not any("{seq}" in part for part in command):
        parser.error("the command (after --) must contain {seq} where the sequence length goes")
    if args.resolution < 1:
        parser.error(f"--resolution={args.resolution} must be at least 1")
    success = re.compile(args.success) if args.success else None

    def attempt(seq: int) -> Trial:
        trial = run_command(command, seq, args.timeout, success)
        print(f"seq {seq:>9,}: {trial.outcome} ({trial.seconds:.0f} s)", flush=True)
        return trial

    try:
        longest, trials, finished = search(attempt, args.start, args.max, args.resolution, args.budget_s)
    except ValueError as error:
        parser.error(str(error))
    print("| tokens | outcome | seconds |\n| --- | --- | --- |")
    for trial in trials:
        print(f"| {trial.seq:,} | {trial.outcome} | {trial.seconds:.0f} |")
    if longest is None:
        print(f"no length trained: {args.start:,} tokens did not ({trials[0].outcome})")
        sys.exit(1)
    bound = "" if finished else f" (at least: --budget-s={args.budget_s:g} ran out before the search finished)"
    if all(trial.trained for trial in trials):
        bound = f" (every length tried trained: the next doubling would pass --max={args.max:,})"
    print(f"longest sequence that trained: {longest:,} tokens{bound}")


if __name__ == "__main__":
    main()
