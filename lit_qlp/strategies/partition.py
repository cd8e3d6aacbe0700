"""Splitting a sequence of pipeline layers into contiguous stages."""

from __future__ import annotations

import re
from collections.abc import Sequence

PARTITION_METHODS = ("compute", "uniform", "parameters", "type:REGEX")


def check_partition_method(method: str) -> None:
    """Raises ValueError unless ``method`` is "compute", "uniform", "parameters" or "type:REGEX" (a valid regex)."""
    if method in ("compute", "uniform", "parameters"):
        return
    if method.startswith("type:"):
        try:
            re.compile(method[5:], re.IGNORECASE)
        except re.error as err:
            raise ValueError(f"partition_method={method!r}: {method[5:]!r} is not a valid regular expression: {err}")
        if method[5:]:
            return
    raise ValueError(
        f"partition_method={method!r} is not one of 'compute', 'uniform', 'parameters' or 'type:REGEX' "
        "(for example 'type:decoder', matched against the layer class names)"
    )


def partition_balanced(weights: Sequence[float], num_stages: int) -> list[int]:
    """Cuts ``weights`` into ``num_stages`` contiguous parts minimising the heaviest part.

    Among the cuts that reach that minimum, the one with the smallest sum of squared stage weights is chosen, which
    spreads the remaining weight evenly (six equal layers on four stages become 2, 2, 1, 1, not 2, 2, 2, 0).
    Returns the stage boundaries ``parts`` (length ``num_stages + 1``): stage ``s`` holds items
    ``parts[s]:parts[s + 1]``; every stage holds at least one item.

    Raises:
        ValueError: if there are fewer items than stages.
    """
    n = len(weights)
    if n < num_stages:
        raise ValueError(f"cannot split {n} pipeline layers into {num_stages} stages")
    prefix = [0.0]
    for w in weights:
        prefix.append(prefix[-1] + w)

    def best_cuts(limit: float) -> list[int] | None:
        # cost[s][j]: least sum of squares splitting items[:j] into s non-empty stages of weight <= limit.
        inf = float("inf")
        cost = [[inf] * (n + 1) for _ in range(num_stages + 1)]
        back = [[0] * (n + 1) for _ in range(num_stages + 1)]
        cost[0][0] = 0.0
        for s in range(1, num_stages + 1):
            for j in range(s, n - (num_stages - s) + 1):
                for i in range(s - 1, j):
                    w = prefix[j] - prefix[i]
                    if w <= limit and cost[s - 1][i] + w * w < cost[s][j]:
                        cost[s][j] = cost[s - 1][i] + w * w
                        back[s][j] = i
        if cost[num_stages][n] == inf:
            return None
        parts = [n]
        for s in range(num_stages, 0, -1):
            parts.append(back[s][parts[-1]])
        return parts[::-1]

    candidates = sorted({prefix[j] - prefix[i] for i in range(n) for j in range(i + 1, n + 1)})
    lo, hi = 0, len(candidates) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if best_cuts(candidates[mid]) is not None:
            hi = mid
        else:
            lo = mid + 1
    result = best_cuts(candidates[lo])
    assert result is not None
    return result


def partition_uniform(num_items: int, num_stages: int) -> list[int]:
    """Boundaries that give each stage ``num_items // num_stages`` items, the first stages one more if uneven."""
    if num_items < num_stages:
        raise ValueError(f"cannot split {num_items} pipeline layers into {num_stages} stages")
    base, extra = divmod(num_items, num_stages)
    parts = [0]
    for stage in range(num_stages):
        parts.append(parts[-1] + base + (1 if stage < extra else 0))
    return parts


def compute_weights(parameter_counts: Sequence[float], recomputed: bool) -> list[float]:
    """Matmul work per token of each pipeline layer ``[embedding, decoder layers..., head]``, in FLOP.

    A layer's weights cost 2 FLOP per weight and token per pass. The embedding (the first layer) is a lookup:
    no matmul, no cost. A decoder layer makes a forward pass and an input-gradient pass, plus a recomputation
    when activations are checkpointed: ``(6 if recomputed else 4) · parameters``. The head (the last layer,
    applied by the fused loss, never recomputed) makes two: ``4 · parameters``. Weight gradients of trained
    weights (full fine-tuning) are left out; with LoRA they are negligible.
    """
    if len(parameter_counts) < 2:
        return [float(c) for c in parameter_counts]
    decoder = 6.0 if recomputed else 4.0
    return [0.0] + [decoder * c for c in parameter_counts[1:-1]] + [4.0 * parameter_counts[-1]]


def partition_layers(
    method: str,
    num_stages: int,
    parameter_counts: Sequence[float],
    layer_types: Sequence[str],
    recomputed: bool = True,
) -> list[int]:
    """Stage boundaries for ``method``.

    - "compute": balance the matmul work of ``compute_weights`` (the head's matmul and loss count, the
      embedding lookup does not).
    - "uniform": the same number of layers on each stage.
    - "parameters": balance the parameter counts (taken from the config, never by building layers).
    - "type:REGEX": balance the number of layers whose class name matches REGEX (case-insensitive).

    Args:
        method: One of the above.
        num_stages: Number of pipeline stages.
        parameter_counts: Parameters of each pipeline layer, ``[embedding, decoder layers..., head]``.
        layer_types: Class name of each pipeline layer (for "type:REGEX").
        recomputed: Decoder layers are activation-checkpointed (for "compute").
    """
    check_partition_method(method)
    if method == "compute":
        return partition_balanced(compute_weights(parameter_counts, recomputed), num_stages)
    if method == "uniform":
        return partition_uniform(len(parameter_counts), num_stages)
    if method == "parameters":
        return partition_balanced(parameter_counts, num_stages)
    pattern = re.compile(method[5:], re.IGNORECASE)
    weights = [1.0 if pattern.search(t) else 0.0 for t in layer_types]
    if sum(weights) < num_stages:
        raise ValueError(
            f"partition_method={method!r} matches {int(sum(weights))} layers (of types {sorted(set(layer_types))}), "
            f"fewer than the {num_stages} pipeline stages"
        )
    return partition_balanced(weights, num_stages)
