"""tools/max_seq.py: doubling then bisection finds the longest length a command trains, as a direct scan would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[2] / "tools"
sys.path.insert(0, str(TOOLS))

from max_seq import Trial, search  # noqa: E402


@pytest.mark.parametrize("limit", [1000, 1024, 5000, 70_000, 1_000_000])
def test_search_finds_the_longest_multiple_of_the_resolution_that_trains(limit):
    tried = []

    def attempt(seq):
        tried.append(seq)
        return Trial(seq, "trained" if seq <= limit else "out of memory", 0.0)

    longest, trials, finished = search(attempt, start=1024, maximum=2**20, resolution=256)
    scan = max((s for s in range(256, 2**20 + 1, 256) if s <= limit and s >= 1024), default=None)
    assert longest == scan and finished
    assert [t.seq for t in trials] == tried and len(set(tried)) == len(tried)
    assert all(s % 256 == 0 for s in tried)
    first_failure = next((i for i, t in enumerate(trials) if not t.trained), len(trials) - 1)
    assert tried[: first_failure + 1] == [1024 * 2**i for i in range(first_failure + 1)]  # doubling, then bisection


def test_search_stops_at_the_budget_with_a_lower_bound():
    clock = iter(range(100))

    def attempt(seq):
        next(clock)
        return Trial(seq, "trained", 1.0)

    longest, trials, finished = search(attempt, 1024, 2**30, 256, budget_s=0.0)
    assert longest is None and trials == [] and not finished


def test_search_refuses_a_start_off_the_resolution():
    with pytest.raises(ValueError, match="--start=1000 must be a multiple of --resolution=256"):
        search(lambda s: Trial(s, "trained", 0), 1000, 2**20, 256)


def test_the_command_line_runs_the_command_with_each_length():
    command = [sys.executable, "-c", "import sys; sys.exit(0 if {seq} <= 3000 else 3)"]
    proc = subprocess.run(
        [sys.executable, str(TOOLS / "max_seq.py"), "--start", "512", "--resolution", "128", "--", *command],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "longest sequence that trained: 2,944 tokens"
    assert "| 4,096 | failed (exit 3)" in proc.stdout
    missing = subprocess.run(
        [sys.executable, str(TOOLS / "max_seq.py"), "--", "true"], capture_output=True, text=True, timeout=60
    )
    assert missing.returncode == 2 and "must contain {seq}" in missing.stderr


@pytest.mark.parametrize(
    "options, message",
    [
        (["--resolution", "0"], "--resolution=0 must be at least 1"),
        (["--start", "1000", "--resolution", "256"], "--start=1000 must be a multiple of --resolution=256"),
    ],
)
def test_the_command_line_refuses_bad_lengths(options, message):
    command = [sys.executable, str(TOOLS / "max_seq.py"), *options, "--", "echo", "{seq}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "seq " not in result.stdout  # refused before any trial ran
