"""Checkpoints as DeepSpeed checkpoint directories: written under a ``.partial`` name, published when complete."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any


def save_engine_checkpoint(strategy: Any, checkpoint: dict[str, Any], filepath: Path) -> None:
    """Every rank writes its stage's trainable weights and optimizer state into the directory ``filepath``.

    Write, then publish: the ranks write into ``<filepath>.partial``; only when all have finished does global rank 0
    rename it to ``filepath`` (then local rank 0 of any node whose filesystem it does not share renames that node's
    copy). A crash during the save leaves a ``.partial`` directory and every earlier checkpoint, ``last``
    included, intact. Lightning's own state travels as DeepSpeed's client state.

    Args:
        strategy: The ``PipelineStrategy`` (its engine, ranks and barrier).
        checkpoint: Lightning's checkpoint dict.
        filepath: The checkpoint directory to publish.
    """
    # Weights and optimizer state are the engine's files; "optimizer_states" stays (empty) as Lightning expects it.
    client_state = {k: v for k, v in checkpoint.items() if k != "state_dict"}
    final = Path(filepath)
    partial = final.with_name(final.name + ".partial")
    if strategy.local_rank == 0 and partial.exists():
        shutil.rmtree(partial, ignore_errors=True)  # the remains of an interrupted save (any node may clear it)
    strategy.barrier("checkpoint-start")
    strategy.engine.save_checkpoint(str(partial), client_state=client_state, exclude_frozen_parameters=True)
    strategy.barrier("checkpoint-written")
    if strategy.is_global_zero:
        publish(partial, final)
    strategy.barrier("checkpoint-published")
    if strategy.local_rank == 0 and not strategy.is_global_zero and partial.exists():
        publish(partial, final)  # a node whose filesystem global rank 0 does not share
    strategy.barrier("checkpoint-published-on-every-node")


def load_engine_checkpoint(engine: Any, checkpoint_path: Path, with_optimizer: bool) -> dict[str, Any]:
    """Restores the engine's weights (and optimizer state) from a lit-qlp checkpoint directory; returns
    Lightning's state (DeepSpeed's client state)."""
    path = Path(checkpoint_path)
    if not path.is_dir() or not (path / "latest").is_file():
        raise FileNotFoundError(
            f"{path} is not a lit-qlp checkpoint directory (a DeepSpeed checkpoint with a 'latest' file); "
            "pass a directory from <default_root_dir>/checkpoints or 'last'"
        )
    _, client_state = engine.load_checkpoint(
        str(path), load_module_strict=False, load_optimizer_states=with_optimizer, load_lr_scheduler_states=False
    )
    if client_state is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {path}")
    return client_state


def publish(partial: Path, final: Path) -> None:
    """Renames a completely written checkpoint into place; what it replaces is removed only afterwards."""
    replaced = final.with_name(final.name + ".replaced")
    if final.exists() or final.is_symlink():  # saved again (or a `last` link): kept until the new one is in
        final.rename(replaced)
    partial.rename(final)
    if replaced.is_symlink() or replaced.is_file():
        replaced.unlink()
    elif replaced.exists():
        shutil.rmtree(replaced)


__all__ = ["load_engine_checkpoint", "publish", "save_engine_checkpoint"]
