"""The PEFT LoRA adapter format: ``adapter_config.json`` beside ``adapter_model.safetensors``.

Written by the epoch export and the Control Adapter conversion (``peft_adapter_config`` + ``save_peft_adapter``);
read by the LoRA merge and the GGUF export through the one reader ``read_lora_adapter``.

The reader takes what both consumers reproduce exactly: plain LoRA pairs on linear layers, each adding
``scale · B A`` to its weight with ``scale = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``). It
refuses, with a ValueError naming the file and the key, every PEFT setting or tensor that changes that sum: another
``peft_type``, the LoRA variants (DoRA, aLoRA, QA-LoRA, ...), per-module ranks or alphas, ``modules_to_save``,
biases, transposed (``fan_in_fan_out``) base weights, embedding LoRA and incomplete or mis-shaped pairs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
LORA_PEFT_TYPE = "LORA"
LORA_PARTS = ("lora_A", "lora_B")
MERGE_ADVICE = "merge the adapter with PEFT's merge_and_unload instead"


class Refusal(NamedTuple):
    """Why the reader refuses an adapter whose config sets one key, and what to do instead.

    Attributes:
        what: What the setting does that plain ``scale · B A`` pairs cannot express.
        advice: What to change.
        default: The value that leaves the adapter plain (besides None, false and empty).
    """

    what: str
    advice: str
    default: object = None


# adapter_config.json key -> why an adapter setting it is not a plain LoRA. A new PEFT feature is a new row.
REFUSED_SETTINGS: dict[str, Refusal] = {
    "use_dora": Refusal("DoRA adapters rescale each weight by a learned magnitude vector", "train a plain LoRA"),
    "rank_pattern": Refusal("gives modules their own rank", f"retrain with one r, or {MERGE_ADVICE}"),
    "alpha_pattern": Refusal("gives modules their own lora_alpha", f"retrain with one lora_alpha, or {MERGE_ADVICE}"),
    "modules_to_save": Refusal(
        "saves full copies of modules beside the LoRA pairs", f"retrain without modules_to_save, or {MERGE_ADVICE}"
    ),
    "fan_in_fan_out": Refusal("stores the base weights transposed (Conv1D layers such as GPT-2's)", MERGE_ADVICE),
    "bias": Refusal("trains the biases of the base layers", f"retrain with bias: none, or {MERGE_ADVICE}", "none"),
    "lora_bias": Refusal("adds a trained bias to lora_B", f"retrain without lora_bias, or {MERGE_ADVICE}"),
    "trainable_token_indices": Refusal("trains rows of the token embeddings", f"retrain without it, or {MERGE_ADVICE}"),
    "target_parameters": Refusal("puts LoRA on bare parameters, not on linear layers", "target linear layers instead"),
    "layer_replication": Refusal("builds extra decoder layers that share base weights", MERGE_ADVICE),
    "use_qalora": Refusal("QA-LoRA pools the input of lora_A in groups", "train a plain LoRA"),
    "alora_invocation_tokens": Refusal(
        "activated LoRA (aLoRA) acts only after its invocation tokens", "run it in PEFT"
    ),
    "invocation_string": Refusal("activated LoRA (aLoRA) acts only after its invocation string", "run it in PEFT"),
    "kasa_config": Refusal("KaSA puts learned singular values between lora_A and lora_B", "train a plain LoRA"),
    "use_bdlora": Refusal("BD-LoRA uses block-diagonal factors", "train a plain LoRA"),
    "monteclora_config": Refusal("MonteCLoRA samples its update", "train a plain LoRA"),
    "arrow_config": Refusal("Arrow routes each token among several LoRAs", "run it in PEFT"),
}


def lora_scaling(alpha: float, rank: int, use_rslora: bool = False) -> float:
    """PEFT's factor of the update ``B A``: ``alpha / rank``, or ``alpha / sqrt(rank)`` for rank-stabilised LoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def peft_adapter_config(
    base_model: str,
    rank: int,
    alpha: float,
    dropout: float,
    target_modules: Sequence[str],
    layers_to_transform: Sequence[int] | None,
    use_rslora: bool = False,
) -> dict:
    """A PEFT ``adapter_config.json`` for a LoRA adapter.

    Args:
        base_model: ``base_model_name_or_path``: the model the adapter was trained on.
        rank: ``r``.
        alpha: ``lora_alpha``.
        dropout: ``lora_dropout``.
        target_modules: Module names (``q_proj``); written sorted and without repeats.
        layers_to_transform: The decoder layers that hold adapters; None for all.
        use_rslora: Whether the update is scaled by ``alpha / sqrt(r)`` instead of ``alpha / r``.
    """
    return {
        "peft_type": LORA_PEFT_TYPE,
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": sorted(set(target_modules)),
        "layers_to_transform": list(layers_to_transform) if layers_to_transform is not None else None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "use_rslora": use_rslora,
        "use_dora": False,
        "modules_to_save": None,
        "inference_mode": True,
    }


def save_peft_adapter(directory: Path, tensors: dict[str, torch.Tensor], config: dict) -> None:
    """Writes ``adapter_model.safetensors`` and ``adapter_config.json`` into ``directory`` (created if needed)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


@dataclass(frozen=True)
class LoraAdapterFile:
    """A PEFT LoRA adapter as ``read_lora_adapter`` found it.

    Attributes:
        directory: The adapter directory.
        config: Its ``adapter_config.json``.
        pairs: Per module, by its name in the Hugging Face model (``model.layers.0.self_attn.q_proj``), the
            ``(A, B)`` pair: A [r, in] and B [out, r], in the dtype they were saved in.
        scales: Per module, the factor of its ``B A`` (``lora_alpha / r``, or ``lora_alpha / sqrt(r)``).
    """

    directory: Path
    config: dict
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]
    scales: dict[str, float]


def read_lora_config(directory: Path) -> dict:
    """The ``adapter_config.json`` of a PEFT LoRA, refused (ValueError naming the key) unless it is a plain LoRA.

    Raises:
        FileNotFoundError: ``directory`` has no ``adapter_config.json``.
        ValueError: The config is not a LoRA, sets a key of ``REFUSED_SETTINGS``, or lacks ``r`` / ``lora_alpha``.
    """
    path = Path(directory) / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{directory} has no {ADAPTER_CONFIG}; point it at a PEFT LoRA directory")
    config = json.loads(path.read_text())
    peft_type = config.get("peft_type")
    if peft_type != LORA_PEFT_TYPE:
        raise ValueError(
            f"{path}: peft_type {peft_type!r} is not a LoRA ({LORA_PEFT_TYPE!r}); only PEFT LoRA adapters are read "
            "(a Control Adapter converts to one with tools/control_adapter_to_lora.py first)"
        )
    for key, refusal in REFUSED_SETTINGS.items():
        value = config.get(key)
        if value and value != refusal.default:
            raise ValueError(
                f"{path}: {key}={value!r}: {refusal.what}, which plain LoRA pairs cannot reproduce; {refusal.advice}"
            )
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"{path}: r={rank!r} is not a positive integer; set the rank the adapter was trained with")
    alpha = config.get("lora_alpha")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise ValueError(f"{path}: lora_alpha={alpha!r} is not a number; set the alpha the adapter was trained with")
    return config


def split_lora_key(key: str) -> tuple[str, str] | None:
    """``(module, part)`` of a LoRA tensor key (``base_model.model.<module>.lora_A.weight``), else None.

    ``module`` is the name in the Hugging Face model; the PEFT prefix is optional.
    """
    name = key.removeprefix(PEFT_PREFIX)
    for part in LORA_PARTS:
        if name.endswith(f".{part}.weight"):
            return name[: -len(f".{part}.weight")], part
    return None


def lora_pairs(
    tensors: dict[str, torch.Tensor], rank: int, weights_path: Path
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The ``(A, B)`` pairs of an adapter's tensors by module name, checked to be complete rank-``rank`` pairs.

    Args:
        tensors: The contents of ``adapter_model.safetensors``.
        rank: The config's ``r``: the rank of every pair.
        weights_path: The file, named in the messages.

    Raises:
        ValueError: A tensor is not ``*.lora_A.weight`` / ``*.lora_B.weight``, a pair is incomplete or mis-shaped,
            or there is no pair.
    """
    parts: dict[str, dict[str, torch.Tensor]] = {}
    other: list[str] = []
    for key, tensor in tensors.items():
        if "lora_magnitude_vector" in key.split("."):
            raise ValueError(
                f"{weights_path}: {key} is a DoRA magnitude; DoRA adapters are not read, train a plain LoRA"
            )
        found = split_lora_key(key)
        if found is None:
            other.append(key)
        else:
            parts.setdefault(found[0], {})[found[1]] = tensor
    if other:
        raise ValueError(
            f"{weights_path} holds tensors other than linear LoRA pairs ({', '.join(sorted(other)[:3])}"
            f"{', ...' if len(other) > 3 else ''}: embedding LoRA, biases, trainable tokens or saved modules); retrain "
            f"without them, or {MERGE_ADVICE}"
        )
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module, pair in parts.items():
        missing = sorted(set(LORA_PARTS) - set(pair))
        if missing:
            raise ValueError(f"{weights_path}: {module} has no {missing[0]}.weight; the adapter is incomplete")
        a, b = pair["lora_A"], pair["lora_B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(
                f"{weights_path}: {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; a pair is "
                "lora_A [r, in] and lora_B [out, r]"
            )
        if a.shape[0] != rank:
            raise ValueError(
                f"{weights_path}: {module} has rank {a.shape[0]} but {ADAPTER_CONFIG} says r={rank} (and sets no "
                "rank_pattern); the config does not belong to these weights"
            )
        pairs[module] = (a, b)
    if not pairs:
        raise ValueError(f"{weights_path} holds no LoRA pairs (no *.lora_A.weight keys)")
    return pairs


def read_lora_adapter(directory: Path) -> LoraAdapterFile:
    """Reads a PEFT LoRA adapter directory: its config, its ``(A, B)`` pairs and the scale of each.

    Args:
        directory: Holds ``adapter_config.json`` and ``adapter_model.safetensors`` (an epoch export, a
            ``save_pretrained`` of PEFT, or a converted Control Adapter).

    Raises:
        FileNotFoundError: A file is missing.
        ValueError: The adapter is not a plain LoRA (see the module notes); the message names the file and key.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    config = read_lora_config(directory)
    weights_path = directory / ADAPTER_WEIGHTS
    if not weights_path.is_file():
        raise FileNotFoundError(
            f"{directory} has no {ADAPTER_WEIGHTS}; only safetensors adapters are read (PEFT's save_pretrained "
            "writes one unless safe_serialization=False)"
        )
    pairs = lora_pairs(load_file(weights_path), config["r"], weights_path)
    scale = lora_scaling(config["lora_alpha"], config["r"], bool(config.get("use_rslora")))
    return LoraAdapterFile(directory, config, pairs, dict.fromkeys(pairs, scale))


__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "LORA_PEFT_TYPE",
    "PEFT_PREFIX",
    "REFUSED_SETTINGS",
    "LoraAdapterFile",
    "Refusal",
    "lora_pairs",
    "lora_scaling",
    "peft_adapter_config",
    "read_lora_adapter",
    "read_lora_config",
    "save_peft_adapter",
    "split_lora_key",
]
