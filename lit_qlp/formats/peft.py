"""The PEFT LoRA adapter format: ``adapter_config.json`` beside ``adapter_model.safetensors``.

Written by the epoch export and the Control Adapter conversion (``peft_adapter_config`` + ``save_peft_adapter``);
read by the LoRA merge and the GGUF export through the one reader ``read_lora_adapter``.

The reader takes what both consumers reproduce exactly: plain LoRA pairs on linear layers, each adding
``scale · B A`` to its weight with ``scale = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``), and
LoRA on fused MoE expert tensors (``target_parameters``), adding ``scale · B_e A_e`` to each expert's matrix. It
refuses, with a ValueError naming the file and the key, every PEFT setting or tensor that changes that sum: another
``peft_type``, the LoRA variants (DoRA, aLoRA, QA-LoRA, ...), per-module ranks or alphas (except on fused expert
tensors: ``rank_pattern`` / ``alpha_pattern`` keys naming ``experts.gate_up_proj`` and such), ``modules_to_save``,
biases, transposed (``fan_in_fan_out``) base weights, embedding LoRA and incomplete or mis-shaped pairs.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
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
    "rank_pattern": Refusal(
        "gives modules other than fused expert tensors their own rank", f"retrain with one r, or {MERGE_ADVICE}"
    ),
    "alpha_pattern": Refusal(
        "gives modules other than fused expert tensors their own lora_alpha",
        f"retrain with one lora_alpha, or {MERGE_ADVICE}",
    ),
    "modules_to_save": Refusal(
        "saves full copies of modules beside the LoRA pairs", f"retrain without modules_to_save, or {MERGE_ADVICE}"
    ),
    "fan_in_fan_out": Refusal("stores the base weights transposed (Conv1D layers such as GPT-2's)", MERGE_ADVICE),
    "bias": Refusal("trains the biases of the base layers", f"retrain with bias: none, or {MERGE_ADVICE}", "none"),
    "lora_bias": Refusal("adds a trained bias to lora_B", f"retrain without lora_bias, or {MERGE_ADVICE}"),
    "trainable_token_indices": Refusal("trains rows of the token embeddings", f"retrain without it, or {MERGE_ADVICE}"),
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


# The fused expert tensors of transformers 5.x's experts modules, in the order every one of them registers them.
# PEFT nests one ParamWrapper per targeted tensor of a module in registration order, so the last targeted tensor
# saves as ``<module>.lora_A.weight``, the one before it as ``<module>.base_layer.lora_A.weight``, and so on.
FUSED_EXPERT_ORDER = ("gate_up_proj", "down_proj")
BASE_LAYER = "base_layer."
# The per-tensor settings this reader takes when every key names a fused expert tensor (``experts.gate_up_proj``).
EXPERT_PATTERNS = ("rank_pattern", "alpha_pattern")


def pattern_key(patterns: Sequence[str], name: str) -> str | None:
    """The first of ``patterns`` that selects ``name``, as PEFT matches ``rank_pattern`` and ``alpha_pattern`` keys
    (``peft.utils.other.get_pattern_key``: the key as a regex, matching ``name`` or a dotted suffix of it)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def names_expert_tensor(key: str) -> bool:
    """Whether a ``rank_pattern`` key names a fused expert tensor (``experts.down_proj``, ``model.layers.2.mlp.
    experts.down_proj``): a module and one of ``FUSED_EXPERT_ORDER``."""
    module, _, tensor = key.rpartition(".")
    return bool(module) and tensor in FUSED_EXPERT_ORDER


def expert_factors(a: torch.Tensor, b: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-expert factors of PEFT's LoRA on a fused expert tensor (``ParamWrapper.get_delta_factors``).

    PEFT stores ``lora_A`` [r·E, in] with each expert's rows together and ``lora_B`` [out, r·E] with the experts
    interleaved (column ``k·E + e`` is rank ``k`` of expert ``e``), so expert ``e``'s update is
    ``A_e = A.view(E, r, in)[e]``, ``B_e = B.view(out, r, E)[:, :, e]``.

    Args:
        a: ``lora_A`` [r·E, in].
        b: ``lora_B`` [out, r·E].
        num_experts: E.

    Returns:
        ``A_e`` [E, r, in] and ``B_e`` [E, out, r] (views).
    """
    return a.reshape(num_experts, -1, a.shape[-1]), b.reshape(b.shape[0], -1, num_experts).permute(2, 0, 1)


def expert_delta(a: torch.Tensor, b: torch.Tensor, num_experts: int, transposed: bool) -> torch.Tensor:
    """``B_e A_e`` of every expert, [E, out, in], or [E, in, out] for a ``transposed`` (gpt-oss) tensor; unscaled.

    Args:
        a: ``lora_A`` [r·E, in].
        b: ``lora_B`` [out, r·E].
        num_experts: E.
        transposed: Whether the adapted tensor is stored [E, in, out].
    """
    a_e, b_e = expert_factors(a, b, num_experts)
    delta = torch.bmm(b_e, a_e)
    return delta.transpose(1, 2) if transposed else delta


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
    target_parameters: Sequence[str] = (),
    expert_rank: int | None = None,
    expert_alpha: float | None = None,
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
        target_parameters: Fused expert tensors with LoRA (``experts.gate_up_proj``, or qualified names such as
            ``model.layers.1.mlp.experts.gate_up_proj``: PEFT does not apply ``layers_to_transform`` to them);
            written only when there are some.
        expert_rank: The rank of the ``target_parameters`` pairs, when it is not ``rank``: written as
            ``rank_pattern`` keyed by the ``target_parameters`` entries (PEFT matches those keys against the
            ``<module>.<tensor>`` name of each wrapped tensor, as it does module names).
        expert_alpha: Their ``lora_alpha``, when it is not ``alpha``: written as ``alpha_pattern`` the same way.
    """
    config = {
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
    if target_parameters:
        config["target_parameters"] = list(target_parameters)
        if expert_rank is not None and expert_rank != rank:
            config["rank_pattern"] = dict.fromkeys(target_parameters, expert_rank)
        if expert_alpha is not None and expert_alpha != alpha:
            config["alpha_pattern"] = dict.fromkeys(target_parameters, expert_alpha)
    return config


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
        expert_pairs: Per fused expert tensor, by its name in the Hugging Face model
            (``model.layers.0.mlp.experts.gate_up_proj``), PEFT's ``(lora_A, lora_B)``: [r·E, in] and [out, r·E]
            (``expert_factors`` splits them by expert; ``expert_delta`` forms the update).
        expert_scales: Per fused expert tensor, the factor of its update.
        expert_ranks: Per fused expert tensor, the rank r of each expert's pair (``r``, or its ``rank_pattern``
            entry).
    """

    directory: Path
    config: dict
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]
    scales: dict[str, float]
    expert_pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    expert_scales: dict[str, float] = field(default_factory=dict)
    expert_ranks: dict[str, int] = field(default_factory=dict)


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
        if key in EXPERT_PATTERNS and isinstance(value, dict) and all(names_expert_tensor(k) for k in value):
            check_expert_pattern(path, key, value)
            continue
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


def check_expert_pattern(path: Path, key: str, pattern: dict) -> None:
    """Raises ValueError unless every value of an expert ``rank_pattern`` is a positive integer (of an
    ``alpha_pattern``, a number)."""
    wanted = "a positive integer" if key == "rank_pattern" else "a number"
    for name, value in pattern.items():
        if isinstance(value, bool) or not isinstance(value, int if key == "rank_pattern" else (int, float)):
            raise ValueError(f"{path}: {key}[{name!r}]={value!r} is not {wanted}")
        if key == "rank_pattern" and value < 1:
            raise ValueError(f"{path}: {key}[{name!r}]={value!r} is not {wanted}")


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
    return pairs


def split_expert_pairs(
    tensors: dict[str, torch.Tensor], target_parameters: Sequence[str], weights_path: Path
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Separates the fused-expert LoRA tensors of a ``target_parameters`` adapter from the linear ones.

    A module holds expert pairs when a ``target_parameters`` entry ``<module suffix>.<tensor>`` names it. Its keys
    are PEFT's nested ones (``<module>.lora_A.weight``, ``<module>.base_layer.lora_A.weight``, ...); the nesting
    depth says which tensor a pair adapts, given the targeted tensors in ``FUSED_EXPERT_ORDER``.

    Args:
        tensors: The contents of ``adapter_model.safetensors``.
        target_parameters: The config's entry.
        weights_path: The file, named in the messages.

    Returns:
        The remaining (linear) tensors, and the expert pairs by HF tensor name (``...experts.gate_up_proj``).

    Raises:
        ValueError: An entry names a tensor outside ``FUSED_EXPERT_ORDER``, or a module's nesting does not fit.
    """
    targets = [t.rpartition(".") for t in target_parameters]
    for module, _, tensor in targets:
        if not module:
            raise ValueError(
                f"{weights_path}: target_parameters entry {tensor!r} names no module; this reader takes entries "
                f"such as experts.{tensor}, which tell expert pairs from linear ones; {MERGE_ADVICE}"
            )
        if tensor not in FUSED_EXPERT_ORDER:
            raise ValueError(
                f"{weights_path}: target_parameters entry {module}.{tensor} is not a fused expert tensor "
                f"({', '.join(FUSED_EXPERT_ORDER)}), whose PEFT key nesting this reader knows; {MERGE_ADVICE}"
            )
    linear: dict[str, torch.Tensor] = {}
    nested: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for key, tensor in tensors.items():
        found = split_lora_key(key)
        if found is None:
            linear[key] = tensor
            continue
        module, part = found
        depth = 0
        while module.endswith("." + BASE_LAYER[:-1]):
            module, depth = module[: -len(BASE_LAYER)], depth + 1
        if not any(module == m or module.endswith("." + m) for m, _, _ in targets):
            linear[key] = tensor
            continue
        nested.setdefault(module, {}).setdefault(depth, {})[part] = tensor
    experts: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module, depths in nested.items():
        named = {t for m, _, t in targets if module == m or module.endswith("." + m)}
        candidates = [t for t in FUSED_EXPERT_ORDER if t in named]
        if sorted(depths) != list(range(len(candidates))):
            raise ValueError(
                f"{weights_path}: {module} has LoRA pairs at nesting depths {sorted(depths)}, but target_parameters "
                f"names {len(candidates)} of its tensors ({', '.join(candidates)}), one depth each; the config does "
                "not belong to these weights"
            )
        for depth, parts in depths.items():
            tensor_name = candidates[len(candidates) - 1 - depth]
            missing = sorted(set(LORA_PARTS) - set(parts))
            if missing:
                raise ValueError(f"{weights_path}: {module}.{tensor_name} has no {missing[0]}.weight; it is incomplete")
            experts[f"{module}.{tensor_name}"] = (parts["lora_A"], parts["lora_B"])
    return linear, experts


def check_expert_pairs(
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], ranks: dict[str, int], weights_path: Path
) -> None:
    """Raises ValueError unless every expert pair is ``lora_A`` [r·E, in] and ``lora_B`` [out, r·E] with its
    rank (the config's ``r`` or ``rank_pattern`` entry)."""
    for name, (a, b) in pairs.items():
        rank = ranks[name]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or a.shape[0] % rank:
            raise ValueError(
                f"{weights_path}: {name} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; a fused expert "
                f"pair is lora_A [r·E, in] and lora_B [out, r·E] with r={rank}"
            )


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
    tensors = load_file(weights_path)
    tensors, experts = split_expert_pairs(tensors, config.get("target_parameters") or [], weights_path)
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    ranks, alphas = {}, {}
    for name in experts:
        r_key, alpha_key = pattern_key(rank_pattern, name), pattern_key(alpha_pattern, name)
        ranks[name] = config["r"] if r_key is None else rank_pattern[r_key]
        alphas[name] = config["lora_alpha"] if alpha_key is None else alpha_pattern[alpha_key]
    check_expert_pairs(experts, ranks, weights_path)
    pairs = lora_pairs(tensors, config["r"], weights_path)
    for module in pairs:
        for key, pattern in zip(EXPERT_PATTERNS, (rank_pattern, alpha_pattern)):
            if pattern_key(pattern, module) is not None:
                raise ValueError(
                    f"{weights_path.parent / ADAPTER_CONFIG}: {key} key {pattern_key(pattern, module)!r} also selects "
                    f"the linear layer {module}; {REFUSED_SETTINGS[key].advice}"
                )
    if not pairs and not experts:
        raise ValueError(f"{weights_path} holds no LoRA pairs (no *.lora_A.weight keys)")
    rslora = bool(config.get("use_rslora"))
    scale = lora_scaling(config["lora_alpha"], config["r"], rslora)
    expert_scales = {name: lora_scaling(alphas[name], ranks[name], rslora) for name in experts}
    return LoraAdapterFile(directory, config, pairs, dict.fromkeys(pairs, scale), experts, expert_scales, ranks)


__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "FUSED_EXPERT_ORDER",
    "LORA_PEFT_TYPE",
    "PEFT_PREFIX",
    "REFUSED_SETTINGS",
    "LoraAdapterFile",
    "Refusal",
    "expert_delta",
    "expert_factors",
    "lora_pairs",
    "lora_scaling",
    "peft_adapter_config",
    "read_lora_adapter",
    "read_lora_config",
    "save_peft_adapter",
    "split_lora_key",
]
