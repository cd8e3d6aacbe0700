"""Unit tests of lit_qlp's pure functions, each checked against an independent reference (often brute force)."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lit_qlp.adapters.lora import LoraAdapter, LoraLinear
from lit_qlp.adapters.targeting import ALL_LINEAR, check_targets, linear_names, match_targets, parse_layer_ranges
from lit_qlp.kernels import cross_entropy
from lit_qlp.kernels.cross_entropy import IGNORE_INDEX, TokenWeightedLoss
from lit_qlp.strategies.partition import (
    check_partition_method,
    compute_weights,
    partition_balanced,
    partition_layers,
    partition_uniform,
)

# ----------------------------------------------------------------------------------------------------- partition


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


# ----------------------------------------------------------------------------------------------------- layer ranges


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


# ----------------------------------------------------------------------------------------------------- targets


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(4, 4)
        self.xq_proj = nn.Linear(4, 4)
        self.v_proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = Attention()
        self.mlp = nn.Sequential()
        self.mlp.add_module("down_proj", nn.Linear(4, 4))
        self.act = nn.GELU()


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


# ----------------------------------------------------------------------------------------------------- LoRA


def make_lora(in_features=6, out_features=5, rank=3, alpha=6.0, dropout=0.0, dtype=torch.float32, base_dtype=None):
    torch.manual_seed(0)
    base = nn.Linear(in_features, out_features, dtype=base_dtype or torch.float32)
    lora = LoraLinear(base, rank, alpha, dropout=dropout, dtype=dtype)
    with torch.no_grad():  # a non-zero B so that the update shows
        lora.lora_A.weight.copy_(torch.randn(rank, in_features))
        lora.lora_B.weight.copy_(torch.randn(out_features, rank))
    return lora


def test_lora_forward_matches_hand_computation():
    for rank, alpha in [(1, 1.0), (3, 6.0), (4, 2.0)]:
        lora = make_lora(rank=rank, alpha=alpha)
        x = torch.randn(2, 7, 6)
        a, b = lora.lora_A.weight, lora.lora_B.weight
        expected = F.linear(x, lora.base_layer.weight, lora.base_layer.bias) + (x @ a.T @ b.T) * (alpha / rank)
        torch.testing.assert_close(lora(x), expected)


def test_lora_starts_at_base():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    lora = LoraLinear(base, rank=4, alpha=8.0)
    assert torch.count_nonzero(lora.lora_B.weight) == 0
    assert torch.count_nonzero(lora.lora_A.weight) > 0
    assert lora.lora_A.weight.shape == (4, 6) and lora.lora_B.weight.shape == (5, 4)
    x = torch.randn(3, 6)
    torch.testing.assert_close(lora(x), base(x))


def test_lora_init_seeded_by_generator():
    base = nn.Linear(6, 5)
    one = LoraLinear(base, 4, 4.0, generator=torch.Generator().manual_seed(7))
    two = LoraLinear(base, 4, 4.0, generator=torch.Generator().manual_seed(7))
    three = LoraLinear(base, 4, 4.0, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(one.lora_A.weight, two.lora_A.weight)
    assert not torch.equal(one.lora_A.weight, three.lora_A.weight)
    bound = 1 / 6**0.5  # kaiming_uniform_(a=sqrt(5)) on fan_in=6
    assert one.lora_A.weight.abs().max() <= bound


def test_lora_dropout_only_in_training():
    lora = make_lora(dropout=0.5)
    plain = make_lora(dropout=0.0)
    x = torch.randn(4, 6)
    lora.eval()
    torch.testing.assert_close(lora(x), plain(x))
    lora.train()
    torch.manual_seed(1)
    assert not torch.allclose(lora(x), plain(x))


def test_lora_dtypes():
    lora = make_lora(base_dtype=torch.bfloat16, dtype=torch.float32)
    assert lora.lora_A.weight.dtype == torch.float32
    x = torch.randn(3, 6).to(torch.bfloat16)
    out = lora(x)
    assert out.dtype == torch.bfloat16
    base_out = lora.base_layer(x)
    update = (x.float() @ lora.lora_A.weight.T @ lora.lora_B.weight.T) * lora.scaling
    torch.testing.assert_close(out, base_out + update.to(torch.bfloat16))

    lora16 = make_lora(base_dtype=torch.float32, dtype=torch.bfloat16)
    assert lora16.lora_B.weight.dtype == torch.bfloat16
    out = lora16(torch.randn(3, 6))
    assert out.dtype == torch.float32


def test_lora_adapter_wraps_selected_layers_only():
    adapter = LoraAdapter(
        rank=2, alpha=2.0, dropout=0.0, target_modules=["q_proj"], layers=[1], dtype=torch.float32, seed=3
    )
    untouched, touched = Block(), Block()
    adapter(untouched, 0, "model.layers.0")
    adapter(touched, 1, "model.layers.1")
    assert not any(isinstance(m, LoraLinear) for m in untouched.modules())
    wrapped = [n for n, m in touched.named_modules() if isinstance(m, LoraLinear)]
    assert wrapped == ["self_attn.q_proj"]
    again = Block()
    adapter(again, 1, "model.layers.1")
    torch.testing.assert_close(again.self_attn.q_proj.lora_A.weight, touched.self_attn.q_proj.lora_A.weight)


# ----------------------------------------------------------------------------------------------------- loss


def random_logits_labels(shape, vocab, ignore_fraction, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(*shape, vocab, generator=g) * 3
    labels = torch.randint(0, vocab, shape, generator=g)
    labels[torch.rand(shape, generator=g) < ignore_fraction] = IGNORE_INDEX
    return logits, labels


@pytest.mark.parametrize("shape", [(5,), (2, 7), (3, 4, 5)])
@pytest.mark.parametrize("ignore_fraction", [0.0, 0.3, 1.0])
def test_cross_entropy_sum_matches_torch(shape, ignore_fraction):
    logits, labels = random_logits_labels(shape, 11, ignore_fraction, seed=len(shape))
    expected = F.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1), reduction="sum", ignore_index=-100)
    torch.testing.assert_close(cross_entropy(logits, labels), expected)
    by_hand = -torch.log_softmax(logits, -1).reshape(-1, 11)
    keep = labels.reshape(-1) != -100
    hand = by_hand[keep].gather(1, labels.reshape(-1)[keep].unsqueeze(1)).sum()
    torch.testing.assert_close(cross_entropy(logits, labels), hand)


def test_cross_entropy_sum_rows_fully_ignored():
    logits, labels = random_logits_labels((3, 6), 9, 0.2, seed=5)
    labels[1] = IGNORE_INDEX  # a whole row without labels
    expected = F.cross_entropy(logits.reshape(-1, 9), labels.reshape(-1), reduction="sum", ignore_index=-100)
    torch.testing.assert_close(cross_entropy(logits, labels), expected)
    all_ignored = torch.full_like(labels, IGNORE_INDEX)
    assert cross_entropy(logits, all_ignored).item() == 0.0


def test_cross_entropy_sum_low_precision_in_float32():
    logits, labels = random_logits_labels((2, 8), 13, 0.2, seed=9)
    low = logits.to(torch.bfloat16)
    result = cross_entropy(low, labels)
    assert result.dtype == torch.float32
    expected = F.cross_entropy(low.float().reshape(-1, 13), labels.reshape(-1), reduction="sum", ignore_index=-100)
    torch.testing.assert_close(result, expected)


def test_cross_entropy_sum_gradient_matches_torch():
    logits, labels = random_logits_labels((2, 5), 7, 0.3, seed=2)
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    cross_entropy(a, labels).backward()
    F.cross_entropy(b.reshape(-1, 7), labels.reshape(-1), reduction="sum", ignore_index=-100).backward()
    torch.testing.assert_close(a.grad, b.grad)


def test_token_weighted_loss_is_the_fused_head_loss_divided_by_normalizer():
    from lit_qlp.models.pipeline import OutputPipe

    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 6, 8, generator=generator)
    weight = torch.randn(10, 8, generator=generator)
    labels = torch.randint(0, 10, (2, 6), generator=generator)
    labels[0, :3] = -100
    head = OutputPipe.__new__(OutputPipe)
    nn.Module.__init__(head)
    head.lm_head = nn.Linear(8, 10, bias=False)
    head.lm_head.weight.data.copy_(weight)
    head.logit_scale, head.softcap = None, None
    loss_fn = TokenWeightedLoss(chunk_size=5)
    with pytest.raises(RuntimeError, match="no head"):
        loss_fn(hidden, labels)
    loss_fn.bind(head)
    assert loss_fn.normalizer == 1.0
    reference = F.cross_entropy((hidden @ weight.T).reshape(-1, 10), labels.reshape(-1), reduction="sum")
    torch.testing.assert_close(loss_fn(hidden, labels), reference)
    loss_fn.normalize_by(3.5)
    torch.testing.assert_close(loss_fn(hidden, labels), reference / 3.5)
    # With the normalizer at the label-token count it is the usual mean loss.
    loss_fn.normalize_by(float((labels != -100).sum()))
    mean = F.cross_entropy((hidden @ weight.T).reshape(-1, 10), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss_fn(hidden, labels), mean)


def test_composite_decay_is_a_gradient_step_on_half_the_squared_norm_of_ba():
    from lit_qlp.adapters.lora import LoraLinear, composite_decay_

    lora = LoraLinear(nn.Linear(7, 5, bias=False), rank=3, alpha=3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        lora.lora_B.weight.normal_(generator=torch.Generator().manual_seed(1))
    a = lora.lora_A.weight.detach().clone().requires_grad_()
    b = lora.lora_B.weight.detach().clone().requires_grad_()
    (0.5 * (b @ a).square().sum()).backward()
    lr, decay = 0.05, 0.3
    expected_a, expected_b = a - lr * decay * a.grad, b - lr * decay * b.grad
    norm_before = torch.linalg.matrix_norm(lora.lora_B.weight @ lora.lora_A.weight)
    composite_decay_(lora, lr, decay)
    torch.testing.assert_close(lora.lora_A.weight, expected_a.detach())
    torch.testing.assert_close(lora.lora_B.weight, expected_b.detach())
    assert torch.linalg.matrix_norm(lora.lora_B.weight @ lora.lora_A.weight) < norm_before


def test_lora_weight_decay_needs_float32_lora_weights():
    from lit_qlp.methods import LoRA

    with pytest.raises(ValueError, match=r"method.weight_decay needs float32 .*method.weight_dtype='bfloat16'"):
        LoRA(weight_decay=0.1, weight_dtype="bfloat16")


def _offload_layer():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 6), nn.Dropout(0.3), nn.Tanh(), nn.Linear(6, 6))


@pytest.mark.parametrize("input_requires_grad", [True, False])
def test_offloaded_checkpoint_gives_the_gradients_of_the_plain_forward(input_requires_grad):
    """Same outputs and gradients (dropout replayed), also when the input does not require grad (stage 0)."""
    from lit_qlp.strategies.offload import offloaded_checkpoint

    def run(layer, x, positions):
        return layer(x), positions

    grads = []
    for checkpointed in (False, True):
        layer = _offload_layer()
        x = torch.randn(3, 6, generator=torch.Generator().manual_seed(1)).requires_grad_(input_requires_grad)
        positions = torch.arange(3)
        torch.manual_seed(7)
        if checkpointed:
            out, passed = offloaded_checkpoint(lambda *a: run(layer, *a), x, positions)
        else:
            out, passed = run(layer, x, positions)
        assert torch.equal(passed, positions)
        (out * torch.arange(6.0)).sum().backward()
        grads.append([p.grad.clone() for p in layer.parameters()] + ([x.grad.clone()] if input_requires_grad else []))
    for plain, offloaded in zip(*grads):
        torch.testing.assert_close(offloaded, plain)


def test_activation_offload_needs_activation_checkpointing():
    from lit_qlp.strategies import PipelineStrategy

    with pytest.raises(ValueError, match="activation_offload=True .*activation_checkpointing=True"):
        PipelineStrategy(activation_checkpointing=False, activation_offload=True)


def test_update_norm_is_the_frobenius_norm_of_ba():
    from lit_qlp.adapters.lora import LoraLinear, update_norm

    lora = LoraLinear(nn.Linear(9, 7, bias=False), rank=3, alpha=3, generator=torch.Generator().manual_seed(0))
    assert update_norm(lora) == 0.0  # B starts at zero
    with torch.no_grad():
        lora.lora_B.weight.normal_(generator=torch.Generator().manual_seed(1))
    expected = torch.linalg.matrix_norm(lora.lora_B.weight @ lora.lora_A.weight)
    assert update_norm(lora) == pytest.approx(float(expected), rel=1e-5)


def test_lora_computed_in_the_activation_dtype():
    """float32 activations: the same numbers as the float32 path; bf16: close, with float32 weight gradients."""
    from lit_qlp.adapters.lora import LoraLinear

    def pair(compute_in_input_dtype, dtype):
        torch.manual_seed(0)
        base = nn.Linear(16, 8, bias=False).to(dtype)
        lora = LoraLinear(
            base, 4, 8, generator=torch.Generator().manual_seed(1), compute_in_input_dtype=compute_in_input_dtype
        )
        with torch.no_grad():
            lora.lora_B.weight.normal_(generator=torch.Generator().manual_seed(2))
        return lora

    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(3))
    for dtype, tolerance in ((torch.float32, 0.0), (torch.bfloat16, 3e-2)):
        outputs, grads = [], []
        for fast in (False, True):
            lora = pair(fast, dtype)
            out = lora(x.to(dtype))
            out.float().square().sum().backward()
            outputs.append(out.float())
            grads.append(lora.lora_A.weight.grad)
            assert lora.lora_A.weight.dtype == lora.lora_A.weight.grad.dtype == torch.float32
        torch.testing.assert_close(outputs[1], outputs[0], rtol=tolerance, atol=tolerance)
        torch.testing.assert_close(grads[1], grads[0], rtol=max(tolerance, 1.3e-6), atol=max(tolerance, 1e-5) * 10)
