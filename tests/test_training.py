"""End-to-end training through the real CLI: pipeline vs one process, exact resume, the epoch adapter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.tiny_models import VOCAB

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def write_corpus(path: Path, documents: int = 120, seed: int = 0) -> Path:
    """A jsonl corpus of short documents of "w.." words with a learnable pattern (counting sequences)."""
    generator = torch.Generator().manual_seed(seed)
    lines = []
    for _ in range(documents):
        start = int(torch.randint(0, VOCAB - 30, (1,), generator=generator))
        length = int(torch.randint(8, 24, (1,), generator=generator))
        lines.append(json.dumps({"text": " ".join(f"w{start + i}" for i in range(length))}))
    path.write_text("\n".join(lines) + "\n")
    return path


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(
        [sys.executable, "-m", "lit_qlp", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, f"lit-qlp {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


def scalars(root: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: dict[int, float] = {}
    for events in sorted(root.glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        if tag in accumulator.Tags()["scalars"]:
            values.update({e.step: e.value for e in accumulator.Scalars(tag)})
    return values


def fit_args(model_dir: Path, corpus: Path, root: Path, *extra: str) -> list[str]:
    return [
        "fit",
        "--config",
        str(ROOT / "configs" / "demo.yaml"),
        f"--model.model_dir={model_dir}",
        "--model.lora_rank=4",
        "--model.lr=1e-2",
        f"--data.datasets=[{{dataset_path: {corpus}}}]",
        "--data.sequence_len=64",
        "--data.eval_fraction=0.1",
        f"--trainer.default_root_dir={root}",
        "--trainer.strategy.gradient_accumulation_steps=2",
        "--trainer.val_check_interval=4",
        *extra,
    ]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("data") / "corpus.jsonl")


@pytest.fixture(scope="module")
def reference_run(tiny_model, corpus, tmp_path_factory) -> Path:
    """One uninterrupted single-process run of 8 steps, checkpointing every 3."""
    root = tmp_path_factory.mktemp("reference")
    run_cli(
        fit_args(tiny_model("llama"), corpus, root, "--trainer.max_steps=8", "--checkpoint.every_n_train_steps=3"), ROOT
    )
    return root


def test_loss_falls_and_eval_is_logged(reference_run):
    losses = scalars(reference_run, "train/loss")
    assert len(losses) == 8
    steps = sorted(losses)
    assert losses[steps[-1]] < losses[steps[0]]
    assert scalars(reference_run, "eval/loss")
    assert scalars(reference_run, "train/lr")


def test_two_stages_in_two_processes_give_the_same_losses(tiny_model, corpus, reference_run, tmp_path):
    run_cli(
        fit_args(
            tiny_model("llama"),
            corpus,
            tmp_path,
            "--trainer.max_steps=4",
            "--trainer.devices=2",
            "--trainer.strategy.pipeline_stages=2",
        ),
        ROOT,
    )
    reference = scalars(reference_run, "train/loss")
    losses = scalars(tmp_path, "train/loss")
    assert len(losses) == 4
    for step, loss in losses.items():
        torch.testing.assert_close(loss, reference[step], msg=lambda m: f"step {step}: {m}")


def test_resume_from_checkpoint_continues_exactly(tiny_model, corpus, reference_run, tmp_path):
    model_dir = tiny_model("llama")
    run_cli(fit_args(model_dir, corpus, tmp_path, "--trainer.max_steps=3", "--checkpoint.every_n_train_steps=3"), ROOT)
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
    run_cli(
        fit_args(model_dir, corpus, tmp_path, "--trainer.max_steps=8", "--ckpt_path=last"),
        ROOT,
    )
    reference = scalars(reference_run, "train/loss")
    resumed = scalars(tmp_path, "train/loss")
    assert sorted(resumed) == sorted(reference)
    for step in sorted(reference):
        assert resumed[step] == reference[step], f"step {step}: resumed {resumed[step]} != {reference[step]}"


def test_epoch_adapter_loads_in_peft_with_the_trained_logits(tiny_model, corpus, tmp_path):
    peft = pytest.importorskip("peft")
    from lit_qlp.adapters.lora import LoraAdapter, LoraLinear
    from lit_qlp.models.pipeline import DecoderLayerPipe, EmbeddingPipe, ModelSource, OutputPipe
    from tests.tiny_models import load_hf

    model_dir = tiny_model("llama")
    run_cli(fit_args(model_dir, corpus, tmp_path, "--trainer.max_epochs=1", "--checkpoint.every_n_train_steps=0"), ROOT)
    adapter_dir = tmp_path / "epoch1"
    assert (adapter_dir / "adapter_config.json").is_file() and (adapter_dir / "tokenizer.json").is_file()

    # lit_qlp's forward with the weights of the final training checkpoint (written by the engine, not the export).
    source = ModelSource(model_dir, dtype="float32")
    n = source.quirks.num_layers
    adapter = LoraAdapter(4, 4, 0.0, "all-linear", range(n), torch.float32, seed=0)
    layers = [EmbeddingPipe(source)] + [DecoderLayerPipe(source, i, adapter) for i in range(n)] + [OutputPipe(source)]
    (step_dir,) = (tmp_path / "checkpoints" / "last.ckpt").resolve().glob("global_step*")
    for index, layer in enumerate(layers):
        state = torch.load(step_dir / f"layer_{index:02d}-model_states.pt", weights_only=False)
        missing, unexpected = layer.load_state_dict(state, strict=False)
        assert not unexpected
        assert all("lora_" not in k for k in missing)
    assert any(isinstance(m, LoraLinear) and m.lora_B.weight.abs().sum() > 0 for m in layers[1].modules())

    ids = torch.randint(3, VOCAB, (1, 32), generator=torch.Generator().manual_seed(5))
    x = (ids, torch.arange(32).unsqueeze(0), torch.zeros_like(ids))
    with torch.no_grad():
        for layer in layers:
            x = layer(x)
        model = peft.PeftModel.from_pretrained(load_hf(model_dir, "sdpa"), adapter_dir).eval()
        reference = model(input_ids=ids).logits
    torch.testing.assert_close(x, reference)
