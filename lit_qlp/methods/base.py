"""What trains: the interface every training method implements (one module per method beside this one)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from lit_qlp.adapters.targeting import parse_layer_ranges

if TYPE_CHECKING:
    from lightning.pytorch.callbacks import Callback

    from lit_qlp.bases import BaseFormat
    from lit_qlp.data.sources import DatasetSource
    from lit_qlp.models.pipeline import LayerAdapter, ModelSource
    from lit_qlp.strategies.stages import StageGroup


class TrainingMethod(ABC):
    """What trains (LoRA, Control Adapters, the weights themselves), with that method's own options.

    A method is complete when built from its options; everything it derives from a model is computed from the
    ``ModelSource`` it is given. The LightningModule asks it for the decoder-layer adapter, the trainable base
    parameters, its default callbacks (post-step regularisation, norm logging) and to write the epoch export.

    Attributes:
        uses_control_classes: The method reads the datasets' ``control_class`` (only Control Adapters do).
        export_reads_base_weights: The export holds base weights (full fine-tuning writes a whole model), so a
            checkpoint conversion must load them; adapter exports hold only what trained.
    """

    uses_control_classes: ClassVar[bool] = False
    export_reads_base_weights: ClassVar[bool] = False

    def __init__(self, layers_to_transform: str | None = None) -> None:
        self.layers_to_transform = layers_to_transform

    def layers(self, source: ModelSource) -> list[int]:
        """The decoder layers this method trains or adapts (``layers_to_transform``; all by default)."""
        num_layers = source.quirks.num_layers
        return parse_layer_ranges(self.layers_to_transform, num_layers, key="model.method.layers_to_transform")

    def check(self, source: ModelSource, base: BaseFormat | None) -> None:
        """Raises ValueError, naming the option and what to change, when this method cannot train ``source`` with
        its frozen weights held in ``base``. Runs when the module is built, before anything is written."""
        self.layers(source)

    def check_data(self, datasets: Sequence[DatasetSource]) -> None:
        """Raises ValueError, naming the datasets and what to change, when this method cannot train on them; the
        default refuses ``control_class``, which only methods with ``uses_control_classes`` read."""
        steered = [s.dataset_path for s in datasets if s.control_class]
        if steered and not self.uses_control_classes:
            raise ValueError(
                f"data.datasets {steered} set control_class, which only Control Adapters use, but model.method is "
                f"{type(self).__name__}; set model.method to lit_qlp.methods.ControlAdapters or remove control_class"
            )

    def trainable(self, source: ModelSource) -> frozenset[str]:
        """HF names of the base model's parameters that train (none for adapter methods)."""
        return frozenset()

    def layer_adapter(self, source: ModelSource, seed: int) -> LayerAdapter | None:
        """What adds this method's adapters to each decoder layer as its stage builds it, or None."""
        return None

    def callbacks(self) -> list[Callback]:
        """The callbacks this method needs after each step (installed by ``CausalLMModule.configure_callbacks``)."""
        return []

    @abstractmethod
    def export(self, directory: Path, layers: list, stages: StageGroup, source: ModelSource) -> None:
        """Writes what trained into ``directory`` in its deployable format, with the tokenizer files. Collective.

        Args:
            directory: Where to write.
            layers: This process's pipeline layers.
            stages: Gathers the stages' tensors (the strategy, or ``SingleProcessStages``).
            source: The base model.
        """


def check_adapter_options(rank: int, dropout: float, weight_dtype: str, weight_decay: float) -> None:
    """Raises ValueError naming the ``model.method`` option for the options every adapter method shares."""
    if rank < 1:
        raise ValueError(f"model.method.rank={rank} must be a positive integer")
    if not 0 <= dropout < 1:
        raise ValueError(f"model.method.dropout={dropout} must be in [0, 1)")
    if weight_decay < 0:
        raise ValueError(f"model.method.weight_decay={weight_decay} must be >= 0")
    if weight_decay and weight_dtype != "float32":
        raise ValueError(
            f"model.method.weight_decay needs float32 adapter weights, but model.method.weight_dtype={weight_dtype!r}"
            "; set model.method.weight_dtype=float32"
        )


__all__ = ["TrainingMethod", "check_adapter_options"]
