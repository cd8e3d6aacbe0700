"""The llama.cpp LoRA adapter export (lit_qlp/export/gguf.py), read back with the gguf package's GGUFReader."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lit_qlp.export.gguf import lora_to_gguf

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "base_model.model."
T = gguf.GGMLQuantizationType


def write_base(directory: Path, model_type: str, **overrides) -> Path:
    """A stand-in base model directory: only the config.json the exporter reads."""
    directory.mkdir(parents=True)
    config = {"model_type": model_type, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
    (directory / "config.json").write_text(json.dumps({**config, **overrides}))
    return directory


def write_adapter(
    directory: Path, base: Path | str, modules: dict[str, tuple[int, int]], rank: int = 8, alpha: float = 16, **extra
) -> dict[str, torch.Tensor]:
    """A PEFT adapter with random pairs: ``modules`` maps module names to (in, out). Returns its tensors."""
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for module, (fan_in, fan_out) in modules.items():
        tensors[f"{PREFIX}{module}.lora_A.weight"] = torch.randn(rank, fan_in, generator=generator)
        tensors[f"{PREFIX}{module}.lora_B.weight"] = torch.randn(fan_out, rank, generator=generator)
    directory.mkdir(parents=True)
    save_file(tensors, directory / "adapter_model.safetensors")
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in modules}),
        "base_model_name_or_path": str(base),
        **extra,
    }
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return tensors


def read(path: Path) -> tuple[gguf.GGUFReader, dict[str, gguf.ReaderTensor]]:
    reader = gguf.GGUFReader(path)
    return reader, {t.name: t for t in reader.tensors}


def field(reader: gguf.GGUFReader, key: str):
    return reader.get_field(key).contents()


def values(tensor: gguf.ReaderTensor) -> np.ndarray:
    """A GGUF tensor dequantised to float32 in numpy order (the reverse of its ggml shape)."""
    return gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(tuple(reversed(tensor.shape.tolist())))


def pair(tensors: dict[str, torch.Tensor], module: str) -> tuple[np.ndarray, np.ndarray]:
    return tensors[f"{PREFIX}{module}.lora_A.weight"].numpy(), tensors[f"{PREFIX}{module}.lora_B.weight"].numpy()


def check_metadata(reader: gguf.GGUFReader, arch: str, alpha: float) -> None:
    assert field(reader, "general.type") == "adapter"
    assert field(reader, "adapter.type") == "lora"
    assert field(reader, "general.architecture") == arch
    assert field(reader, "adapter.lora.alpha") == pytest.approx(alpha)
    assert reader.get_field("adapter.lora.alpha").types == [gguf.GGUFValueType.FLOAT32]


def rope(x: np.ndarray, position: int, interleaved: bool) -> np.ndarray:
    """Rotary embedding of head vectors [..., d]: rotate-half pairs (i, i + d/2) as in Hugging Face, or
    consecutive pairs (2i, 2i + 1) as llama.cpp's llama architecture (ggml rope mode 0)."""
    d = x.shape[-1]
    angle = position * 10000.0 ** (-np.arange(0, d, 2) / d)
    cos, sin = np.cos(angle), np.sin(angle)
    first, second = (x[..., 0::2], x[..., 1::2]) if interleaved else (x[..., : d // 2], x[..., d // 2 :])
    rotated = (first * cos - second * sin, first * sin + second * cos)
    if interleaved:
        return np.stack(rotated, axis=-1).reshape(x.shape)
    return np.concatenate(rotated, axis=-1)


def attention_scores(dq: np.ndarray, dk: np.ndarray, n_head: int, n_kv: int, interleaved: bool) -> np.ndarray:
    """Per-head q·k of two positions, with q = dq x and k = dk x for a fixed random x, after the rope."""
    x = np.random.default_rng(0).standard_normal(dq.shape[1])
    q = rope((dq @ x).reshape(n_head, -1), 5, interleaved)
    k = rope((dk @ x).reshape(n_kv, -1), 2, interleaved)
    return np.einsum("hd,hd->h", q, k[np.arange(n_head) // (n_head // n_kv)])


def test_llama_peft_adapter_f32(tmp_path, tiny_model):
    """A PEFT adapter of the tiny Llama: names, shapes, exact values, q/k rows in llama.cpp's rope order."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    model_dir = tiny_model("llama")
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False)
    peft.get_peft_model(base, config).save_pretrained(tmp_path / "adapter")
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")

    summary = lora_to_gguf(tmp_path / "adapter", tmp_path / "adapter.gguf")  # architecture from the base config
    assert summary["architecture"] == "llama" and summary["tensors"] == 4 * 7 * 2 and summary["alpha"] == 16.0
    reader, written = read(tmp_path / "adapter.gguf")
    check_metadata(reader, "llama", 16.0)
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output"}
    names |= {"gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    expected = {f"blk.{i}.{n}.weight.lora_{ab}" for i in range(4) for n in names.values() for ab in "ab"}
    assert set(written) == expected
    for layer in range(4):
        for hf, cpp in names.items():
            block = "self_attn" if hf in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            a, b = pair(tensors, f"model.layers.{layer}.{block}.{hf}")
            lora_a, lora_b = written[f"blk.{layer}.{cpp}.weight.lora_a"], written[f"blk.{layer}.{cpp}.weight.lora_b"]
            assert lora_a.tensor_type == T.F32 and lora_b.tensor_type == T.F32
            # ggml order: lora_a ne = {in, r}, lora_b ne = {r, out} (what llama-adapter.cpp checks).
            assert lora_a.shape.tolist() == [a.shape[1], 8] and lora_b.shape.tolist() == [8, b.shape[0]]
            np.testing.assert_array_equal(values(lora_a), a)
            if hf in ("q_proj", "k_proj"):
                heads = 4 if hf == "q_proj" else 2
                d = b.shape[0] // heads  # new row h·d + 2i + c is old row h·d + c·d/2 + i
                order = [h * d + c * d // 2 + i for h in range(heads) for i in range(d // 2) for c in (0, 1)]
                np.testing.assert_array_equal(values(lora_b), b[order])
            else:
                np.testing.assert_array_equal(values(lora_b), b)
    # The reordered q/k deltas under llama.cpp's interleaved rope give Hugging Face's attention scores.
    a_q, b_q = pair(tensors, "model.layers.1.self_attn.q_proj")
    a_k, b_k = pair(tensors, "model.layers.1.self_attn.k_proj")
    hf_scores = attention_scores(b_q @ a_q, b_k @ a_k, 4, 2, interleaved=False)
    dq = values(written["blk.1.attn_q.weight.lora_b"]) @ values(written["blk.1.attn_q.weight.lora_a"])
    dk = values(written["blk.1.attn_k.weight.lora_b"]) @ values(written["blk.1.attn_k.weight.lora_a"])
    np.testing.assert_allclose(attention_scores(dq, dk, 4, 2, interleaved=True), hf_scores, rtol=1e-4)
    assert not np.allclose(attention_scores(b_q @ a_q, b_k @ a_k, 4, 2, interleaved=True), hf_scores, rtol=1e-2)


QWEN2 = {
    "model.layers.0.self_attn.q_proj": (32, 32),
    "model.layers.0.self_attn.k_proj": (32, 16),
    "model.layers.1.mlp.down_proj": (48, 32),
}


@pytest.mark.parametrize("outtype", ["F32", "F16", "BF16", "Q8_0"])
def test_qwen2_outtypes(tmp_path, capsys, outtype):
    base = write_base(tmp_path / "base", "qwen2")
    tensors = write_adapter(tmp_path / "adapter", base, QWEN2, rank=8, alpha=32)
    summary = lora_to_gguf(tmp_path / "adapter", tmp_path / "out.gguf", outtype=outtype)
    reader, written = read(tmp_path / "out.gguf")
    check_metadata(reader, "qwen2", 32.0)
    assert sorted(written) == [
        "blk.0.attn_k.weight.lora_a",
        "blk.0.attn_k.weight.lora_b",
        "blk.0.attn_q.weight.lora_a",
        "blk.0.attn_q.weight.lora_b",
        "blk.1.ffn_down.weight.lora_a",
        "blk.1.ffn_down.weight.lora_b",
    ]
    # Q8_0 needs rows of whole 32-value blocks: lora_b rows have r = 8 values and ffn_down's lora_a 48, so F16.
    f16 = {"blk.1.ffn_down.weight.lora_a"} | {n for n in written if n.endswith("lora_b")}
    assert set(summary["f16_fallback"]) == (f16 if outtype == "Q8_0" else set())
    assert ("note: 4 tensors whose rows" in capsys.readouterr().out) == (outtype == "Q8_0")
    for module, cpp in [("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("mlp.down_proj", "ffn_down")]:
        layer = 1 if cpp == "ffn_down" else 0
        for expected, suffix in zip(pair(tensors, f"model.layers.{layer}.{module}"), ("a", "b")):
            tensor = written[f"blk.{layer}.{cpp}.weight.lora_{suffix}"]
            want = T.F16 if outtype == "Q8_0" and tensor.name in f16 else T[outtype]
            assert tensor.tensor_type == want, tensor.name
            assert tensor.shape.tolist() == list(reversed(expected.shape))
            got = values(tensor)
            if outtype == "F32":  # no q/k reordering for qwen2 (rotate-half rope in llama.cpp too)
                np.testing.assert_array_equal(got, expected)
            elif want == T.F16:
                np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4)
            elif want == T.BF16:
                np.testing.assert_allclose(got, expected, rtol=1e-2, atol=1e-3)
            else:  # Q8_0: one scale per 32 values, errors below half a step of amax / 127
                np.testing.assert_allclose(got, expected, atol=np.abs(expected).max() / 127)
                assert not np.array_equal(got, expected)


MOE = {
    "mixtral": ("block_sparse_moe.experts", ("w1", "w3", "w2"), {"num_local_experts": 4}, "llama", "self_attn.v_proj"),
    "qwen2_moe": (
        "mlp.experts",
        ("gate_proj", "up_proj", "down_proj"),
        {"num_experts": 4},
        "qwen2moe",
        "mlp.shared_expert.up_proj",
    ),
}


def moe_modules(model_type: str, experts: int = 4) -> dict[str, tuple[int, int]]:
    block, (gate, up, down), _, _, other = MOE[model_type]
    modules = {f"model.layers.1.{other}": (32, 16 if other.endswith("v_proj") else 24)}
    for j in range(experts):
        for name, shape in ((gate, (32, 24)), (up, (32, 24)), (down, (24, 32))):
            modules[f"model.layers.1.{block}.{j}.{name}"] = shape
    return modules


@pytest.mark.parametrize("model_type", sorted(MOE))
def test_moe_experts_are_stacked(tmp_path, model_type):
    block, projections, config, arch, other = MOE[model_type]
    base = write_base(tmp_path / "base", model_type, **config)
    tensors = write_adapter(tmp_path / "adapter", base, moe_modules(model_type), rank=4, alpha=8)
    summary = lora_to_gguf(tmp_path / "adapter", tmp_path / "moe.gguf")
    reader, written = read(tmp_path / "moe.gguf")
    check_metadata(reader, arch, 8.0)
    assert summary["pairs"] == 4
    other_name = "attn_v" if other.endswith("v_proj") else "ffn_up_shexp"
    assert set(written) == {
        f"blk.1.{n}.weight.lora_{ab}"
        for n in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps", other_name)
        for ab in "ab"
    }
    np.testing.assert_array_equal(
        values(written[f"blk.1.{other_name}.weight.lora_b"]), pair(tensors, f"model.layers.1.{other}")[1]
    )
    for projection, cpp in zip(projections, ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")):
        pairs = [pair(tensors, f"model.layers.1.{block}.{j}.{projection}") for j in range(4)]
        lora_a, lora_b = written[f"blk.1.{cpp}.weight.lora_a"], written[f"blk.1.{cpp}.weight.lora_b"]
        fan_in, fan_out = pairs[0][0].shape[1], pairs[0][1].shape[0]
        # numpy [E, r, in] and [E, out, r]; ggml ne {in, r, E} and {r, out, E}, like the merged expert weight.
        assert lora_a.shape.tolist() == [fan_in, 4, 4] and lora_b.shape.tolist() == [4, fan_out, 4]
        np.testing.assert_array_equal(values(lora_a), np.stack([a for a, _ in pairs]))
        np.testing.assert_array_equal(values(lora_b), np.stack([b for _, b in pairs]))


def test_moe_missing_expert_is_refused(tmp_path):
    base = write_base(tmp_path / "base", "mixtral", num_local_experts=4)
    modules = moe_modules("mixtral")
    del modules["model.layers.1.block_sparse_moe.experts.2.w3"]
    write_adapter(tmp_path / "adapter", base, modules)
    with pytest.raises(ValueError, match=r"block_sparse_moe\.experts\.w3 .*missing: \[2\]"):
        lora_to_gguf(tmp_path / "adapter", tmp_path / "moe.gguf")
    assert not (tmp_path / "moe.gguf").exists()


@pytest.mark.parametrize(
    "key, shapes",
    [
        ("model.embed_tokens", {"lora_embedding_A": (8, 96), "lora_embedding_B": (32, 8)}),
        ("lm_head", {"lora_A.weight": (8, 32), "lora_B.weight": (96, 8)}),
    ],
)
def test_embeddings_and_head_are_refused(tmp_path, key, shapes):
    base = write_base(tmp_path / "base", "llama")
    write_adapter(tmp_path / "adapter", base, {"model.layers.0.self_attn.v_proj": (32, 16)})
    path = tmp_path / "adapter" / "adapter_model.safetensors"
    from safetensors.torch import load_file

    tensors = load_file(path) | {f"{PREFIX}{key}.{part}": torch.zeros(shape) for part, shape in shapes.items()}
    save_file(tensors, path)
    with pytest.raises(ValueError, match=rf"{key.rsplit('.', 1)[-1]}.*merge_and_unload") as error:
        lora_to_gguf(tmp_path / "adapter", tmp_path / "out.gguf")
    assert str(path) in str(error.value)
    assert not (tmp_path / "out.gguf").exists()


def test_architecture_errors(tmp_path):
    modules = {"model.layers.0.self_attn.q_proj": (32, 32)}
    write_adapter(tmp_path / "no_base", tmp_path / "missing", modules)
    with pytest.raises(ValueError, match=r"cannot tell the architecture: .*missing/config.json does not exist.*--arch"):
        lora_to_gguf(tmp_path / "no_base", tmp_path / "out.gguf")
    with pytest.raises(ValueError, match=r"architecture 'gpt_neox' is not supported; use one of: .*qwen2moe"):
        lora_to_gguf(tmp_path / "no_base", tmp_path / "out.gguf", arch="gpt_neox")
    # The llama architecture reorders q/k per head: without the base config the head counts are unknown.
    with pytest.raises(ValueError, match=r"q_proj: .*per attention head.*base_model_name_or_path"):
        lora_to_gguf(tmp_path / "no_base", tmp_path / "out.gguf", arch="llama")
    lora_to_gguf(tmp_path / "no_base", tmp_path / "out.gguf", arch="qwen2")  # no reordering needed
    assert field(gguf.GGUFReader(tmp_path / "out.gguf"), "general.architecture") == "qwen2"
    base = write_base(tmp_path / "gpt2", "gpt2")
    write_adapter(tmp_path / "gpt2_adapter", base, modules)
    with pytest.raises(ValueError, match=r"model_type 'gpt2' is not supported"):
        lora_to_gguf(tmp_path / "gpt2_adapter", tmp_path / "gpt2.gguf")


def test_refusals(tmp_path):
    base = write_base(tmp_path / "base", "qwen2")
    write_adapter(tmp_path / "adapter", base, QWEN2)
    (tmp_path / "exists.gguf").write_bytes(b"keep")
    with pytest.raises(FileExistsError, match="exists.gguf exists"):
        lora_to_gguf(tmp_path / "adapter", tmp_path / "exists.gguf")
    assert (tmp_path / "exists.gguf").read_bytes() == b"keep"
    with pytest.raises(ValueError, match="--outtype 'Q4_0' is not one of F32, F16, BF16, Q8_0"):
        lora_to_gguf(tmp_path / "adapter", tmp_path / "out.gguf", outtype="Q4_0")
    write_adapter(tmp_path / "dora", base, QWEN2, use_dora=True)
    with pytest.raises(ValueError, match="DoRA"):
        lora_to_gguf(tmp_path / "dora", tmp_path / "out.gguf")


def test_rslora_alpha(tmp_path):
    """llama.cpp scales by alpha / r; rsLoRA's alpha / sqrt(r) is alpha · sqrt(r) / r."""
    base = write_base(tmp_path / "base", "qwen2")
    write_adapter(tmp_path / "adapter", base, QWEN2, rank=16, alpha=8, use_rslora=True)
    assert lora_to_gguf(tmp_path / "adapter", tmp_path / "out.gguf")["alpha"] == 32.0
    check_metadata(gguf.GGUFReader(tmp_path / "out.gguf"), "qwen2", 32.0)


def test_command_line(tmp_path):
    write_adapter(tmp_path / "adapter", "org/not-here", QWEN2)
    command = [sys.executable, ROOT / "tools" / "lora_to_gguf.py", "--input", tmp_path / "adapter"]
    command += ["--output", tmp_path / "cli.gguf", "--arch", "qwen2", "--outtype", "q8_0"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "wrote 3 LoRA pairs (6 tensors, Q8_0, qwen2, alpha 16)" in result.stdout
    reader, written = read(tmp_path / "cli.gguf")
    check_metadata(reader, "qwen2", 16.0)
    assert written["blk.0.attn_q.weight.lora_a"].tensor_type == T.Q8_0
    again = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert again.returncode == 1 and "error: --output" in again.stderr and "exists" in again.stderr


def fused_expert_adapter(model_dir: Path, directory: Path, rank: int = 2, alpha: int = 6):
    """A PEFT ``target_parameters`` LoRA with random factors on the fused experts of ``model_dir``, and PEFT's own
    per-expert updates ``B_e A_e`` (unscaled) of every adapted fused tensor, read off its merge_and_unload."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    before = {n: t.clone() for n, t in base.state_dict().items() if ".experts." in n}
    config = peft.LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=[],
        target_parameters=["experts.gate_up_proj", "experts.down_proj"],
        init_lora_weights=False,
    )
    model = peft.get_peft_model(base, config)
    model.save_pretrained(directory)
    after = model.merge_and_unload().state_dict()
    return {n: (after[n] - t) / (alpha / rank) for n, t in before.items()}


@pytest.mark.parametrize(("model_type", "arch"), [("mixtral", "llama"), ("qwen3_moe", "qwen3moe")])
def test_fused_expert_lora_is_split_into_llama_cpp_expert_tensors(tmp_path, tiny_model, model_type, arch):
    model_dir = tiny_model(model_type)
    deltas = fused_expert_adapter(model_dir, tmp_path / "adapter")
    lora_to_gguf(tmp_path / "adapter", tmp_path / "moe.gguf")
    reader, written = read(tmp_path / "moe.gguf")
    check_metadata(reader, arch, 6.0)
    layers = sorted({int(n.split(".")[2]) for n in deltas})
    assert set(written) == {
        f"blk.{i}.{n}.weight.lora_{ab}"
        for i in layers
        for n in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
        for ab in "ab"
    }
    for i in layers:
        gate_up, down = (
            deltas[f"model.layers.{i}.mlp.experts.gate_up_proj"],
            deltas[f"model.layers.{i}.mlp.experts.down_proj"],
        )
        rows = gate_up.shape[1] // 2
        expected = {"ffn_gate_exps": gate_up[:, :rows], "ffn_up_exps": gate_up[:, rows:], "ffn_down_exps": down}
        for name, delta in expected.items():
            lora_a = values(written[f"blk.{i}.{name}.weight.lora_a"])
            lora_b = values(written[f"blk.{i}.{name}.weight.lora_b"])
            np.testing.assert_allclose(lora_b @ lora_a, delta.numpy(), rtol=1e-5, atol=1e-6)


def test_fused_expert_lora_of_gpt_oss_is_refused(tmp_path, tiny_model):
    fused_expert_adapter(tiny_model("gpt_oss"), tmp_path / "adapter")
    with pytest.raises(ValueError, match=r"fused expert tensors .* of a 'gpt_oss' model .*convert_hf_to_gguf"):
        lora_to_gguf(tmp_path / "adapter", tmp_path / "out.gguf")
    with pytest.raises(ValueError, match=r"fused expert tensors .* merge the adapter .*convert_hf_to_gguf"):
        lora_to_gguf(tmp_path / "adapter", tmp_path / "out.gguf", arch="qwen3moe")
