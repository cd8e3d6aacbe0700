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


def check_targets(names: Sequence[str], target_modules: str | Sequence[str], where: str) -> None:
    """Raises ValueError naming each ``target_modules`` entry that selects none of ``names``."""
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    unmatched = [t for t in target_modules if not match_targets(names, [t])]
    if unmatched:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise ValueError(
            f"model.method.target_modules entries {unmatched} match no linear layer of {where}; "
            f"its linear layers are {leaves} (or use 'all-linear')"
        )
