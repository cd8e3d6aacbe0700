"""Pipeline partitioning (lit_qlp/strategies/partition.py) against brute force and hand-made cases."""

from __future__ import annotations

import itertools
import random

import pytest

from lit_qlp.strategies.partition import (
    check_partition_method,
    compute_weights,
    partition_balanced,
    partition_layers,
    partition_uniform,
)


def brute_force_min_max(weights: list[float], num_stages: int) -> float:
    """The smallest possible heaviest stage over every split of ``weights`` into non-empty contiguous stages."""
    n = len(weights)
    best = None
    for cuts in itertools.combinations(range(1, n), num_stages - 1):
        bounds = [0, *cuts, n]
        heaviest = max(sum(weights[a:b]) for a, b in zip(bounds, bounds[1:]))
        best = heaviest if best is None else min(best, heaviest)
    return best


def stage_loads(weights: list[float], parts: list[int]) -> list[float]:
    return [sum(weights[a:b]) for a, b in zip(parts, parts[1:])]


def assert_valid_parts(parts: list[int], n: int, num_stages: int) -> None:
    assert len(parts) == num_stages + 1, parts
    assert parts[0] == 0 and parts[-1] == n, parts
    assert all(a < b for a, b in zip(parts, parts[1:])), f"empty stage in {parts}"


def random_weight_lists(seed: int, count: int) -> list[tuple[list[float], int]]:
    rng = random.Random(seed)
    cases = []
    for _ in range(count):
        n = rng.randint(1, 10)
        kind = rng.choice(["small_int", "float", "zero_one", "params"])
        if kind == "small_int":
            weights = [rng.randint(0, 9) for _ in range(n)]
        elif kind == "float":
            weights = [rng.uniform(0.0, 10.0) for _ in range(n)]
        elif kind == "zero_one":
            weights = [rng.choice([0.0, 1.0]) for _ in range(n)]
        else:  # parameter-count-like: a big embedding/head and similar decoder layers
            weights = [rng.choice([3_000_000, 12_000_000]) + rng.randint(0, 10) for _ in range(n)]
        cases.append((weights, rng.randint(1, n)))
    return cases


@pytest.mark.parametrize("seed", range(4))
def test_partition_balanced_is_optimal(seed):
    for weights, num_stages in random_weight_lists(seed, 150):
        parts = partition_balanced(weights, num_stages)
        assert_valid_parts(parts, len(weights), num_stages)
        assert max(stage_loads(weights, parts)) == brute_force_min_max(weights, num_stages), (weights, num_stages)


def test_partition_balanced_edge_cases():
    assert partition_balanced([5.0], 1) == [0, 1]
    assert partition_balanced([1, 2, 3], 3) == [0, 1, 2, 3]  # one item per stage is the only split
    zeros = [0.0] * 6
    parts = partition_balanced(zeros, 3)
    assert_valid_parts(parts, 6, 3)


@pytest.mark.parametrize("n, num_stages", [(0, 1), (2, 3), (3, 4)])
def test_partition_fewer_items_than_stages(n, num_stages):
    with pytest.raises(ValueError, match=f"{n} pipeline layers into {num_stages} stages"):
        partition_balanced([1.0] * n, num_stages)
    with pytest.raises(ValueError, match=f"{n} pipeline layers into {num_stages} stages"):
        partition_uniform(n, num_stages)


def test_partition_uniform():
    for n in range(1, 20):
        for num_stages in range(1, n + 1):
            parts = partition_uniform(n, num_stages)
            assert_valid_parts(parts, n, num_stages)
            sizes = [b - a for a, b in zip(parts, parts[1:])]
            assert max(sizes) - min(sizes) <= 1, (n, num_stages, sizes)
            assert sum(sizes) == n


LAYER_TYPES = ["EmbeddingPipe"] + ["DecoderLayerPipe"] * 6 + ["OutputPipe"]


@pytest.mark.parametrize("num_stages", [1, 2, 3, 4, 5, 6])
def test_partition_layers_type_balances_matching_layers(num_stages):
    counts = [1000.0, *([10.0] * 6), 1000.0]
    parts = partition_layers("type:decoder", num_stages, counts, LAYER_TYPES)
    assert_valid_parts(parts, len(LAYER_TYPES), num_stages)
    decoders = [sum("Decoder" in t for t in LAYER_TYPES[a:b]) for a, b in zip(parts, parts[1:])]
    is_decoder = [1.0 if "decoder" in t.lower() else 0.0 for t in LAYER_TYPES]
    assert max(decoders) == brute_force_min_max(is_decoder, num_stages) == -(-6 // num_stages), decoders
    assert sum(decoders) == 6


def test_partition_layers_type_regex_is_case_insensitive_and_searches():
    parts = partition_layers("type:DECODER", 2, [1.0] * 8, LAYER_TYPES)
    assert parts == partition_layers("type:decoderlayer", 2, [1.0] * 8, LAYER_TYPES)


def test_partition_layers_type_too_few_matches():
    with pytest.raises(ValueError, match="matches 6 layers"):
        partition_layers("type:decoder", 7, [1.0] * 8, LAYER_TYPES)


def test_partition_layers_dispatch():
    counts = [1000.0, *([10.0] * 6), 1000.0]
    assert partition_layers("uniform", 3, counts, LAYER_TYPES) == partition_uniform(8, 3)
    assert partition_layers("parameters", 3, counts, LAYER_TYPES) == partition_balanced(counts, 3)


def test_compute_weights_count_matmul_flop_per_token():
    # Llama-3-8B: embedding and head 128256 x 4096, decoder layers 218.1 M weights (4 attention + 3 MLP matrices).
    hidden, vocab, layer = 4096, 128256, 4096 * (4096 * 2 + 1024 * 2) + 3 * 4096 * 14336
    counts = [vocab * hidden, *([layer] * 32), vocab * hidden]
    weights = compute_weights(counts, recomputed=True)
    assert weights[0] == 0  # a lookup: no matmul
    assert weights[1:-1] == [3 * 2 * layer] * 32  # forward, recomputation, input gradient: 2 FLOP per weight each
    assert weights[-1] == 2 * 2 * vocab * hidden  # head: forward and input gradient, never recomputed
    assert compute_weights(counts, recomputed=False)[1] == 2 * 2 * layer
    # Two stages: the embedding's weights cost no time, the head's do, so stage 0 takes one layer more.
    assert partition_layers("parameters", 2, counts, ["x"] * 34) == [0, 17, 34]  # 16 + 16 decoder layers
    parts = partition_layers("compute", 2, counts, ["x"] * 34)
    assert parts == [0, 18, 34]  # 17 decoder layers | 15 + the head
    loads = stage_loads(weights, parts)
    assert max(loads) == brute_force_min_max(weights, 2)
    assert max(loads) < max(stage_loads(weights, [0, 17, 34]))


@pytest.mark.parametrize(
    "method", ["compute", "uniform", "parameters", "type:decoder", "type:Decoder|Embed", "type:^Output"]
)
def test_check_partition_method_accepts(method):
    check_partition_method(method)


@pytest.mark.parametrize("method", ["foo", "type:", "type:[", "", "Uniform", "params"])
def test_check_partition_method_rejects(method):
    with pytest.raises(ValueError) as info:
        check_partition_method(method)
    assert f"partition_method={method!r}" in str(info.value)
