"""Adapters trained on frozen base weights, and the Protocol they share."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class AdapterModule(Protocol):
    """A module that adds a trained change to frozen weights (``LoraLinear``, ``ControlAdapterLayer``)."""

    def update_norm(self) -> torch.Tensor:
        """The size of the change it makes (0-dim, on its device): what the adapter norm metrics report."""
        ...


__all__ = ["AdapterModule"]
