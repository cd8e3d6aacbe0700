"""Merging a PEFT LoRA into its 16-bit base model, one safetensors shard at a time."""

from __future__ import annotations

import shutil
from pathlib import Path

from lit_qlp.formats.hf import INDEX_FILE, copy_tokenizer_files, read_weight_map, save_shard
from lit_qlp.formats.peft import read_lora_adapter


def merge_lora(base_dir: Path, adapter_dir: Path, output_dir: Path, scale: float = 1.0) -> list[str]:
    """Writes ``base + scale · s · B A`` for every LoRA pair into ``output_dir``, shard by shard, with ``s`` the
    pair's PEFT factor (``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA).

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
        ValueError: when the adapter is not a plain LoRA (``read_lora_adapter``), names weights the base does not
            have, or shapes disagree.
    """
    from safetensors import safe_open

    base_dir, output_dir = Path(base_dir), Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        raise FileExistsError(f"--output {output_dir} exists and is not empty; choose a new directory")
    adapter = read_lora_adapter(adapter_dir)
    pairs = {f"{module}.weight": pair for module, pair in adapter.pairs.items()}
    factors = {f"{module}.weight": scale * factor for module, factor in adapter.scales.items()}
    weight_map = read_weight_map(base_dir)
    files = list(dict.fromkeys(weight_map.values()))
    missing = sorted(set(pairs) - set(weight_map))
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
                update = (b.float() @ a.float()) * factors[key]
                tensors[key] = (weight.float() + update).to(weight.dtype)
                merged.append(key)
        save_shard(output_dir / name, tensors, metadata)
        del tensors
    for side in (INDEX_FILE, "config.json"):
        if (base_dir / side).is_file():
            shutil.copy2(base_dir / side, output_dir / side)
    copy_tokenizer_files(base_dir, output_dir)
    return merged


__all__ = ["merge_lora"]
