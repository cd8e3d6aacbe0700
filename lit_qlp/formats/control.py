"""lit-qlp's Control Adapter format: PEFT's two files with ``peft_type: CONTROL_ADAPTER`` (PEFT has no such type).

``adapter_model.safetensors`` holds ``base_model.model.model.layers.{i}.control_Q`` [H, r] and ``control_S`` [r]
for each decoder layer ``i`` that has an adapter; it is written by ``save_peft_adapter``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from lit_qlp.formats.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS

CONTROL_PEFT_TYPE = "CONTROL_ADAPTER"
CONTROL_Q_KEY = re.compile(r"(?:^|\.)layers\.(?P<layer>\d+)\.control_Q$")


def control_adapter_config(base_model: str, rank: int, dropout: float, layers: list[int], gamma: float) -> dict:
    """``adapter_config.json`` of a Control Adapter.

    Args:
        base_model: ``base_model_name_or_path``: the model the adapter was trained on.
        rank: ``r``, the columns of each ``Q``.
        dropout: ``control_dropout``.
        layers: ``layers_to_transform``: the decoder layers that hold adapters.
        gamma: ``control_adapter_gamma``, the step of the orthogonality regulariser.
    """
    return {
        "peft_type": CONTROL_PEFT_TYPE,
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "control_dropout": dropout,
        "control_adapter_gamma": gamma,
        "layers_to_transform": list(layers),
        "inference_mode": True,
    }


def load_control_adapter(directory: Path) -> tuple[dict, dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    """Reads an exported Control Adapter: its config and ``{layer: (Q, S)}`` in layer order.

    Raises:
        FileNotFoundError: A file is missing.
        ValueError: The config is not a Control Adapter's, or a layer has ``control_Q`` without ``control_S``.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    config_path, weights_path = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{directory} has no {path.name}; point it at a Control Adapter export")
    config = json.loads(config_path.read_text())
    if config.get("peft_type") != CONTROL_PEFT_TYPE:
        raise ValueError(f"{config_path} is not a Control Adapter (peft_type {config.get('peft_type')!r})")
    tensors = load_file(weights_path)
    layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for key, q in tensors.items():
        match = CONTROL_Q_KEY.search(key)
        if match is None:
            continue
        s_key = key[: -len("control_Q")] + "control_S"
        if s_key not in tensors:
            raise ValueError(f"{weights_path}: {key} has no {s_key}; the adapter is incomplete")
        layers[int(match["layer"])] = (q, tensors[s_key])
    return config, dict(sorted(layers.items()))


__all__ = ["CONTROL_PEFT_TYPE", "control_adapter_config", "load_control_adapter"]
