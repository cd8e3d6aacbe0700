"""Merging a PEFT LoRA into its 16-bit base model, one safetensors shard at a time."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch

from lit_qlp.adapters.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX
from lit_qlp.models.checkpoint import INDEX_FILE, SINGLE_FILE, copy_tokenizer_files


def read_lora(adapter_dir: Path, scale: float = 1.0) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float]:
    """The LoRA pairs of a PEFT adapter by base weight name (``model.layers.0.self_attn.q_proj.weight``) and the
    factor ``scale · alpha / r`` (``alpha / sqrt(r)`` with rsLoRA) that multiplies each ``B A``."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / ADAPTER_CONFIG
    if not config_path.is_file():
        raise FileNotFoundError(f"--adapter {adapter_dir} has no {ADAPTER_CONFIG}; point it at a PEFT LoRA directory")
    config = json.loads(config_path.read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(
            f"{config_path}: peft_type {config.get('peft_type')!r} is not a LoRA; a Control Adapter converts with "
            "tools/control_adapter_to_lora.py first"
        )
    if config.get("use_dora"):
        raise ValueError(f"{config_path}: DoRA adapters are not supported (use_dora: true)")
    patterns = {k: config[k] for k in ("rank_pattern", "alpha_pattern") if config.get(k)}
    if patterns or config.get("modules_to_save"):
        raise ValueError(
            f"{config_path}: per-module ranks/alphas or modules_to_save ({sorted(patterns) or 'modules_to_save'}) "
            "are not supported by this merge; use PEFT's merge_and_unload"
        )
    rank = config["r"]
    factor = scale * config["lora_alpha"] / (math.sqrt(rank) if config.get("use_rslora") else rank)
    tensors = load_file(adapter_dir / ADAPTER_WEIGHTS)
    other = sorted(k for k in tensors if not k.endswith((".lora_A.weight", ".lora_B.weight")))
    if other:
        raise ValueError(
            f"{adapter_dir / ADAPTER_WEIGHTS} holds tensors other than linear LoRA pairs ({other[:3]}: embedding LoRA, "
            "biases or saved modules), which this merge does not handle; use PEFT's merge_and_unload"
        )
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[len(PEFT_PREFIX) : -len(".lora_A.weight")] if key.startswith(PEFT_PREFIX) else key
        b = tensors.get(key.replace(".lora_A.weight", ".lora_B.weight"))
        if b is None:
            raise ValueError(f"{adapter_dir / ADAPTER_WEIGHTS}: {key} has no matching lora_B")
        pairs[f"{module}.weight"] = (a, b)
    if not pairs:
        raise ValueError(f"{adapter_dir / ADAPTER_WEIGHTS} holds no LoRA pairs (no *.lora_A.weight keys)")
    return pairs, factor


def shard_files(base_dir: Path) -> list[str]:
    """The safetensors files of a Hugging Face model directory, in index order."""
    base_dir = Path(base_dir)
    if (base_dir / INDEX_FILE).is_file():
        weight_map = json.loads((base_dir / INDEX_FILE).read_text())["weight_map"]
        return list(dict.fromkeys(weight_map.values()))
    if (base_dir / SINGLE_FILE).is_file():
        return [SINGLE_FILE]
    raise FileNotFoundError(f"--input {base_dir} has neither {INDEX_FILE} nor {SINGLE_FILE}")


def merge_lora(base_dir: Path, adapter_dir: Path, output_dir: Path, scale: float = 1.0) -> list[str]:
    """Writes ``base + factor · B A`` for every LoRA pair into ``output_dir``, shard by shard.

    Only one shard's tensors are in memory at a time; the product is formed in float32 and cast back to the
    weight's dtype. The index, config, tokenizer and chat template files are copied, so the output loads with
    ``AutoModelForCausalLM.from_pretrained``.

    Args:
        base_dir: The original (16- or 32-bit) model directory the adapter was trained on.
        adapter_dir: A PEFT LoRA directory (an epoch export, or one converted from a Control Adapter).
        output_dir: New directory (must not exist or be empty).
        scale: Extra multiplier of the adapter (1 merges it as trained).

    Returns:
        The merged weight names.

    Raises:
        ValueError: when adapter tensors name weights the base does not have, or shapes disagree.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    base_dir, output_dir = Path(base_dir), Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        raise FileExistsError(f"--output {output_dir} exists and is not empty; choose a new directory")
    pairs, factor = read_lora(adapter_dir, scale)
    files = shard_files(base_dir)
    present: set[str] = set()
    for name in files:
        with safe_open(str(base_dir / name), framework="pt") as f:
            present.update(f.keys())
    missing = sorted(set(pairs) - present)
    if missing:
        raise ValueError(
            f"the adapter {adapter_dir} changes weights that {base_dir} does not have: {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}; is --input the model the adapter was trained on?"
        )
    output_dir.mkdir(parents=True, exist_ok=True)
    merged = []
    for name in files:
        with safe_open(str(base_dir / name), framework="pt") as f:
            metadata = f.metadata() or {"format": "pt"}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        for key in tensors:
            if key in pairs:
                a, b = pairs[key]
                weight = tensors[key]
                if (b.shape[0], a.shape[1]) != tuple(weight.shape):
                    raise ValueError(
                        f"{key}: the adapter's B A is {b.shape[0]}×{a.shape[1]} but the weight is {tuple(weight.shape)}"
                    )
                update = (b.float() @ a.float()) * factor
                tensors[key] = (weight.float() + update).to(weight.dtype)
                merged.append(key)
        save_file(tensors, output_dir / name, metadata=metadata)
        del tensors
    for side in (INDEX_FILE, "config.json"):
        if (base_dir / side).is_file():
            shutil.copy2(base_dir / side, output_dir / side)
    copy_tokenizer_files(base_dir, output_dir)
    return merged


__all__ = ["merge_lora", "read_lora", "shard_files"]
