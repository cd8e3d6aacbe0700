"""One console display: by default ProgressReport's step lines and EvaluationReport's lines, no progress bar; with
``--trainer.enable_progress_bar true`` Lightning's bar, with the same figures, and no lines."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.runs import ROOT, fit_args

STEP_LINE = re.compile(
    r"step (\d+)/(\d+) \| loss \d+\.\d+ \| lr \S+ \| [\d.,]+ seq/s \| [\d,]+ tok/s \| elapsed \S+ \| ETA \S+"
)


def console(args: list[str]) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(
        [sys.executable, "-m", "lit_qlp", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout + result.stderr


@pytest.mark.slow
def test_default_console_is_the_step_and_evaluation_lines_only(tiny_model, corpus, tmp_path):
    out = console(fit_args(tiny_model("llama"), corpus, tmp_path / "lines", "--trainer.max_steps=4"))
    steps = [int(m.group(1)) for m in STEP_LINE.finditer(out)]
    assert steps == [1, 2, 3, 4] and "ETA" in out
    assert out.count("new evaluation loss") >= 2  # before training and after
    assert "it/s" not in out and "Epoch 0" not in out  # no progress bar


@pytest.mark.slow
def test_progress_bar_replaces_the_lines(tiny_model, corpus, tmp_path):
    out = console(
        fit_args(
            tiny_model("llama"), corpus, tmp_path / "bar", "--trainer.max_steps=4", "--trainer.enable_progress_bar=true"
        )
    )
    assert "Epoch 0" in out and "train/tokens_per" in out and "eval/loss" in out  # the bar and its figures
    assert not STEP_LINE.search(out) and "new evaluation loss" not in out
