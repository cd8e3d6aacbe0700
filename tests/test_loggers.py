"""Any Lightning logger receives every metric lit-qlp logs (``--trainer.logger``): CSVLogger, MLFlowLogger (file
store) and WandbLogger (offline), each read back from what it wrote and compared with the TensorBoard run (the
default logger) of the same training; checkpoints and config.yaml stay in the run's root whatever the logger."""

from __future__ import annotations

import csv
import json
import os
import struct
from pathlib import Path

import pytest

from tests.runs import ROOT, fit_args, run_cli

STEPS = ("--trainer.max_steps=4",)
# Throughput differs from run to run; every other metric is a function of the (seeded) training.
TIMED = {"train/sequences_per_s", "train/tokens_per_s"}


def tensorboard_metrics(root: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    metrics: dict[str, dict[int, float]] = {}
    for events in sorted(root.glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            metrics.setdefault(tag, {}).update({e.step: e.value for e in accumulator.Scalars(tag)})
    # Lightning's own, not lit-qlp's: the epoch counter every logger gets, TensorBoard's hyperparameter placeholder.
    return {tag: values for tag, values in metrics.items() if tag not in ("epoch", "hp_metric")}


def csv_metrics(root: Path) -> dict[str, dict[int, float]]:
    (path,) = root.glob("lightning_logs/version_*/metrics.csv")
    metrics: dict[str, dict[int, float]] = {}
    with path.open() as file:
        for row in csv.DictReader(file):
            for key, value in row.items():
                if key not in ("step", "epoch") and value != "":
                    metrics.setdefault(key, {})[int(row["step"])] = float(value)
    return metrics


def mlflow_metrics(tracking_uri: str) -> dict[str, dict[int, float]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    (experiment,) = [e for e in client.search_experiments() if e.name == "lit-qlp"]
    (run,) = client.search_runs([experiment.experiment_id])
    return {
        key: {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
        for key in run.data.metrics
        if key != "epoch"
    }


def wandb_records(path: Path):
    """The protobuf records of W&B's offline run file: a ``:W&B`` header, then a LevelDB-style log of 32 KiB
    blocks whose records (checksum, little-endian length, type: full, first, middle, last) may span blocks."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, block, pending = 7, 32768, b""
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if kind == 0 and length == 0:  # zero padding to the end of a block
            position += left
            continue
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind == 1:
            yield chunk
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            yield pending + chunk
            pending = b""


def wandb_metrics(root: Path) -> dict[str, dict[int, float]]:
    from wandb.proto import wandb_internal_pb2

    (path,) = root.glob("wandb/offline-run-*/run-*.wandb")
    metrics: dict[str, dict[int, float]] = {}
    for raw in wandb_records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") != "history":
            continue
        row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
        for key, value in row.items():
            if not key.startswith("_") and key not in ("epoch", "trainer/global_step"):
                metrics.setdefault(key, {})[row["trainer/global_step"]] = value
    return metrics


@pytest.fixture(scope="module")
def reference(tiny_model, corpus, tmp_path_factory):
    """The metrics of the same training with the default logger (TensorBoard, in the run's root)."""
    root = tmp_path_factory.mktemp("tensorboard")
    run_cli(fit_args(tiny_model("llama"), corpus, root, *STEPS), ROOT)
    return tensorboard_metrics(root)


def check_same_metrics(got: dict[str, dict[int, float]], expected: dict[str, dict[int, float]]) -> None:
    assert {"train/loss", "train/lr", "eval/loss", "train/tokens_per_s"} <= set(expected)
    assert set(got) == set(expected)
    for key, values in expected.items():
        assert sorted(got[key]) == sorted(values), key
        if key not in TIMED:
            for step, value in values.items():
                assert got[key][step] == pytest.approx(value, rel=1e-6), (key, step)


def check_root(root: Path) -> None:
    assert (root / "config.yaml").is_file() and (root / "checkpoints" / "last.ckpt").exists()
    assert not list(root.glob("**/version_*/checkpoints")) and not list(root.glob("**/version_*/config.yaml"))


@pytest.mark.slow
def test_csv_logger(tiny_model, corpus, tmp_path, reference):
    logger = ("--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={tmp_path}")
    run_cli(fit_args(tiny_model("llama"), corpus, tmp_path, *STEPS, *logger), ROOT)
    check_same_metrics(csv_metrics(tmp_path), reference)
    check_root(tmp_path)


@pytest.mark.slow
def test_mlflow_logger_with_a_file_store(tiny_model, corpus, tmp_path, reference, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for it to use a local directory
    uri = f"file:{tmp_path / 'mlruns'}"
    logger = ("--trainer.logger=lightning.pytorch.loggers.MLFlowLogger", f"--trainer.logger.tracking_uri={uri}")
    run_cli(
        fit_args(tiny_model("llama"), corpus, tmp_path, *STEPS, *logger, "--trainer.logger.experiment_name=lit-qlp"),
        ROOT,
    )
    check_same_metrics(mlflow_metrics(uri), reference)
    check_root(tmp_path)


@pytest.mark.slow
def test_wandb_logger_offline(tiny_model, corpus, tmp_path, reference, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = ("--trainer.logger=lightning.pytorch.loggers.WandbLogger", "--trainer.logger.offline=true")
    run_cli(
        fit_args(tiny_model("llama"), corpus, tmp_path, *STEPS, *logger, f"--trainer.logger.save_dir={tmp_path}"), ROOT
    )
    check_same_metrics(wandb_metrics(tmp_path), reference)
    check_root(tmp_path)
    assert os.environ.get("WANDB_MODE") == "offline"
