"""Which layers and which modules of a decoder receive adapters."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from torch import nn

ALL_LINEAR = "all-linear"


def parse_layer_ranges(spec: str | None, num_layers: int, key: str = "layers_to_transform") -> list[int]:
    """Parses a layer selection such as ``"0:31"``, ``"0:10,20:25,30"`` or ``"1,3,5"``.

    Ranges ``a:b`` are inclusive at both ends; items are separated by commas; ``None`` or ``""`` selects every
    layer. The result is sorted and free of duplicates.

    Args:
        spec: The selection.
        num_layers: Number of decoder layers of the model; every index must be in ``[0, num_layers)``.
        key: Name of the option, for error messages.

    Raises:
        ValueError: naming the malformed item or the out-of-range index.
    """
    if spec is None or str(spec).strip() == "":
        return list(range(num_layers))
    selected: set[int] = set()
    for item in str(spec).split(","):
        item = item.strip()
        match = re.fullmatch(r"(\d+)(?::(\d+))?", item)
        if not match:
            raise ValueError(
                f"{key}={spec!r}: cannot read {item!r}; use layer indices and inclusive ranges such as '0:10,20:25,30'"
            )
        start = int(match.group(1))
        stop = int(match.group(2)) if match.group(2) is not None else start
        if stop < start:
            raise ValueError(f"{key}={spec!r}: range {item!r} runs backwards; write it as '{stop}:{start}'")
        if stop >= num_layers:
            raise ValueError(
                f"{key}={spec!r}: layer {stop} does not exist; the model has {num_layers} layers (0:{num_layers - 1})"
            )
        selected.update(range(start, stop + 1))
    return sorted(selected)


def linear_names(module: nn.Module) -> list[str]:
    """Qualified names of the ``nn.Linear`` modules inside ``module``, in registration order."""
    return [name for name, sub in module.named_modules() if isinstance(sub, nn.Linear)]


def match_targets(names: Iterable[str], target_modules: str | Sequence[str]) -> list[str]:
    """The qualified module names that ``target_modules`` selects.

    ``"all-linear"`` selects every name given; otherwise an entry selects a name equal to it or ending in
    ``.entry`` (``"q_proj"`` selects ``self_attn.q_proj``, ``"mlp.down_proj"`` selects ``mlp.down_proj``).
    """
    names = list(names)
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    if ALL_LINEAR in target_modules:
        return names
    return [n for n in names if any(n == t or n.endswith("." + t) for t in target_modules)]


def match_expert_targets(names: Iterable[str], target_modules: str | Sequence[str]) -> list[str]:
    """The qualified fused expert tensor names (``mlp.experts.gate_up_proj``) that ``target_modules`` selects.

    ``"all-linear"`` selects every one (the experts are linear maps; under transformers 4.x they were
    ``nn.Linear`` modules that "all-linear" covered). Otherwise only entries that name the tensor together with its
    module select it, by the rule of ``match_targets``: ``"experts.gate_up_proj"`` or ``"mlp.experts.down_proj"``
    do, a bare ``"down_proj"`` does not (it stays a linear-layer name, as in PEFT's ``target_modules``).
    """
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    if ALL_LINEAR in target_modules:
        return list(names)
    return match_targets(names, [t for t in target_modules if "." in t])


def expert_target_name(name: str) -> str:
    """The ``target_modules`` / PEFT ``target_parameters`` name of a fused expert tensor: its module's leaf name and
    its own (``mlp.experts.gate_up_proj`` -> ``experts.gate_up_proj``)."""
    return ".".join(name.split(".")[-2:])


def check_targets(
    names: Sequence[str], target_modules: str | Sequence[str], where: str, expert_names: Sequence[str] = ()
) -> None:
    """Raises ValueError naming each ``target_modules`` entry that selects none of ``names`` (linear layers) nor
    of ``expert_names`` (fused expert tensors, see ``match_expert_targets``)."""
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    unmatched = [
        t for t in target_modules if not match_targets(names, [t]) and not match_expert_targets(expert_names, [t])
    ]
    if unmatched:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
        experts = sorted({expert_target_name(n) for n in expert_names})
        also = f" and its fused expert tensors are {experts}" if experts else ""
        raise ValueError(
            f"model.method.target_modules entries {unmatched} match no linear layer of {where}; "
            f"its linear layers are {leaves}{also} (or use 'all-linear')"
        )
