"""Turning a training checkpoint directory into what the epoch export writes."""

from __future__ import annotations

from pathlib import Path

import torch


def checkpoint_step_dir(checkpoint_dir: Path) -> Path:
    """The DeepSpeed tag directory inside a lit-qlp checkpoint (``<ckpt>/global_stepN``, named by ``latest``)."""
    checkpoint_dir = Path(checkpoint_dir)
    latest = checkpoint_dir / "latest"
    if not latest.is_file():
        raise FileNotFoundError(
            f"--input {checkpoint_dir} is not a lit-qlp checkpoint directory (no 'latest' file); pass a directory "
            "from <default_root_dir>/checkpoints, e.g. last.ckpt"
        )
    step_dir = checkpoint_dir / latest.read_text().strip()
    if not step_dir.is_dir():
        raise FileNotFoundError(f"{latest} names {step_dir.name}, which is missing from {checkpoint_dir}")
    return step_dir


def module_from_config(model: dict, config_path: Path):
    """The run's ``CausalLMModule`` from its config's ``model`` section, without its base format: what an export
    holds does not depend on how the frozen base was stored (a full fine-tune has none)."""
    from jsonargparse import ArgumentParser

    from lit_qlp.module import CausalLMModule

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(CausalLMModule, "model")
    model = {k: v for k, v in model.items() if k != "base"}
    try:
        parsed = parser.parse_object({"model": model})
    except Exception as error:
        raise ValueError(
            f"--config {config_path}: its model section does not describe a lit-qlp model: {error}"
        ) from None
    return parser.instantiate(parsed).model


def convert_ds_checkpoint(checkpoint_dir: Path, config_path: Path, output_dir: Path) -> Path:
    """Writes the export of a training checkpoint: a PEFT adapter, a Control Adapter or an HF model directory.

    The module is rebuilt from the run's ``config.yaml`` (its ``model`` section) and its pipeline layers built in
    one process: on the meta device for adapters (only the trained tensors are read, from the checkpoint), on the
    CPU for full fine-tuning (frozen weights from the base model, trained ones from the checkpoint). The result is
    written by the same code as the epoch export, so the two are identical. One process holds the one-stage layout,
    whatever the run's stage count: its layers have the same indices, and so the same checkpoint files (a tied head
    spread over stages is the last layer, which has no file of its own).

    Args:
        checkpoint_dir: A checkpoint directory of the run (``<root>/checkpoints/last.ckpt`` or another).
        config_path: The run's resolved ``config.yaml`` (``<root>/config.yaml``).
        output_dir: New directory for the export (must not exist or be empty).
    """
    import yaml

    from lit_qlp.compat.deepspeed import layer_checkpoint_file
    from lit_qlp.strategies.checkpointing import load_checkpoint_file
    from lit_qlp.strategies.stages import SingleProcessStages

    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        raise FileExistsError(f"--output {output_dir} exists and is not empty; choose a new directory")
    config = yaml.safe_load(Path(config_path).read_text())
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise ValueError(f"--config {config_path} has no 'model' section; pass the run's <root>/config.yaml")
    step_dir = checkpoint_step_dir(checkpoint_dir)
    module = module_from_config(config["model"], config_path)
    device = torch.device("cpu" if module.method.export_reads_base_weights else "meta")
    spec = module.pipeline_spec(device, pipeline_stages=1)
    layers = []
    for index, layer_spec in enumerate(spec.layers):
        layer = layer_spec.build()
        path = layer_checkpoint_file(step_dir, index)
        state = load_checkpoint_file(path) if path.is_file() else {}
        trained = {n for n, p in layer.named_parameters() if p.requires_grad}
        absent = sorted(trained - set(state))
        if absent:
            raise ValueError(
                f"{step_dir}: layer {index} lacks trained tensors {absent[:3]}; does --config belong to the run "
                f"that wrote {checkpoint_dir}?"
            )
        layer.load_state_dict(state, strict=False, assign=True)
        layers.append(layer)
    module.export(output_dir, layers, SingleProcessStages())
    return output_dir


__all__ = ["checkpoint_step_dir", "convert_ds_checkpoint", "module_from_config"]
