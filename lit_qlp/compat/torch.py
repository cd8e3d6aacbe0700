"""What lit_qlp relies on of PyTorch beyond its public API: a tensor's in-place version counter, a module that is a
view of another's contents, torch's dispatch modes and pytree mapping.

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


def share_contents(view: torch.nn.Module, module: torch.nn.Module) -> None:
    """Makes ``view`` hold ``module``'s children, parameters and buffers: the very same dictionaries (``_modules``,
    ``_parameters``, ``_buffers``), so that the names under ``view`` are those under ``module`` and a change through
    either shows in both. Call it right after ``view``'s ``nn.Module.__init__``."""
    for name in ("_modules", "_parameters", "_buffers"):
        contents = getattr(module, name, None)
        if not isinstance(contents, dict):
            import torch

            raise RuntimeError(
                f"torch {torch.__version__} modules have no {name} dictionary (lit_qlp's ChunkedMLP shares it with "
                "the MLP it stands for); lit_qlp/compat/torch.py needs updating for this torch version"
            )
        object.__setattr__(view, name, contents)


def torch_dispatch_mode() -> type:
    """torch's ``TorchDispatchMode`` base class (operators below autograd; ``torch.utils._python_dispatch``)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    return TorchDispatchMode


def tree_map(function, tree, is_leaf=None):
    """``function`` applied to every leaf of a nest of tuples, lists and dicts (``torch.utils._pytree.tree_map``)."""
    from torch.utils._pytree import tree_map as map_leaves

    return map_leaves(function, tree, is_leaf=is_leaf)


__all__ = ["share_contents", "torch_dispatch_mode", "tree_map", "version_counter"]
