"""tools/compare_losses.py: lit_qlp and transformers + PEFT train the same curve from the same start."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["lora", "qlora", "lora-long"])
def test_lit_qlp_and_peft_losses_agree_in_float32(mode, tmp_path):
    """``lora-long``: lit_qlp with long_context (the MLP in chunks of 48 of the 128 tokens, attention and MLP
    outputs kept by the offloaded checkpoint) against the same PEFT run."""
    command = [sys.executable, ROOT / "tools" / "compare_losses.py", "--shape", "tiny", "--seq", "128"]
    if mode == "lora-long":
        mode = "lora"
        command += ["--long-context", "--mlp-chunk-tokens", "48"]
    command += ["--steps", "4", "--micro-batches", "4", "--mode", mode, "--device", "cpu", "--dtype", "float32"]
    command += ["--lr", "1e-3", "--model-dir", tmp_path / "model"]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("RESULT "))
    losses = json.loads(line[len("RESULT ") :])
    assert len(losses["lit"]) == 4 and losses["lit"][3] != losses["lit"][0]  # training moved the loss
    assert losses["max_relative_difference"] < 1e-6, losses
