"""What trains, one module per method: ``model.method`` names one of these classes (``class_path`` /
``init_args`` in YAML), each with only its own options."""

from lit_qlp.methods.base import TrainingMethod
from lit_qlp.methods.control import ControlAdapters
from lit_qlp.methods.full import FullFineTuning
from lit_qlp.methods.lora import LoRA

__all__ = ["ControlAdapters", "FullFineTuning", "LoRA", "TrainingMethod"]
