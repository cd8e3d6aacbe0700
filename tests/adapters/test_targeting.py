"""Layer ranges and target matching (lit_qlp/adapters/targeting.py) against independent references."""

from __future__ import annotations

import random

import pytest

from lit_qlp.adapters.targeting import ALL_LINEAR, check_targets, linear_names, match_targets, parse_layer_ranges
from tests.adapters.helpers import Block


@pytest.mark.parametrize(
    "spec, num_layers, expected",
    [
        ("0:3", 4, [0, 1, 2, 3]),
        ("0:1,3,5:6", 8, [0, 1, 3, 5, 6]),
        ("1,3,5", 6, [1, 3, 5]),
        ("5,1,3", 6, [1, 3, 5]),
        ("0:2,1:3", 4, [0, 1, 2, 3]),
        (" 2 , 0 ", 4, [0, 2]),
        ("2:2", 4, [2]),
        (None, 4, [0, 1, 2, 3]),
        ("", 3, [0, 1, 2]),
        ("  ", 3, [0, 1, 2]),
    ],
)
def test_parse_layer_ranges(spec, num_layers, expected):
    assert parse_layer_ranges(spec, num_layers) == expected


def reference_layer_ranges(spec: str) -> list[int]:
    """Independent reading of an inclusive range list."""
    out = set()
    for item in spec.split(","):
        a, _, b = item.partition(":")
        out |= set(range(int(a), int(b or a) + 1))
    return sorted(out)


def test_parse_layer_ranges_random_against_reference():
    rng = random.Random(0)
    for _ in range(200):
        num_layers = rng.randint(1, 40)
        items = []
        for _ in range(rng.randint(1, 5)):
            a = rng.randrange(num_layers)
            b = rng.randrange(a, num_layers)
            items.append(f"{a}:{b}" if rng.random() < 0.5 else str(a))
        spec = ",".join(items)
        assert parse_layer_ranges(spec, num_layers) == reference_layer_ranges(spec), spec


@pytest.mark.parametrize(
    "spec, fragments",
    [
        ("a", ["layers_to_transform='a'", "'a'"]),
        ("0:1,x", ["layers_to_transform='0:1,x'", "'x'"]),
        ("1,,2", ["layers_to_transform='1,,2'", "''"]),
        ("-1", ["'-1'"]),
        ("3:1", ["layers_to_transform='3:1'", "'3:1'", "backwards"]),
        ("0:99", ["layers_to_transform='0:99'", "99", "4 layers"]),
        ("4", ["layer 4 does not exist", "4 layers"]),
    ],
)
def test_parse_layer_ranges_errors(spec, fragments):
    with pytest.raises(ValueError) as info:
        parse_layer_ranges(spec, 4)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


def test_parse_layer_ranges_error_uses_given_key():
    with pytest.raises(ValueError, match=r"model\.layers_to_transform='9'"):
        parse_layer_ranges("9", 4, key="model.layers_to_transform")


BLOCK_LINEARS = ["self_attn.q_proj", "self_attn.xq_proj", "self_attn.v_proj", "mlp.down_proj"]


def test_linear_names():
    assert linear_names(Block()) == BLOCK_LINEARS


@pytest.mark.parametrize(
    "targets, expected",
    [
        (ALL_LINEAR, BLOCK_LINEARS),
        ("q_proj", ["self_attn.q_proj"]),
        (["q_proj"], ["self_attn.q_proj"]),
        (["xq_proj"], ["self_attn.xq_proj"]),
        (["v_proj", "q_proj"], ["self_attn.q_proj", "self_attn.v_proj"]),
        (["mlp.down_proj"], ["mlp.down_proj"]),
        (["self_attn.q_proj"], ["self_attn.q_proj"]),
        (["proj"], []),
        (["attn.q_proj"], []),
        ([], []),
    ],
)
def test_match_targets(targets, expected):
    assert match_targets(BLOCK_LINEARS, targets) == expected


def test_match_targets_random_against_reference():
    rng = random.Random(0)
    leaves = ["q_proj", "k_proj", "xq_proj", "down_proj", "up_proj", "fc"]
    parents = ["self_attn", "mlp", "block.mlp", "x"]
    for _ in range(200):
        names = sorted({f"{rng.choice(parents)}.{rng.choice(leaves)}" for _ in range(rng.randint(1, 8))})
        targets = rng.sample(leaves + ["mlp.up_proj", "attn.q_proj"], rng.randint(1, 3))
        expected = [n for n in names if any(n.split(".")[-len(t.split(".")) :] == t.split(".") for t in targets)]
        assert match_targets(names, targets) == expected, (names, targets)


def test_check_targets_accepts():
    check_targets(BLOCK_LINEARS, ALL_LINEAR, "block")
    check_targets(BLOCK_LINEARS, ["q_proj", "down_proj"], "block")
    check_targets(BLOCK_LINEARS, "v_proj", "block")


def test_check_targets_lists_every_unmatched_entry():
    with pytest.raises(ValueError) as info:
        check_targets(BLOCK_LINEARS, ["q_proj", "gate_proj", "proj", "o_proj"], "the test block")
    message = str(info.value)
    assert "['gate_proj', 'proj', 'o_proj']" in message
    assert "the test block" in message
    for leaf in ["q_proj", "xq_proj", "v_proj", "down_proj"]:
        assert repr(leaf) in message  # the available layers are listed


def test_check_targets_single_string_unmatched():
    with pytest.raises(ValueError, match="gate_proj"):
        check_targets(BLOCK_LINEARS, "gate_proj", "block")
