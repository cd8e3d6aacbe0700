"""Deployment tools: LoRA merge against PEFT, its memory, and checkpoint conversion."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lit_qlp.export.merge import merge_lora

ROOT = Path(__file__).resolve().parents[2]


def sharded_model(directory: Path, shard_size: str, **shape) -> Path:
    """A random Llama saved in float32 over several safetensors shards, with the tiny tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.tiny_models import COMMON, make_tiny_tokenizer

    torch.manual_seed(0)
    config = LlamaConfig(**{**COMMON, **shape})
    LlamaForCausalLM(config).save_pretrained(directory, max_shard_size=shard_size)
    make_tiny_tokenizer(directory)
    return directory


def random_lora(model_dir: Path, directory: Path, rank: int = 4, alpha: int = 8, targets=("q_proj", "down_proj")):
    """A PEFT LoRA with random A and B (init_lora_weights=False) saved in ``directory``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(directory)
    return directory


def test_merge_equals_peft_merge_and_unload(tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    model_dir = sharded_model(tmp_path / "base", "40KB")
    assert (model_dir / "model.safetensors.index.json").is_file()
    adapter = random_lora(model_dir, tmp_path / "adapter")
    merged_names = merge_lora(model_dir, adapter, tmp_path / "merged")
    assert len(merged_names) == 2 * 4  # q_proj and down_proj of 4 layers
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    reference = peft.PeftModel.from_pretrained(base, adapter).merge_and_unload().eval()
    ours_state, reference_state = ours.state_dict(), reference.state_dict()
    assert sorted(ours_state) == sorted(reference_state)
    for name, tensor in reference_state.items():
        torch.testing.assert_close(ours_state[name], tensor, msg=lambda m: f"{name}: {m}")
    ids = torch.randint(3, 90, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, reference(input_ids=ids).logits)
    for name in ("config.json", "tokenizer.json", "model.safetensors.index.json"):
        assert (tmp_path / "merged" / name).is_file()
    with pytest.raises(FileExistsError, match="not empty"):
        merge_lora(model_dir, adapter, tmp_path / "merged")


def test_merge_refuses_an_adapter_of_another_model(tmp_path):
    model_dir = sharded_model(tmp_path / "base", "1GB")
    other = sharded_model(tmp_path / "other", "1GB", num_hidden_layers=6)
    adapter = random_lora(other, tmp_path / "adapter")
    with pytest.raises(ValueError, match="does not have: .*model.layers.4"):
        merge_lora(model_dir, adapter, tmp_path / "merged")


# VmHWM, not ru_maxrss: the latter carries the parent's (pytest's) peak into a forked child.
MEASURE = """
import json, sys
from lit_qlp.export.merge import merge_lora
def status(key):
    return int(next(l for l in open('/proc/self/status') if l.startswith(key)).split()[1]) * 1024
merge_lora(sys.argv[4], sys.argv[5], sys.argv[6])  # warm-up on a tiny model: library buffers, thread pools
before = status('VmHWM')
merge_lora(sys.argv[1], sys.argv[2], sys.argv[3])
print(json.dumps({"before": before, "peak": status('VmHWM')}))
"""


@pytest.mark.slow
def test_merge_memory_stays_near_one_shard(tmp_path):
    """A 125 MB model in shards of at most 30 MB: the merge's peak memory above its start is about one shard."""
    model_dir = sharded_model(
        tmp_path / "base",
        "30MB",
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=4096,
    )
    adapter = random_lora(model_dir, tmp_path / "adapter", targets=("q_proj", "up_proj", "down_proj"))
    tiny = sharded_model(tmp_path / "tiny", "40KB")
    tiny_adapter = random_lora(tiny, tmp_path / "tiny-adapter")
    shards = sorted(model_dir.glob("model-*.safetensors"))
    total = sum(p.stat().st_size for p in shards)
    largest = max(p.stat().st_size for p in shards)
    assert len(shards) >= 4
    # A fixed mmap threshold makes glibc return each freed tensor to the OS at once (its default adapts and keeps
    # freed shard-sized blocks in the heap), so the peak shows what the merge holds, not what the allocator caches.
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "MALLOC_MMAP_THRESHOLD_": "131072"}
    result = subprocess.run(
        [sys.executable, "-c", MEASURE, model_dir, adapter, tmp_path / "merged", tiny, tiny_adapter, tmp_path / "t"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    growth = measured["peak"] - measured["before"]
    print(
        f"merge: {len(shards)} shards, total {total / 2**20:.1f} MiB, largest {largest / 2**20:.1f} MiB, "
        f"peak growth {growth / 2**20:.1f} MiB"
    )
    assert growth < 2.5 * largest and growth < 0.6 * total


def test_merge_from_the_command_line(tmp_path):
    model_dir = sharded_model(tmp_path / "base", "1GB")
    adapter = random_lora(model_dir, tmp_path / "adapter")
    command = [sys.executable, ROOT / "tools" / "merge_lora.py", "--input", model_dir, "--adapter", adapter]
    result = subprocess.run([*command, "--output", tmp_path / "out"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0 and "merged 8 weights" in result.stdout, result.stderr[-2000:]
    again = subprocess.run([*command, "--output", tmp_path / "out"], capture_output=True, text=True, cwd=ROOT)
    assert again.returncode != 0 and "error: --output" in again.stderr and "not empty" in again.stderr


def test_merge_refuses_what_it_cannot_merge(tmp_path):
    from safetensors.torch import save_file

    from lit_qlp.formats.peft import peft_adapter_config, read_lora_adapter

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    config = peft_adapter_config("base", 4, 4, 0.0, ["q_proj"], None)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    key = "base_model.model.model.embed_tokens.lora_embedding_A"
    save_file({key: torch.zeros(4, 8)}, adapter / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="other than linear LoRA pairs.*embed_tokens.lora_embedding_A"):
        read_lora_adapter(adapter)
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": ["lm_head"]}))
    with pytest.raises(ValueError, match="modules_to_save"):
        read_lora_adapter(adapter)
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "CONTROL_ADAPTER"}))
    with pytest.raises(ValueError, match="control_adapter_to_lora.py first"):
        read_lora_adapter(adapter)


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "gpt_oss"])
def test_merge_of_fused_expert_lora_equals_peft_merge_and_unload(tiny_model, tmp_path, arch):
    """Mixtral and Qwen3-MoE checkpoints hold one tensor per expert (gate_up splits into gate and up rows);
    gpt-oss holds the fused, transposed tensors."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    model_dir = tiny_model(arch)
    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = peft.LoraConfig(
        r=2,
        lora_alpha=6,
        target_modules=["o_proj"],
        target_parameters=["experts.gate_up_proj", "experts.down_proj"],
        init_lora_weights=False,
    )
    peft.get_peft_model(base, config).save_pretrained(tmp_path / "adapter")
    merged_names = merge_lora(model_dir, tmp_path / "adapter", tmp_path / "merged")
    assert any("expert" in name for name in merged_names)
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    fresh = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    reference = peft.PeftModel.from_pretrained(fresh, tmp_path / "adapter").merge_and_unload().eval()
    untouched = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()
    ours_state, reference_state = ours.state_dict(), reference.state_dict()
    assert sorted(ours_state) == sorted(reference_state)
    changed = [n for n in reference_state if "experts" in n and not torch.equal(reference_state[n], untouched[n])]
    assert changed
    for name, tensor in reference_state.items():
        torch.testing.assert_close(ours_state[name], tensor, msg=lambda m: f"{name}: {m}")
