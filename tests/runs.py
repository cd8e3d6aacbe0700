"""Running lit-qlp's CLI as a user does, and reading what a run logged: shared by the end-to-end tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from tests.tiny_models import VOCAB

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


def run_cli(args: list[str], cwd: Path, launcher: tuple[str, ...] = (sys.executable, "-m")) -> None:
    """Runs ``<launcher> lit_qlp <args>`` (by default ``python -m lit_qlp``) and fails the test if it fails."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    command = [*launcher, "lit_qlp", *args]
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"


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
        "--model.method.rank=4",
        "--model.lr=1e-2",
        f"--data.datasets=[{{dataset_path: {corpus}}}]",
        "--data.sequence_len=64",
        "--data.eval_fraction=0.1",
        f"--trainer.default_root_dir={root}",
        "--trainer.strategy.gradient_accumulation_steps=2",
        "--data.evals_per_epoch=4",
        *extra,
    ]


def assert_same_losses(root: Path, reference: dict[int, float], steps: int) -> None:
    losses = scalars(root, "train/loss")
    assert sorted(losses) == list(range(steps)), losses
    for step, loss in losses.items():
        torch.testing.assert_close(loss, reference[step], msg=lambda m: f"step {step}: {m}")


TWO_STAGES = ("--trainer.max_steps=4", "--trainer.devices=2", "--trainer.strategy.pipeline_stages=2")
