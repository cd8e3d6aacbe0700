"""What lit_qlp relies on of PyTorch beyond its public API: a tensor's in-place version counter.

torch is imported inside the functions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def version_counter(tensor: torch.Tensor) -> int:
    """How many times ``tensor`` has been changed in place (autograd's ``_version``): equal values of one live
    tensor mean it was not written in between."""
    version = getattr(tensor, "_version", None)
    if not isinstance(version, int):
        import torch

        raise RuntimeError(
            f"torch {torch.__version__} tensors have no integer _version (lit_qlp uses it to know that a cached "
            "mask still matches its position_ids); lit_qlp/compat/torch.py needs updating for this torch version"
        )
    return version


__all__ = ["version_counter"]
