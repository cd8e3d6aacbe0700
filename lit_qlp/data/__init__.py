"""Data: sources -> documents -> token sequences -> batches of one optimizer step."""

from lit_qlp.data.text import DatasetSource, TextDataModule

__all__ = ["DatasetSource", "TextDataModule"]
