"""Merging a PEFT LoRA into its 16-bit base model, one safetensors shard at a time."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import NamedTuple

import torch

from lit_qlp.formats.hf import INDEX_FILE, CheckpointReader, copy_tokenizer_files, read_weight_map, save_shard
from lit_qlp.formats.peft import LoraAdapterFile, expert_delta, expert_factors, read_lora_adapter


class ExpertPiece(NamedTuple):
    """Where one checkpoint tensor sits in a fused expert tensor with LoRA.

    Attributes:
        tensor: The fused tensor's name (``model.layers.0.mlp.experts.gate_up_proj``).
        expert: The expert whose 2-D matrix the checkpoint tensor is (legacy per-expert layout), or None when the
            checkpoint holds the fused tensor itself.
        part: Which of the expert's row blocks it is (``gate_up_proj`` = cat(gate, up): 0 gate, 1 up).
        parts: How many row blocks the expert's matrix has.
    """

    tensor: str
    expert: int | None
    part: int
    parts: int


def expert_pieces(base_dir: Path, adapter: LoraAdapterFile) -> tuple[dict[str, ExpertPiece], dict[str, bool]]:
    """The checkpoint tensors that the adapter's fused expert pairs change, and which fused tensors are stored
    [E, in, out] (``is_transposed`` of the experts module, read from a meta-device build of the base config).

    Raises:
        ValueError: the checkpoint lacks a tensor, or stores it as MXFP4 (merge a dequantised copy instead).
    """
    if not adapter.expert_pairs:
        return {}, {}
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base_dir)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    reader = CheckpointReader(base_dir, json.loads((base_dir / "config.json").read_text()).get("model_type", ""))
    pieces: dict[str, ExpertPiece] = {}
    transposed: dict[str, bool] = {}
    for name in adapter.expert_pairs:
        module_name = name.rpartition(".")[0]
        transposed[name] = bool(getattr(skeleton.get_submodule(module_name), "is_transposed", False))
        try:
            keys = reader.source_keys(name)
        except KeyError:
            packed = f"{name}_blocks" in reader.weight_map
            raise ValueError(
                f"the adapter {adapter.directory} changes {name}, which {base_dir} "
                + (
                    "stores as MXFP4; save a dequantised copy of the model and merge into that"
                    if packed
                    else "does not have; is --input the model the adapter was trained on?"
                )
            ) from None
        if keys == (name,):
            pieces[name] = ExpertPiece(name, None, 0, 1)
            continue
        parts = 2 if name.endswith("gate_up_proj") else 1
        for index, key in enumerate(keys):
            pieces[key] = ExpertPiece(name, index // parts, index % parts, parts)
    return pieces, transposed


def expert_piece_update(
    piece: ExpertPiece, pair: tuple[torch.Tensor, torch.Tensor], rank: int, transposed: bool, shape: torch.Size
) -> torch.Tensor:
    """The unscaled update ``B_e A_e`` of one checkpoint tensor (float32): the whole fused tensor's, or the
    ``piece.part``-th row block of expert ``piece.expert``'s."""
    a, b = pair[0].float(), pair[1].float()
    num_experts = a.shape[0] // rank
    if piece.expert is None:
        return expert_delta(a, b, num_experts, transposed)
    a_e, b_e = expert_factors(a, b, num_experts)
    rows = b_e.shape[1] // piece.parts
    update = b_e[piece.expert, piece.part * rows : (piece.part + 1) * rows] @ a_e[piece.expert]
    if tuple(update.shape) != tuple(shape):
        raise ValueError(
            f"{piece.tensor}: the adapter's update of expert {piece.expert} is {tuple(update.shape)} but the "
            f"checkpoint's tensor is {tuple(shape)}"
        )
    return update


def merge_lora(base_dir: Path, adapter_dir: Path, output_dir: Path, scale: float = 1.0) -> list[str]:
    """Writes ``base + scale · s · B A`` for every LoRA pair into ``output_dir``, shard by shard, with ``s`` the
    pair's PEFT factor (``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA).

    Fused expert pairs (PEFT's ``target_parameters``) add ``scale · s · B_e A_e`` to each expert's matrix, whether the
    checkpoint keeps the fused tensor (gpt-oss) or one tensor per expert (Mixtral, Qwen-MoE, OLMoE on the hub: the
    update of ``gate_up_proj`` splits into its gate and up rows).

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
    pieces, transposed = expert_pieces(base_dir, adapter)
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
            elif key in pieces:
                piece, weight = pieces[key], tensors[key]
                factor = scale * adapter.expert_scales[piece.tensor]
                pair = adapter.expert_pairs[piece.tensor]
                update = expert_piece_update(
                    piece, pair, adapter.expert_ranks[piece.tensor], transposed[piece.tensor], weight.shape
                )
                if update.shape != weight.shape:
                    raise ValueError(
                        f"{key}: the adapter's update is {tuple(update.shape)} but the weight is {tuple(weight.shape)}"
                    )
                tensors[key] = (weight.float() + update * factor).to(weight.dtype)
                merged.append(key)
        save_shard(output_dir / name, tensors, metadata)
        del tensors
    for side in (INDEX_FILE, "config.json"):
        if (base_dir / side).is_file():
            shutil.copy2(base_dir / side, output_dir / side)
    copy_tokenizer_files(base_dir, output_dir)
    return merged


__all__ = ["merge_lora"]
