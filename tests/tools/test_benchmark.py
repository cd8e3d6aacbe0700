"""tools/benchmark.py: its multi-process path and random weights run lit_qlp's real training path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def test_random_weights_need_only_the_config(tiny_model, tmp_path):
    from lit_qlp.models.pipeline import DecoderLayerPipe, ModelSource, OutputPipe, StageBuilder

    (tmp_path / "config.json").write_bytes((tiny_model("llama") / "config.json").read_bytes())
    source = ModelSource(tmp_path, dtype="float32", random_weights=True)
    builder = StageBuilder(source, torch.device("cpu"))
    layer = DecoderLayerPipe(builder, 0)
    weights = dict(layer.layer.named_parameters())
    assert torch.equal(weights["input_layernorm.weight"], torch.ones_like(weights["input_layernorm.weight"]))
    q = weights["self_attn.q_proj.weight"]
    assert q.abs().sum() > 0 and 0.015 < float(q.std()) < 0.025
    x = (torch.randn(1, 8, source.config.hidden_size), torch.arange(8).unsqueeze(0), torch.zeros(1, 8).long())
    assert torch.isfinite(OutputPipe(builder)(layer(x))).all()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        ModelSource(tmp_path, dtype="float32")  # without random_weights the checkpoint is required


@pytest.mark.slow
def test_benchmark_runs_two_pipeline_stages_on_random_weights(tmp_path):
    command = [sys.executable, ROOT / "tools" / "benchmark.py", "--shape", "tiny", "--seq", "64", "--device", "cpu"]
    command += ["--random-weights", "--devices", "2", "--pipeline-stages", "2", "--micro-batches", "2"]
    command += ["--warmup", "1", "--steps", "1", "--modes", "lit-lora", "--model-dir", tmp_path / "model"]
    command += ["--json", tmp_path / "result.json"]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["config.json"]  # no weights were written
    lit = json.loads((tmp_path / "result.json").read_text())["results"]["lit-lora"]
    assert "error" not in lit, lit
    assert lit["tokens_per_s"] > 0 and len(lit["peak_gib_per_process"]) == 2
    assert "2 processes, 2 stages (compute)" in result.stdout
