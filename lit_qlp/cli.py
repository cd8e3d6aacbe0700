"""The ``lit-qlp`` command: LightningCLI over CausalLMModule, TextDataModule and PipelineStrategy.

lit-qlp fit --config configs/demo.yaml
lit-qlp fit --config configs/lora.yaml --ckpt_path last
lit-qlp validate --config configs/lora.yaml --ckpt_path last
lit-qlp fit --config configs/lora.yaml --print_config
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from typing_extensions import override

from lit_qlp.callbacks import EpochExport, RunCheckpoint
from lit_qlp.data import TextDataModule
from lit_qlp.module import CausalLMModule


def evals_to_interval(evals_per_epoch: int) -> float:
    """``trainer.val_check_interval`` (a fraction of the epoch) for ``evals_per_epoch`` evenly spaced evaluations."""
    return 1.0 / evals_per_epoch


def splits_class_zero(method: Any) -> bool:
    """``data.split_class_zero`` for ``model.method`` (its ``class_path`` / ``init_args`` as parsed): methods that
    use control classes (Control Adapters) train class-0 documents as +1 or -1."""
    class_path = getattr(method, "class_path", None)
    if class_path is None:
        return False
    module_name, _, name = class_path.rpartition(".")
    return bool(getattr(importlib.import_module(module_name), name).uses_control_classes)


class LitQLPCLI(LightningCLI):
    """LightningCLI with lit-qlp's defaults.

    - ``trainer.strategy``: PipelineStrategy (``--trainer.strategy.pipeline_stages 2`` and so on).
    - ``trainer.logger``: TensorBoard, writing straight into ``trainer.default_root_dir``.
    - ``checkpoint``: RunCheckpoint (a ModelCheckpoint) writing DeepSpeed checkpoint directories to
      ``<root>/checkpoints`` every ``checkpoint_interval_hours`` and at each epoch end, the newest
      ``max_checkpoints`` kept, with a ``last`` link, so that ``--ckpt_path last`` resumes.
    - ``export``: EpochExport, the adapter of each epoch in ``<root>/epoch{N}``.
    - ``trainer.callbacks``: RMSRatioSchedule (the learning rate of each step) and EvaluationReport (an evaluation
      before training, a console line after each) and ProgressReport (a line per step with throughput and ETA);
      ``--trainer.callbacks+=X`` adds one, a list replaces them.
    - ``data.tokenizer_dir`` follows ``model.model_dir``; ``trainer.val_check_interval`` follows
      ``data.evals_per_epoch``; ``data.split_class_zero`` follows ``model.method`` (true for Control Adapters).
    - ``model.method``: LoRA with its defaults (``--model.method lit_qlp.methods.ControlAdapters`` and so on).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("seed_everything_default", 42)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)  # the module configures its own optimizer
        super().__init__(CausalLMModule, TextDataModule, *args, **kwargs)

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.model_dir", "data.tokenizer_dir")
        parser.link_arguments("data.evals_per_epoch", "trainer.val_check_interval", compute_fn=evals_to_interval)
        parser.link_arguments("model.method", "data.split_class_zero", compute_fn=splits_class_zero)
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.add_lightning_class_args(EpochExport, "export")
        parser.set_defaults({"trainer.strategy": {"class_path": "lit_qlp.strategies.PipelineStrategy"}})
        parser.set_defaults({"model.method": {"class_path": "lit_qlp.methods.LoRA"}})
        # Ordinary callbacks: `--trainer.callbacks+=...` adds to them, a `trainer.callbacks` list replaces them.
        parser.set_defaults(
            {
                "trainer.callbacks": [
                    {"class_path": "lit_qlp.callbacks.RMSRatioSchedule"},
                    {"class_path": "lit_qlp.callbacks.EvaluationReport"},
                    {"class_path": "lit_qlp.callbacks.ProgressReport"},
                ]
            }
        )

    def check_ckpt_path(self) -> None:
        """``--ckpt_path last`` with no checkpoint fails here, before anything is written, naming the directory it
        looked in (Lightning would only warn and train, or validate, from scratch)."""
        config = self.config.get(str(self.subcommand))
        if config is None or config.get("ckpt_path") != "last":
            return
        root = Path(config.get("trainer.default_root_dir") or ".")
        directory = Path(config.get("checkpoint.dirpath") or root / "checkpoints")
        if not any(path.exists() for path in directory.glob("*.ckpt")):  # a dangling last.ckpt link is none
            raise FileNotFoundError(
                f"--ckpt_path last: no checkpoint in {directory} (trainer.default_root_dir={str(root)!r}); point "
                "trainer.default_root_dir at the run to resume, or leave out --ckpt_path to start a new run"
            )

    def before_fit(self) -> None:
        self.check_ckpt_path()

    def before_validate(self) -> None:
        self.check_ckpt_path()

    def before_test(self) -> None:
        self.check_ckpt_path()

    def before_predict(self) -> None:
        self.check_ckpt_path()

    @override
    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        config = self.config_init.get(str(self.subcommand)) if self.subcommand else None
        trainer_config = (config if config is not None else self.config_init).get("trainer") or {}
        if trainer_config.get("logger") in (None, True):
            root = trainer_config.get("default_root_dir") or "."
            kwargs["logger"] = TensorBoardLogger(save_dir=root, name="", version="")
        return super().instantiate_trainer(**kwargs)


def main(args: list[str] | None = None) -> None:
    """Entry point of ``lit-qlp`` and ``python -m lit_qlp``."""
    LitQLPCLI(args=args)


if __name__ == "__main__":
    main()
