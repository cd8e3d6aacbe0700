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

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import TensorBoardLogger
from typing_extensions import override

from lit_qlp import config_files
from lit_qlp.callbacks import EpochExport, InterruptCheckpoint, RunCheckpoint
from lit_qlp.callbacks.interrupt import exit_status, interrupting_signal
from lit_qlp.data import TextDataModule
from lit_qlp.module import CausalLMModule
from lit_qlp.rundir import RunLock, check_new_run, is_first_process, resolve_last


def evals_to_interval(evals_per_epoch: int) -> float:
    """``trainer.val_check_interval`` (a fraction of the epoch) for ``evals_per_epoch`` evenly spaced evaluations."""
    return 1.0 / evals_per_epoch


class RunConfig(SaveConfigCallback):
    """Writes the run's resolved config to ``<default_root_dir>/config.yaml`` when training starts, after every
    check that can refuse the run: a refused run, a checkpoint that fails to load, and ``validate``, ``test`` or
    ``predict`` leave the config of the run in that directory as it was."""

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        pass  # Lightning writes the config here, before the run can still be refused

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Into the run's root, whatever the logger (Lightning would use the logger's directory: CSV's
        # lightning_logs/version_N, MLflow's ./mlruns); always overwritten, as a resumed run's config is its own.
        if self.already_saved:
            return
        if trainer.is_global_zero:
            root = Path(trainer.default_root_dir)
            root.mkdir(parents=True, exist_ok=True)
            path = str(root / self.config_filename)
            self.parser.save(self.config, path, skip_none=False, overwrite=True, multifile=self.multifile)
            self.save_config(trainer, pl_module, "fit")
        self.already_saved = True


def class_options_help() -> str:
    """The epilog of ``--help``: the options of the class chosen for ``trainer.strategy``, ``model.method`` and
    ``model.base`` are not among those it lists (jsonargparse shows them with ``--<key>.help CLASS``)."""
    import inspect

    from lightning.pytorch.strategies import DDPStrategy

    from lit_qlp import bases, methods
    from lit_qlp.strategies import PipelineStrategy

    inherited = set(inspect.signature(DDPStrategy).parameters)
    strategy = [name for name in inspect.signature(PipelineStrategy).parameters if name not in inherited]
    others = [name for name in methods.__all__ if name not in ("LoRA", "TrainingMethod")]
    base = [name for name in bases.__all__ if name != "BaseFormat"]
    return (
        "trainer.strategy, model.method and model.base each take a class, and the options of the class chosen are not "
        f"listed above. Show them with --trainer.strategy.help PipelineStrategy ({', '.join(strategy)}), "
        f"--model.method.help LoRA (or {', '.join(others)}) and --model.base.help {base[0]}."
    )


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
    - ``interrupt``: InterruptCheckpoint: SIGINT (Ctrl-C) or SIGTERM saves the current step and stops; the command
      exits with 130 or 143 (``after_fit``) and ``--ckpt_path last`` resumes exactly.
    - ``trainer.callbacks``: RMSRatioSchedule (the learning rate of each step) and EvaluationReport (an evaluation
      before training, a console line after each) and ProgressReport (a line per step with throughput and ETA);
      ``--trainer.callbacks+=X`` adds one, a list replaces them.
    - ``trainer.enable_progress_bar``: false: those lines are the one console display; with true, Lightning's
      bar is, and the lines are not printed.
    - ``data.tokenizer_dir`` follows ``model.model_dir``; ``trainer.val_check_interval`` follows
      ``data.evals_per_epoch``; ``data.split_class_zero`` follows ``model.method`` (true for Control Adapters).
    - ``model.method``: LoRA with its defaults (``--model.method lit_qlp.methods.ControlAdapters`` and so on).
    - The run directory (``lit_qlp.rundir``): a new run refuses a root holding another run's checkpoints or
      exports, ``fit`` locks its root, ``--ckpt_path last`` never starts from scratch, and ``config.yaml`` is
      written when training starts (``RunConfig``), so refused runs and ``validate`` leave it as it was.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("seed_everything_default", 42)
        kwargs.setdefault("save_config_callback", RunConfig)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)  # the module configures its own optimizer
        self._lock: RunLock | None = None
        try:
            super().__init__(CausalLMModule, TextDataModule, *args, **kwargs)  # runs the subcommand
        finally:
            if self._lock is not None:
                self._lock.release()

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.model_dir", "data.tokenizer_dir")
        parser.link_arguments("data.evals_per_epoch", "trainer.val_check_interval", compute_fn=evals_to_interval)
        parser.link_arguments("model.method", "data.split_class_zero", compute_fn=splits_class_zero)
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.add_lightning_class_args(EpochExport, "export")
        # After "checkpoint": both run last, in this order, and trainer.checkpoint_callback stays RunCheckpoint.
        parser.add_lightning_class_args(InterruptCheckpoint, "interrupt")
        parser.set_defaults({"trainer.strategy": {"class_path": "lit_qlp.strategies.PipelineStrategy"}})
        parser.set_defaults({"model.method": {"class_path": "lit_qlp.methods.LoRA"}})
        # One console display: ProgressReport's and EvaluationReport's lines (``--trainer.enable_progress_bar
        # true`` shows Lightning's bar instead, with loss, eval loss and tokens/s; the lines then stay quiet).
        parser.set_defaults({"trainer.enable_progress_bar": False})
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

    def check_run_dir(self) -> None:
        """The run-directory rules of ``lit_qlp.rundir``, checked before anything is written.

        - ``--ckpt_path last`` with no complete checkpoint fails, naming the directory it looked in (Lightning
          would only warn and train, or validate, from scratch); with a broken ``last.ckpt`` link it resumes from
          the newest complete checkpoint and says so (``fit`` re-points the link).
        - ``fit`` without ``--ckpt_path`` refuses a root holding another run's checkpoints or exports.
        - ``fit`` locks the root for as long as the run lasts; a second run into it fails at once.
        """
        subcommand = str(self.subcommand)
        config = self.config.get(subcommand)
        if config is None:
            return
        root = Path(config.get("trainer.default_root_dir") or ".")
        directory = Path(config.get("checkpoint.dirpath") or root / "checkpoints")
        fitting = subcommand == "fit"
        if config.get("ckpt_path") == "last":
            newest = resolve_last(directory, root, repair=fitting and is_first_process())
            if newest is not None and not fitting:
                self.config_init[subcommand]["ckpt_path"] = str(newest)
        elif fitting and config.get("ckpt_path") is None:
            check_new_run(root, directory, config.get("export.dirname") or "epoch{epoch}")
        if fitting and is_first_process():
            self._lock = RunLock(root)
            self._lock.acquire()

    def before_fit(self) -> None:
        self.check_run_dir()

    def after_fit(self) -> None:
        """A run stopped by a signal (``InterruptCheckpoint``) exits with 128 + its number, after its checkpoint."""
        signum = interrupting_signal(self.trainer)
        if signum is not None:
            raise SystemExit(exit_status(signum))

    def before_validate(self) -> None:
        self.check_run_dir()

    def before_test(self) -> None:
        self.check_run_dir()

    def before_predict(self) -> None:
        self.check_run_dir()

    @override
    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        """Every parser (the main one and each subcommand's): config files read by ``lit_qlp.config_files`` (errors
        name the file; an unquoted ``1:3`` asks for quotes), no abbreviated options (``--trainer.max_epoch`` is an
        error, not ``--trainer.max_epochs``), and a ``--help`` that says how to show a chosen class's options."""
        kwargs.setdefault("parser_mode", config_files.register())
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("epilog", class_options_help())
        return super().init_parser(**kwargs)

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
