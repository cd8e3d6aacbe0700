"""tools/benchmark_attention.py on the CPU: each backend alone, its FLOP rate from the formula, torch's reason for a
backend that does not take the call, and the command line's refusals."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[2] / "tools"
sys.path.insert(0, str(TOOLS))

from benchmark_attention import BACKWARD_FACTOR, main, measure  # noqa: E402


def args(**overrides):
    import argparse

    values = dict(seq=64, heads=4, kv_heads=2, head_dim=16, dtype="float32", device="cpu", repeats=1)
    return argparse.Namespace(**{**values, **overrides})


@pytest.mark.parametrize("backend", ["flash", "math"])
def test_each_backend_is_timed_with_its_flop_rate(backend):
    for grouped in (True, False):
        row = measure(args(), backend, grouped)
        flops = 4 * 64**2 * 16 * 4 / 2
        assert row["forward_s"] > 0 and row["step_s"] > 0
        assert row["forward_tflops"] == pytest.approx(flops / row["forward_s"] / 1e12)
        assert row["step_tflops"] == pytest.approx(flops * (1 + BACKWARD_FACTOR) / row["step_s"] / 1e12)


def test_a_backend_that_does_not_take_the_call_reports_torchs_reason(capsys):
    assert "No viable backend" in measure(args(), "cudnn", True)["error"]  # no cuDNN kernel on the CPU
    main(["--device", "cpu", "--dtype", "float32", "--seq", "32", "--heads", "2", "--kv-heads", "1",
          "--head-dim", "8", "--backends", "cudnn,math", "--repeats", "1"])  # fmt: skip
    out = capsys.readouterr().out
    assert "| cudnn | grouped | does not take the call: No viable backend" in out
    assert out.count("| math |") == 2


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--backends", "flash,fast"], "--backends: fast is not one of cudnn, flash, efficient, math"),
        (["--kv-heads", "3"], "--kv-heads must divide --heads"),
        (["--repeats", "0"], "--repeats must be at least 1"),
    ],
)
def test_bad_options_are_refused_before_anything_runs(extra, message, capsys, monkeypatch):
    monkeypatch.setattr("benchmark_attention.measure", lambda *a: pytest.fail("measured despite a bad option"))
    with pytest.raises(SystemExit) as exit_:
        main(["--device", "cpu", *extra])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err, err
