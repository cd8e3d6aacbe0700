"""What a checkpointed decoder layer's forward pass keeps for its recomputation in the backward pass, so that the
recomputation skips the expensive parts: the MLP (``lit_qlp.models.chunked``) and the attention kernel.

Activation checkpointing recomputes the whole layer to rebuild the autograd graph its backward needs. Two parts of
that recomputation are pure waste at long sequences: the attention kernel's forward (O(seq²): at seq 65536 about a
third of a Llama-3-8B step's FLOPs), whose backward needs only its output and log-sum-exp, and, with a chunked MLP
that recomputes itself chunk by chunk in its own backward, the MLP's forward. lit_qlp's offloaded checkpoint
(``lit_qlp.strategies.offload``) opens a ``CheckpointStash`` around the layer's forward pass (``stashing``, recording)
and its recomputation (replaying): the forward pass keeps those outputs (on the host), the recomputation takes them
back in the same order instead of computing them.

The attention kernel is caught below autograd (``KeepAttention``, a ``TorchDispatchMode`` around transformers' SDPA
call): in the recomputation the attention op's autograd node is built as usual, around the kept outputs, and its
backward runs the kernel's own backward on them. A kernel the recomputation calls with other arguments than the
forward pass did (another backend, another shape) runs as usual; nothing is taken for it.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any

import torch

from lit_qlp.compat.torch import torch_dispatch_mode, tree_map


class _Offloaded:
    """A kept tensor, the device it goes back to and, once ``CheckpointStash.prefetch`` started its copy back, what
    gives that copy."""

    def __init__(self, tensor: torch.Tensor, device: torch.device) -> None:
        self.tensor = tensor
        self.device = device
        self.ready: Callable[[], torch.Tensor] | None = None


class _NoRoom(Exception):
    """The stash's ``offload`` found no room for a tensor."""


class CheckpointStash:
    """Values a checkpointed function's forward pass keeps for its recomputation, in call order, each under a tag:
    the forward pass ``keep`` s, the recomputation ``take`` s them back in the same order.

    Args:
        offload: Where a kept tensor is stored (``lit_qlp.strategies.offload`` copies a CUDA tensor to pinned host
            memory on a side stream), or None where there is no room for it: then nothing of that entry is kept,
            and the recomputation computes what it would have taken. By default a tensor stays where it is. Other
            values are kept as they are.
    """

    def __init__(self, offload: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.offload = offload
        self.entries: list[tuple[Any, Any]] = []
        self.replaying = False
        self._next = 0

    def _store(self, value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        stored = self.offload(value) if self.offload is not None else value
        if stored is None:
            raise _NoRoom
        return _Offloaded(stored, value.device)

    @staticmethod
    def _restore(value: Any) -> Any:
        if isinstance(value, _Offloaded):
            if value.ready is not None:
                return value.ready()
            # detached: a tensor of its own, on which the recomputation's autograd history goes
            return value.tensor.to(value.device, non_blocking=True).detach()
        return value

    def prefetch(self, fetch: Callable[[torch.Tensor, torch.device], Callable[[], torch.Tensor]]) -> None:
        """Starts bringing every kept tensor not yet taken back to its device, ahead of the recomputation:
        ``fetch(stored, device)`` starts the copy and returns what gives it (``take`` then uses that). Tensors
        already on their device are left as they are."""

        def start(value: Any) -> Any:
            if isinstance(value, _Offloaded) and value.ready is None and value.tensor.device != value.device:
                value.ready = fetch(value.tensor, value.device)
            return value

        for _, values in self.entries[self._next :]:
            tree_map(start, values, is_leaf=lambda v: isinstance(v, _Offloaded))

    def keep(self, tag: Any, values: Any) -> bool:
        """Stores ``values`` (a tensor or a nest of tuples and lists of them and other values) under ``tag``;
        whether there was room for them."""
        try:
            stored = tree_map(self._store, values, is_leaf=lambda v: isinstance(v, torch.Tensor))
        except _NoRoom:
            return False
        self.entries.append((tag, stored))
        return True

    def take(self, tag: Any) -> Any | None:
        """The next kept values, back on their devices, if they were kept under ``tag``; else None (nothing taken)."""
        if self._next >= len(self.entries) or self.entries[self._next][0] != tag:
            return None
        _, values = self.entries[self._next]
        self.entries[self._next] = (None, None)  # freed as soon as it is taken
        self._next += 1
        return tree_map(self._restore, values, is_leaf=lambda v: isinstance(v, _Offloaded))


_STASH: contextvars.ContextVar[CheckpointStash | None] = contextvars.ContextVar("lit_qlp_stash", default=None)


def current_stash() -> CheckpointStash | None:
    """The stash of the checkpointed forward pass or recomputation running now, or None."""
    return _STASH.get()


@contextlib.contextmanager
def stashing(stash: CheckpointStash, replaying: bool) -> Iterator[CheckpointStash]:
    """Inside, ``ChunkedMLP`` s and ``KeepAttention`` keep their outputs in ``stash`` (``replaying=False``: a
    checkpointed forward pass) or take them from it instead of computing (``replaying=True``: its recomputation)."""
    stash.replaying = replaying
    token = _STASH.set(stash)
    try:
        yield stash
    finally:
        _STASH.reset(token)


def _attention_ops() -> dict[Any, int | None]:
    """torch's fused attention kernels (forward ops), each with the index of its ``compute_log_sumexp`` argument
    (None where it always computes it): what SDPA dispatches to on CUDA and on the CPU."""
    aten = torch.ops.aten
    found = {}
    for name, logsumexp in (
        ("_scaled_dot_product_flash_attention", None),
        ("_scaled_dot_product_cudnn_attention", 4),
        ("_scaled_dot_product_efficient_attention", 4),
        ("_scaled_dot_product_flash_attention_for_cpu", None),
    ):
        packet = getattr(aten, name, None)
        if packet is not None:
            found[packet.default] = logsumexp
    return found


ATTENTION_OPS = _attention_ops()


def _signature(func: Any, args: tuple, kwargs: dict) -> tuple:
    """What must agree between the forward pass's call of an attention op and the recomputation's: the op, the
    inputs' shapes and dtypes, and the other arguments (``compute_log_sumexp`` left out: the kept call computed it)."""
    logsumexp = ATTENTION_OPS[func]

    def describe(value: Any) -> Any:
        return (tuple(value.shape), value.dtype) if isinstance(value, torch.Tensor) else value

    positional = tuple(describe(arg) for index, arg in enumerate(args) if index != logsumexp)
    return (str(func), positional, tuple(sorted((key, describe(value)) for key, value in kwargs.items())))


class KeepAttention(torch_dispatch_mode()):
    """Keeps the outputs of torch's fused attention kernels in ``stash`` while it records, and gives them back
    instead of running the kernel while it replays (module docstring). Every other op runs as usual.

    A kernel that computes the log-sum-exp only for a backward pass (cuDNN, memory-efficient) is made to compute it
    when kept, since the recomputation's backward needs it.
    """

    def __init__(self, stash: CheckpointStash) -> None:
        super().__init__()
        self.stash = stash

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in ATTENTION_OPS:
            return func(*args, **kwargs)
        tag = _signature(func, args, kwargs)
        if self.stash.replaying:
            kept = self.stash.take(tag)
            return kept if kept is not None else func(*args, **kwargs)
        logsumexp = ATTENTION_OPS[func]
        if logsumexp is not None and len(args) > logsumexp and not args[logsumexp]:
            args = (*args[:logsumexp], True, *args[logsumexp + 1 :])
        outputs = func(*args, **kwargs)
        self.stash.keep(tag, outputs)
        return outputs


@torch.compiler.disable  # a compiled decoder layer breaks its graph here: a dispatch mode runs eagerly
def kept_attention(attention: Callable, *args, **kwargs):
    """``attention(*args, **kwargs)`` (transformers' SDPA forward) under ``KeepAttention`` when a stash is open."""
    stash = current_stash()
    if stash is None:
        return attention(*args, **kwargs)
    with KeepAttention(stash):
        return attention(*args, **kwargs)


__all__ = ["ATTENTION_OPS", "CheckpointStash", "KeepAttention", "current_stash", "kept_attention", "stashing"]
