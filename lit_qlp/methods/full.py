"""Full fine-tuning: the base weights themselves train; each epoch's export is a Hugging Face model directory."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from typing_extensions import override

from lit_qlp.adapters.targeting import ALL_LINEAR
from lit_qlp.formats.hf import copy_tokenizer_files, plan_shards, save_shard, shard_file_name, write_index
from lit_qlp.methods.base import TrainingMethod

if TYPE_CHECKING:
    from lit_qlp.bases import BaseFormat
    from lit_qlp.models.pipeline import ModelSource
    from lit_qlp.strategies.stages import StageGroup

TIED = frozenset({"model.embed_tokens.weight", "lm_head.weight"})


class FullFineTuning(TrainingMethod):
    """The weights themselves train (in the model's ``dtype``, bf16 by default, updated by optimi Adam with Kahan
    summation instead of a float32 master copy), restricted by ``target_modules`` and ``layers_to_transform``.
    Needs an unquantised base (no ``model.base``). With tied embeddings, ``embed_tokens`` and ``lm_head`` are one
    matrix: naming either trains it, and across pipeline stages it stays one (DeepSpeed's tied layers).

    Args:
        target_modules: The modules whose weights train: unset trains everything (embeddings, decoder layers,
            final norm, head), "all-linear" the decoder layers' linear layers, or names such as
            ``[self_attn, mlp, lm_head]`` (a name selects every module at or below a module of that name).
        layers_to_transform: Decoder layers whose weights train ("8:15", "1,3,5", ...); all when unset.
    """

    export_reads_base_weights = True

    def __init__(self, target_modules: str | list[str] | None = None, layers_to_transform: str | None = None) -> None:
        super().__init__(layers_to_transform)
        self.target_modules = target_modules

    @override
    def check(self, source: ModelSource, base: BaseFormat | None) -> None:
        super().check(source, base)
        if base is not None:
            raise ValueError(
                f"model.method FullFineTuning trains the weights themselves, which model.base={base!r} would freeze "
                "in a quantised format; remove model.base (train in model.dtype) or use model.method LoRA / "
                "ControlAdapters on the 4-bit base"
            )
        self.trainable(source)

    @override
    def trainable(self, source: ModelSource) -> frozenset[str]:
        return frozenset(full_trainable_parameters(source.skeleton, self.target_modules, self.layers(source)))

    @override
    def export(
        self, directory: Path, layers: list, stages: StageGroup, source: ModelSource, max_shard_bytes: int = 5 * 2**30
    ) -> None:
        """The whole model in Hugging Face format; each stage writes its own shards, rank 0 the index."""
        tensors: dict[str, torch.Tensor] = {}
        if stages.data_parallel_rank == 0:  # data-parallel replicas hold the same weights
            for layer in layers:
                if isinstance(layer, torch.nn.Module):
                    tensors.update(layer.hf_tensors())
        if source.quirks.tie_word_embeddings:
            tensors.pop("lm_head.weight", None)  # tied checkpoints hold the matrix once, as the embedding
        shards = plan_shards(tensors, max_shard_bytes)
        plans = stages.all_gather_object((stages.stage_id, [[(n, tensors[n].nbytes) for n in s] for s in shards]))
        plans = sorted((p for p in plans if p[1]), key=lambda p: p[0])
        total = sum(len(p[1]) for p in plans)
        file_names = {}
        index = 0
        for _, stage_shards in plans:
            for names in stage_shards:
                index += 1
                file_names.update({tensor_name: shard_file_name(index, total) for tensor_name, _ in names})
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for names in shards:
            save_shard(directory / file_names[names[0]], {n: tensors[n] for n in names})
        if stages.is_global_zero:
            if total > 1:
                size = sum(b for _, stage_shards in plans for names in stage_shards for _, b in names)
                write_index(directory, file_names, size)
            shutil.copy2(source.model_dir / "config.json", directory / "config.json")
            copy_tokenizer_files(source.model_dir, directory)
        stages.barrier("export_model")


def full_trainable_parameters(
    skeleton: torch.nn.Module, target_modules: str | list[str] | None, layers: list[int]
) -> set[str]:
    """The HF parameter names that full fine-tuning trains (see ``FullFineTuning``'s ``target_modules``).

    Raises:
        ValueError: naming each ``target_modules`` entry that selects nothing, or when nothing would train.
    """
    modules = dict(skeleton.named_modules(remove_duplicate=False))
    names = [n for n, _ in skeleton.named_parameters(remove_duplicate=False)]
    targets = [target_modules] if isinstance(target_modules, str) else target_modules

    def layer_of(name: str) -> int | None:
        match = re.match(r"model\.layers\.(\d+)\.", name)
        return int(match.group(1)) if match else None

    def selected(name: str, entries: list[str]) -> bool:
        module = name.rpartition(".")[0]
        if ALL_LINEAR in entries and layer_of(name) is not None and isinstance(modules[module], torch.nn.Linear):
            return True
        parts = module.split(".")
        ancestors = [".".join(parts[: i + 1]) for i in range(len(parts))]
        return any(a == t or a.endswith("." + t) for a in ancestors for t in entries if t != ALL_LINEAR)

    if targets is not None:
        unmatched = [t for t in targets if not any(selected(n, [t]) for n in names)]
        if unmatched:
            leaves = sorted({m.rsplit(".", 1)[-1] for m in modules if m and not m.rsplit(".", 1)[-1].isdigit()})
            raise ValueError(
                f"model.method.target_modules entries {unmatched} match no module of the model; its modules are "
                f"{leaves} (or use '{ALL_LINEAR}', or leave target_modules unset to train everything)"
            )
    chosen = {
        n for n in names if (layer_of(n) is None or layer_of(n) in layers) and (targets is None or selected(n, targets))
    }
    if getattr(skeleton.config, "tie_word_embeddings", False) and chosen & TIED:
        chosen |= TIED & set(names)
    if not chosen:
        raise ValueError(
            f"model.method.target_modules={target_modules!r} with model.method.layers_to_transform selects no "
            "parameter; nothing would train"
        )
    return chosen


__all__ = ["FullFineTuning", "full_trainable_parameters"]
