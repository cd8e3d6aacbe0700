"""Lightning callbacks of lit_qlp (one behaviour each)."""

from lit_qlp.callbacks.adapters import AdapterNormLogging, CompositeWeightDecay, ControlAdapterRegularizer
from lit_qlp.callbacks.checkpoint import RunCheckpoint
from lit_qlp.callbacks.evaluation import EvaluationReport
from lit_qlp.callbacks.export import EpochExport
from lit_qlp.callbacks.interrupt import InterruptCheckpoint
from lit_qlp.callbacks.progress import ProgressReport
from lit_qlp.callbacks.schedule import RMSRatioSchedule

__all__ = [
    "AdapterNormLogging",
    "CompositeWeightDecay",
    "ControlAdapterRegularizer",
    "EpochExport",
    "EvaluationReport",
    "InterruptCheckpoint",
    "ProgressReport",
    "RMSRatioSchedule",
    "RunCheckpoint",
]
