"""Lightning callbacks of lit_qlp (one behaviour each)."""

from lit_qlp.callbacks.export import EpochExport

__all__ = ["EpochExport"]
