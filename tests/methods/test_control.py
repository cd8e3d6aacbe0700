"""Control Adapters: the forward and regulariser against their formulas, training in both directions, export."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lit_qlp.adapters.control import ControlAdapter, ControlAdapterLayer, regularize_
from lit_qlp.formats.control import load_control_adapter
from tests.runs import ROOT, assert_same_losses, fit_args, run_cli, scalars

H, R = 12, 4


class Residual(nn.Module):
    """A stand-in decoder layer: ``h + f(h)``, called with keyword arguments like an HF layer."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(H, H)

    def forward(self, hidden_states, scale=1.0):
        return hidden_states + scale * torch.tanh(self.linear(hidden_states))


def random_adapter(seed: int = 0) -> ControlAdapterLayer:
    torch.manual_seed(seed)
    layer = ControlAdapterLayer(Residual(), H, R, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        layer.control_S.normal_()
    return layer


def test_forward_matches_the_formulas_position_by_position():
    layer = random_adapter()
    hidden = torch.randn(2, 7, H)
    classes = torch.tensor([[1, -1, 0, 1, 1, -1, 0], [0, 0, -1, 1, -1, 1, 1]])
    out = layer(hidden, scale=0.5, control_classes=classes)
    base = layer.base_layer(hidden, scale=0.5)
    q, s = layer.control_Q.detach(), layer.control_S.detach()
    for b in range(2):
        for t in range(7):
            delta = base[b, t] - hidden[b, t]
            c = int(classes[b, t])
            if c == 0:
                expected = base[b, t]
            else:
                lam = torch.expm1(s) if c == 1 else torch.expm1(-s)
                expected = base[b, t] + ((delta @ q) * lam) @ q.T
            torch.testing.assert_close(out[b, t], expected)


def test_orthogonal_initialisation_and_zero_s_start_at_the_base_layer():
    layer = ControlAdapterLayer(Residual(), H, R, generator=torch.Generator().manual_seed(1))
    q = layer.control_Q.detach()
    torch.testing.assert_close(q.T @ q, torch.eye(R))
    hidden = torch.randn(1, 5, H)
    torch.testing.assert_close(
        layer(hidden, control_classes=torch.ones(1, 5, dtype=torch.long)), layer.base_layer(hidden)
    )


def test_minus_one_is_the_exact_inverse_of_plus_one():
    layer = random_adapter(2)
    q, s = layer.control_Q.detach(), layer.control_S.detach()

    def transform(delta, sign):
        lam = torch.expm1(sign * s)
        return delta + ((delta @ q) * lam) @ q.T

    delta = torch.randn(6, H, dtype=torch.float64)
    q, s = torch.linalg.qr(q.double()).Q, s.double()  # QᵀQ = I to float64 precision
    torch.testing.assert_close(transform(transform(delta, 1), -1), delta)
    torch.testing.assert_close(transform(transform(delta, -1), 1), delta)
    assert not torch.allclose(transform(delta, 1), delta)


def test_control_classes_are_shifted_like_labels(tiny_model):
    from lit_qlp.methods import ControlAdapters
    from lit_qlp.module import CausalLMModule

    module = CausalLMModule(tiny_model("llama"), method=ControlAdapters(rank=4))
    batch = {
        "input_ids": torch.arange(10).reshape(2, 5),
        "labels": torch.arange(10).reshape(2, 5),
        "control_classes": torch.tensor([[0, 1, 1, -1, 1], [-1, -1, 0, 1, 1]]),
    }
    items, _ = module.micro_batches(batch)
    (_, _, control), labels = items[0]
    assert control.tolist() == [[1, 1, -1, 1, 0]] and labels.tolist() == [[1, 2, 3, 4, -100]]
    assert items[1][0][2].tolist() == [[-1, 0, 1, 1, 0]]


def test_regulariser_steps_equal_the_formulas_and_restore_orthogonality():
    layer = random_adapter(3)
    with torch.no_grad():
        layer.control_Q.add_(0.1 * torch.randn(H, R, generator=torch.Generator().manual_seed(4)))
    q, s = layer.control_Q.detach().clone(), layer.control_S.detach().clone()
    lr, decay, gamma = 0.1, 0.5, 0.3
    stats = regularize_(layer, gamma, lr, decay)
    expected_q = q - gamma * q @ (q.T @ q - torch.eye(R))
    expected_s = s - lr * decay * s
    torch.testing.assert_close(layer.control_Q.detach(), expected_q)
    torch.testing.assert_close(layer.control_S.detach(), expected_s)
    torch.testing.assert_close(stats["norm"], float(torch.expm1(expected_s).abs().max()))
    torch.testing.assert_close(stats["orthogonality"], float((expected_q.T @ expected_q - torch.eye(R)).square().sum()))
    torch.testing.assert_close(
        stats["weight_decay"], float(torch.expm1(s).abs().max() - torch.expm1(expected_s).abs().max())
    )

    errors = []
    for _ in range(12):
        errors.append(regularize_(layer, 0.5, lr, 0.0)["orthogonality"])
    # Down monotonically (quadratically) until float32 rounding is all that is left.
    converged = next(i for i, e in enumerate(errors) if e < 1e-12)
    assert converged >= 2 and all(b < a for a, b in zip(errors[: converged + 1], errors[1 : converged + 1])), errors
    assert max(errors[converged:]) < 1e-12


def test_control_adapter_wraps_only_selected_layers():
    adapter = ControlAdapter(rank=R, dropout=0.0, layers=[1], hidden_size=H, dtype=torch.float32, seed=0)
    plain = Residual()
    assert adapter(plain, 0, "model.layers.0") is plain
    wrapped = adapter(Residual(), 1, "model.layers.1")
    assert isinstance(wrapped, ControlAdapterLayer)


def test_bad_control_options_are_named(tiny_model):
    from lit_qlp.methods import ControlAdapters
    from lit_qlp.module import CausalLMModule

    with pytest.raises(ValueError, match=r"model.method.gamma=0.7 must be in \(0, 0.5\]"):
        ControlAdapters(gamma=0.7)
    with pytest.raises(ValueError, match="method.weight_decay needs float32"):
        ControlAdapters(weight_decay=0.1, weight_dtype="bfloat16")
    with pytest.raises(ValueError, match=r"model.method.rank=33 exceeds the hidden size 32"):
        CausalLMModule(tiny_model("llama"), method=ControlAdapters(rank=33))


def opposite_datasets(directory):
    """Two corpora of opposite patterns: counting up (class +1) and counting down (class -1)."""
    generator = torch.Generator().manual_seed(0)
    up, down = [], []
    for _ in range(80):
        start = int(torch.randint(0, 60, (1,), generator=generator))
        length = int(torch.randint(8, 20, (1,), generator=generator))
        up.append(json.dumps({"text": " ".join(f"w{start + i}" for i in range(length))}))
        down.append(json.dumps({"text": " ".join(f"w{start + length - i}" for i in range(length))}))
    (directory / "up.jsonl").write_text("\n".join(up) + "\n")
    (directory / "down.jsonl").write_text("\n".join(down) + "\n")
    return directory / "up.jsonl", directory / "down.jsonl"


def sequence_loss(model_dir, adapter_dir, text_ids, control_class):
    """Mean next-token loss of ``text_ids`` through the pipeline layers with the exported adapter."""
    from lit_qlp.kernels import TokenWeightedLoss
    from lit_qlp.models.pipeline import ModelSource
    from tests.tiny_models import stage_layers

    source = ModelSource(model_dir, dtype="float32")
    config, adapters = load_control_adapter(adapter_dir)
    adapter = ControlAdapter(config["r"], 0.0, list(adapters), source.config.hidden_size, torch.float32, seed=0)
    loss_fn = TokenWeightedLoss()
    layers = stage_layers(source, adapter, loss=loss_fn)
    for index, (q, s) in adapters.items():
        layers[1 + index].layer.control_Q.data.copy_(q)
        layers[1 + index].layer.control_S.data.copy_(s)
    ids = torch.tensor([text_ids])
    labels = torch.cat([ids[:, 1:], torch.full((1, 1), -100)], dim=1)
    classes = torch.full_like(ids, control_class)
    loss_fn.normalize_by(float(ids.shape[1] - 1))
    x = (ids, torch.arange(ids.shape[1]).unsqueeze(0), classes)
    with torch.no_grad():
        for layer in layers:
            x = layer(x)
        return float(loss_fn(x, labels))


@pytest.mark.slow
def test_training_on_opposite_classes_lowers_each_datasets_loss_under_its_own_class(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    model_dir = tiny_model("llama")
    up, down = opposite_datasets(tmp_path)
    datasets = (
        f"--data.datasets=[{{dataset_path: {up}, control_class: 1}}, {{dataset_path: {down}, control_class: -1}}]"
    )
    common = ["--model.method=lit_qlp.methods.ControlAdapters", "--model.lr=2e-2", datasets, "--trainer.max_epochs=1"]
    common += ["--checkpoint.every_n_train_steps=0"]
    one, two = tmp_path / "one", tmp_path / "two"
    run_cli(fit_args(model_dir, up, one, *common), ROOT)
    run_cli(fit_args(model_dir, up, two, *common, "--trainer.devices=2", "--trainer.strategy.pipeline_stages=2"), ROOT)
    reference = scalars(one, "train/loss")
    assert_same_losses(two, reference, len(reference))
    for tag in ("train/norms_avg", "train/norms_max", "train/orthogonality_max"):
        assert scalars(two, tag), tag

    from lit_qlp.export.checkpoint import convert_ds_checkpoint

    convert_ds_checkpoint(two / "checkpoints" / "last.ckpt", two / "config.yaml", tmp_path / "converted")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "converted" / name).read_bytes() == (two / "epoch1" / name).read_bytes(), name

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    up_ids = tokenizer(" ".join(f"w{i}" for i in range(20, 40)))["input_ids"]
    down_ids = tokenizer(" ".join(f"w{i}" for i in range(60, 40, -1)))["input_ids"]
    for root in (one, two):
        adapter_dir = root / "epoch1"
        saved = set(json.loads((adapter_dir / "adapter_config.json").read_text())["layers_to_transform"])
        assert saved == {0, 1, 2, 3}
        base_up = sequence_loss(model_dir, adapter_dir, up_ids, 0)  # class 0: the adapter is inactive
        base_down = sequence_loss(model_dir, adapter_dir, down_ids, 0)
        assert sequence_loss(model_dir, adapter_dir, up_ids, 1) < base_up
        assert sequence_loss(model_dir, adapter_dir, down_ids, -1) < base_down
        # And the opposite class steers the other way.
        assert sequence_loss(model_dir, adapter_dir, up_ids, -1) > base_up


@pytest.mark.slow
def test_control_class_with_another_mode_is_refused_before_anything_is_written(tiny_model, tmp_path):
    import os
    import subprocess
    import sys

    up, down = opposite_datasets(tmp_path)
    root = tmp_path / "run"
    args = fit_args(tiny_model("llama"), up, root, f"--data.datasets=[{{dataset_path: {up}, control_class: 1}}]")
    result = subprocess.run(
        [sys.executable, "-m", "lit_qlp", *args],
        cwd=ROOT,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert "set control_class, which only Control Adapters use, but model.method is LoRA" in result.stderr
    assert not root.exists() or not any(root.iterdir())


def write_random_control_adapter(directory, model_dir, rank=4, seed=0, perturb=0.0):
    """A Control Adapter export with orthonormal (optionally perturbed) Q and random S for the tiny model."""
    from lit_qlp.formats.control import control_adapter_config
    from lit_qlp.formats.peft import save_peft_adapter
    from tests.tiny_models import COMMON

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(COMMON["num_hidden_layers"]):
        q = torch.linalg.qr(torch.randn(COMMON["hidden_size"], rank, generator=generator)).Q
        q = q + perturb * torch.randn(q.shape, generator=generator)
        tensors[f"base_model.model.model.layers.{i}.control_Q"] = q.contiguous()
        tensors[f"base_model.model.model.layers.{i}.control_S"] = 0.5 * torch.randn(rank, generator=generator)
    layers = list(range(COMMON["num_hidden_layers"]))
    save_peft_adapter(directory, tensors, control_adapter_config(str(model_dir), rank, 0.0, layers, 0.5))
    return tensors


@pytest.mark.parametrize("inverse", [False, True])
def test_converted_lora_is_q_diag_lambda_qt_w_down(tiny_model, tmp_path, inverse):
    from safetensors.torch import load_file

    from lit_qlp.export.control import control_adapter_to_lora

    model_dir = tiny_model("llama")
    adapter = write_random_control_adapter(tmp_path / "ca", model_dir)
    lora = control_adapter_to_lora(model_dir, tmp_path / "ca", tmp_path / "lora", inverse=inverse)
    base = load_file(model_dir / "model.safetensors")
    for i in range(4):
        q = adapter[f"base_model.model.model.layers.{i}.control_Q"]
        s = adapter[f"base_model.model.model.layers.{i}.control_S"]
        w_down = base[f"model.layers.{i}.mlp.down_proj.weight"]
        expected = q @ torch.diag(torch.expm1(-s if inverse else s)) @ q.T @ w_down
        key = f"base_model.model.model.layers.{i}.mlp.down_proj"
        torch.testing.assert_close(lora[f"{key}.lora_B.weight"] @ lora[f"{key}.lora_A.weight"], expected)
    with pytest.raises(FileExistsError, match="not empty"):
        control_adapter_to_lora(model_dir, tmp_path / "ca", tmp_path / "lora")


@pytest.mark.parametrize("inverse", [False, True])
def test_converted_lora_loads_in_peft_and_is_exact_for_parallel_blocks(tiny_model, tmp_path, inverse):
    """Cohere's layers are parallel (h + attn + mlp): LoRAs on down_proj and o_proj reproduce the adapter exactly."""
    peft = pytest.importorskip("peft")
    from lit_qlp.export.control import control_adapter_to_lora
    from lit_qlp.kernels import TokenWeightedLoss
    from lit_qlp.models.pipeline import ModelSource
    from tests.tiny_models import VOCAB, load_hf, stage_layers

    model_dir = tiny_model("cohere")
    write_random_control_adapter(tmp_path / "ca", model_dir, seed=1)
    control_adapter_to_lora(model_dir, tmp_path / "ca", tmp_path / "lora", inverse=inverse, o_proj=True)

    source = ModelSource(model_dir, dtype="float32")
    config, adapters = load_control_adapter(tmp_path / "ca")
    adapter = ControlAdapter(config["r"], 0.0, list(adapters), source.config.hidden_size, torch.float32, seed=0)
    layers = stage_layers(source, adapter, loss=TokenWeightedLoss())
    for index, (q, s) in adapters.items():
        layers[1 + index].layer.control_Q.data.copy_(q)
        layers[1 + index].layer.control_S.data.copy_(s)
    ids = torch.randint(3, VOCAB, (1, 16), generator=torch.Generator().manual_seed(0))
    x = (ids, torch.arange(16).unsqueeze(0), torch.full_like(ids, -1 if inverse else 1))
    with torch.no_grad():
        for layer in layers:
            x = layer(x)
        logits = layers[-1].logits(x)
        model = peft.PeftModel.from_pretrained(load_hf(model_dir, source.attn_implementation), tmp_path / "lora")
        reference = model.eval()(input_ids=ids).logits
        base = load_hf(model_dir, source.attn_implementation)(input_ids=ids).logits
    torch.testing.assert_close(logits, reference)
    assert not torch.allclose(reference, base)

    # And it merges into the base with tools/merge_lora.py's function: same logits again.
    from transformers import AutoModelForCausalLM

    from lit_qlp.export.merge import merge_lora

    merge_lora(model_dir, tmp_path / "lora", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(
        tmp_path / "merged", dtype=torch.float32, attn_implementation=source.attn_implementation
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, logits, rtol=1e-4, atol=1e-5)


def test_analysis_against_direct_computation(tmp_path, tiny_model):
    from lit_qlp.export.control import analyze_control_adapter

    write_random_control_adapter(tmp_path / "exact", tiny_model("llama"), seed=2)
    for row in analyze_control_adapter(tmp_path / "exact"):
        assert row["orthogonality"] < 1e-5 and row["inverse_error"] < 1e-5 and abs(row["condition"] - 1) < 1e-5
        assert 1 <= row["effective_rank"] <= 4 and row["lambda_min"] <= row["lambda_median"] <= row["lambda_max"]

    tensors = write_random_control_adapter(tmp_path / "perturbed", tiny_model("llama"), seed=3, perturb=0.05)
    rows = analyze_control_adapter(tmp_path / "perturbed")
    for row in rows:
        q = tensors[f"base_model.model.model.layers.{row['layer']}.control_Q"].double()
        s = tensors[f"base_model.model.model.layers.{row['layer']}.control_S"].double()
        eye = torch.eye(q.shape[0], dtype=torch.float64)
        plus = eye + q @ torch.diag(torch.expm1(s)) @ q.T
        minus = eye + q @ torch.diag(torch.expm1(-s)) @ q.T
        torch.testing.assert_close(row["inverse_error"], float(torch.linalg.matrix_norm(plus @ minus - eye)))
        torch.testing.assert_close(row["orthogonality"], float(torch.linalg.matrix_norm(q.T @ q - torch.eye(4))))
        assert row["inverse_error"] > 1e-3


def test_the_tools_run_from_the_command_line(tiny_model, tmp_path):
    import subprocess
    import sys

    model_dir = tiny_model("llama")
    write_random_control_adapter(tmp_path / "ca", model_dir)
    tools = ROOT / "tools"
    convert = [sys.executable, tools / "control_adapter_to_lora.py", "--base", model_dir, "--adapter", tmp_path / "ca"]
    result = subprocess.run([*convert, "--output", tmp_path / "lora"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file()
    analyze = [sys.executable, tools / "analyze_control_adapters.py", "--adapter", tmp_path / "ca", "--no-gpu"]
    result = subprocess.run([*analyze, "--json", tmp_path / "rows.json"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| 3 |" in result.stdout and len(json.loads((tmp_path / "rows.json").read_text())) == 4
