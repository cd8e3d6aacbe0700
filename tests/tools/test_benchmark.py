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


@pytest.mark.parametrize("mode", ["hf-qlora", "hf-qlora-attn", "hf-qlora-expert-r2"])
def test_hf_baseline_adapts_what_the_lit_mode_adapts_on_moe(tmp_path, mode):
    """The transformers + PEFT baseline of each MoE mode trains the same parameters as its lit_qlp mode, on the
    benchmark's own tiny MoE shape: the same count, the same adapted tensors (PEFT 0.21's ``all-linear`` alone
    would also adapt the router and double the gate_up_proj rank, as transformers 4.x's separate gate and up
    projections had one pair each)."""
    import peft
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(ROOT / "tools"))
    import benchmark

    from lit_qlp.module import CausalLMModule

    model_dir = tmp_path / "model"
    benchmark.build_model("tiny-moe", model_dir, "cpu")
    lit_mode = {"hf-qlora": "lit-qlora"}.get(mode, mode.replace("hf-", "lit-"))
    options, _ = benchmark.lit_module_options(benchmark.LIT_MODES[lit_mode], rank=4)
    options.pop("base")  # the count does not depend on the base's storage
    module = CausalLMModule(model_dir, dtype="float32", **options)
    spec = module.pipeline_spec(torch.device("cpu"), pipeline_stages=1)
    layers = torch.nn.ModuleList([layer.build() for layer in spec.layers])  # one stage, as DeepSpeed builds it
    lit = sum(p.numel() for p in layers.parameters() if p.requires_grad)

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    hf = peft.get_peft_model(hf, peft.LoraConfig(**benchmark.hf_lora_options(hf, mode, rank=4)))
    trained = [n for n, p in hf.named_parameters() if p.requires_grad]
    assert sum(p.numel() for p in hf.parameters() if p.requires_grad) == lit
    assert not any(".gate.lora" in n for n in trained)  # the router stays frozen, as in lit_qlp
    assert any(".experts." in n for n in trained) == (mode != "hf-qlora-attn")


@pytest.mark.parametrize("value", ["800:200", "0:10", "300"])
def test_document_tokens_must_be_a_range(value):
    command = [sys.executable, ROOT / "tools" / "benchmark.py", "--document-tokens", value, "--modes", "lit-lora"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2 and f"--document-tokens={value} must be MIN:MAX with 0 < MIN <= MAX" in result.stderr


def test_memory_history_needs_cuda():
    command = [sys.executable, ROOT / "tools" / "benchmark.py", "--device", "cpu", "--memory", "mem", "--shape", "tiny"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2 and "--memory records the CUDA allocator; it needs --device cuda" in result.stderr
