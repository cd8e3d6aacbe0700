"""Data: sources -> documents -> token sequences (cached) -> batches of one optimizer step."""

from lit_qlp.data.sources import DatasetSource
from lit_qlp.data.text import TextDataModule

__all__ = ["DatasetSource", "TextDataModule"]
