"""The Hugging Face model-directory format: safetensors weights (one file, or shards and their index), the config
and the tokenizer files.

Reading is by tensor (``CheckpointReader``): each pipeline process opens only the shards that hold its own stage's
tensors (found through ``model.safetensors.index.json``), so no process ever holds the whole model. Writing is by
shard (``plan_shards``, ``shard_file_name``, ``save_shard``, ``write_index``), so a writer holds one shard at a time.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# A model directory's tokenizer and chat template files (the tokenizer's cache key, and copied with every export).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
# Copied beside exported weights so that the export loads on its own.
EXPORTED_FILES = (*TOKENIZER_FILES, "generation_config.json")


@dataclass(frozen=True)
class LegacyExperts:
    """How a checkpoint stores the MoE experts that transformers 5.x fuses into 3-D tensors.

    transformers 5.x holds the experts of a layer as ``{fused_block}experts.gate_up_proj`` [E, 2I, H] and
    ``{fused_block}experts.down_proj`` [E, H, I], but checkpoints on the hub (and ``save_pretrained``)
    keep one 2-D tensor per expert: ``{block}experts.{e}.{gate}.weight`` and so on.

    Args:
        block: Name of the MoE block in the checkpoint, with dots around it (".block_sparse_moe.").
        fused_block: Name of the same block in the transformers 5.x module tree (".mlp.").
        gate: Per-expert name of the gate projection ("w1").
        up: Per-expert name of the up projection ("w3").
        down: Per-expert name of the down projection ("w2").
    """

    block: str
    fused_block: str
    gate: str
    up: str
    down: str


# model_type -> the legacy layout of its experts. Architectures are data: a new MoE family is a new row.
LEGACY_EXPERTS: dict[str, LegacyExperts] = {
    "mixtral": LegacyExperts(".block_sparse_moe.", ".mlp.", "w1", "w3", "w2"),
    "qwen2_moe": LegacyExperts(".mlp.", ".mlp.", "gate_proj", "up_proj", "down_proj"),
    "qwen3_moe": LegacyExperts(".mlp.", ".mlp.", "gate_proj", "up_proj", "down_proj"),
    "olmoe": LegacyExperts(".mlp.", ".mlp.", "gate_proj", "up_proj", "down_proj"),
}


def copy_tokenizer_files(model_dir: Path, directory: Path) -> None:
    """Copies the tokenizer (and chat template, generation config) files of ``model_dir`` into ``directory``."""
    for name in EXPORTED_FILES:
        if (Path(model_dir) / name).is_file():
            shutil.copy2(Path(model_dir) / name, Path(directory) / name)


def read_weight_map(model_dir: Path) -> dict[str, str]:
    """Which safetensors file of a Hugging Face model directory holds each tensor, in the index's order.

    Raises:
        FileNotFoundError: ``model_dir`` holds neither ``model.safetensors.index.json`` nor ``model.safetensors``.
    """
    model_dir = Path(model_dir)
    if (model_dir / INDEX_FILE).is_file():
        return json.loads((model_dir / INDEX_FILE).read_text())["weight_map"]
    if (model_dir / SINGLE_FILE).is_file():
        from safetensors import safe_open

        with safe_open(model_dir / SINGLE_FILE, framework="pt") as f:
            return dict.fromkeys(f.keys(), SINGLE_FILE)
    raise FileNotFoundError(
        f"{model_dir} holds neither {INDEX_FILE} nor {SINGLE_FILE}; it must be a Hugging Face model directory saved "
        "in safetensors format"
    )


class CheckpointReader:
    """Reads named tensors from the safetensors files of one Hugging Face model directory.

    Args:
        model_dir: Directory holding ``model.safetensors`` or ``model.safetensors.index.json`` and its shards.
        model_type: The config's ``model_type``; selects the legacy expert layout from ``LEGACY_EXPERTS``.
        tie_word_embeddings: Read ``lm_head.weight`` from ``model.embed_tokens.weight`` when the former is absent.
    """

    def __init__(self, model_dir: Path, model_type: str = "", tie_word_embeddings: bool = False) -> None:
        self.model_dir = Path(model_dir)
        self.legacy_experts = LEGACY_EXPERTS.get(model_type)
        self.tie_word_embeddings = tie_word_embeddings
        self.weight_map = read_weight_map(self.model_dir)
        self._handles: dict[str, object] = {}

    def _raw(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        file = self.weight_map[key]
        if file not in self._handles:
            self._handles[file] = safe_open(self.model_dir / file, framework="pt")
        return self._handles[file].get_tensor(key)

    def _sources(self, name: str) -> tuple[tuple[str, ...], bool]:
        """The checkpoint keys that make up the module tensor ``name``, and whether they are per-expert pieces.

        Raises:
            KeyError: if the checkpoint has no such tensor.
        """
        if name in self.weight_map:
            return (name,), False
        if name == "lm_head.weight" and self.tie_word_embeddings and "model.embed_tokens.weight" in self.weight_map:
            return ("model.embed_tokens.weight",), False
        legacy = self.legacy_experts
        if legacy is None:
            raise KeyError(name)
        renamed = name.replace(legacy.fused_block, legacy.block)
        if renamed in self.weight_map:
            return (renamed,), False
        if name.endswith((".experts.gate_up_proj", ".experts.down_proj")):
            stem = renamed.rsplit(".experts.", 1)[0]
            parts = (legacy.gate, legacy.up) if name.endswith("gate_up_proj") else (legacy.down,)
            keys: list[str] = []
            while f"{stem}.experts.{len(keys) // len(parts)}.{parts[0]}.weight" in self.weight_map:
                expert = len(keys) // len(parts)
                keys.extend(f"{stem}.experts.{expert}.{p}.weight" for p in parts)
            if keys:
                return tuple(keys), True
        raise KeyError(name)

    def source_keys(self, name: str) -> tuple[str, ...]:
        """The checkpoint keys that hold the module tensor ``name``: itself, or its per-expert pieces in the legacy
        layout, in order (``gate_0, up_0, gate_1, ...`` for a ``gate_up_proj``).

        Raises:
            KeyError: if the checkpoint has no such tensor (an MXFP4 one included).
        """
        return self._sources(name)[0]

    def get(self, name: str) -> torch.Tensor:
        """Returns the module tensor ``name`` (a transformers 5.x parameter or buffer name) on the CPU.

        Fused expert tensors are assembled from per-expert checkpoint tensors when the checkpoint has the legacy
        layout: ``gate_up_proj[e] = cat(gate_e, up_e)`` and ``down_proj[e] = down_e``; MXFP4 expert tensors
        (``<name>_blocks`` and ``<name>_scales``, as gpt-oss is published) are dequantised (``dequantize_mxfp4``).
        """
        if name not in self.weight_map and f"{name}_blocks" in self.weight_map:
            return dequantize_mxfp4(self._raw(f"{name}_blocks"), self._raw(f"{name}_scales"))
        try:
            keys, per_expert = self._sources(name)
        except KeyError:
            raise KeyError(f"tensor {name!r} is not in the checkpoint at {self.model_dir}") from None
        if not per_expert:
            return self._raw(keys[0])
        tensors = [self._raw(k) for k in keys]
        if name.endswith("gate_up_proj"):
            return torch.stack([torch.cat(tensors[i : i + 2], dim=0) for i in range(0, len(tensors), 2)])
        return torch.stack(tensors)


def e2m1_values(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The 16 values of a 4-bit e2m1 float by code: sign bit 3, exponent bits 2-1 (bias 1), mantissa bit 0;
    exponent 0 is subnormal (0 or 0.5)."""
    codes = torch.arange(16)
    exponent, mantissa = (codes >> 1) & 3, (codes & 1).to(torch.float64)
    magnitude = torch.where(exponent == 0, mantissa * 0.5, (1 + mantissa / 2) * 2.0 ** (exponent - 1))
    return torch.where(codes >= 8, -magnitude, magnitude).to(dtype)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An MXFP4 expert tensor as the transformers 5.x module holds it.

    Args:
        blocks: uint8 ``[E, rows, G, 16]``: 32 e2m1 values per group, two per byte (low nibble first).
        scales: uint8 ``[E, rows, G]``: each group's power-of-two scale, biased by 127.
        dtype: Dtype of the result.

    Returns:
        ``[E, G * 32, rows]``: each expert's ``[rows, G * 32]`` matrix, transposed as gpt-oss's experts hold it.
    """
    if blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} do not match")
    values = e2m1_values(torch.float32)
    pairs = torch.stack((values[(blocks & 0x0F).long()], values[(blocks >> 4).long()]), dim=-1)
    groups = pairs.flatten(-2) * torch.exp2(scales.to(torch.float32) - 127).unsqueeze(-1)
    return groups.flatten(-2).transpose(1, 2).to(dtype).contiguous()


def plan_shards(tensors: Mapping[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    """Groups tensor names, in order, into shards of at most ``max_bytes`` (a larger tensor gets its own)."""
    shards: list[list[str]] = []
    size = 0
    for name, tensor in tensors.items():
        if not shards or (size + tensor.nbytes > max_bytes and shards[-1]):
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += tensor.nbytes
    return shards


def shard_file_name(index: int, total: int) -> str:
    """The name of shard ``index`` (1-based) of ``total``: ``model-00002-of-00003.safetensors``, or
    ``model.safetensors`` when there is one."""
    return SINGLE_FILE if total == 1 else f"model-{index:05d}-of-{total:05d}.safetensors"


def save_shard(path: Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Writes one safetensors file of CPU copies of ``tensors``; ``metadata`` defaults to ``{"format": "pt"}``."""
    from safetensors.torch import save_file

    cpu = {n: t.detach().to("cpu").contiguous() for n, t in tensors.items()}
    save_file(cpu, path, metadata=metadata or {"format": "pt"})


def write_index(directory: Path, weight_map: Mapping[str, str], total_size: int) -> None:
    """Writes ``model.safetensors.index.json``: which shard holds each tensor, and the bytes of all tensors."""
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (Path(directory) / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


__all__ = [
    "EXPORTED_FILES",
    "INDEX_FILE",
    "LEGACY_EXPERTS",
    "SINGLE_FILE",
    "TOKENIZER_FILES",
    "CheckpointReader",
    "LegacyExperts",
    "copy_tokenizer_files",
    "dequantize_mxfp4",
    "e2m1_values",
    "plan_shards",
    "read_weight_map",
    "save_shard",
    "shard_file_name",
    "write_index",
]
