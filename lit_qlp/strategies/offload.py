"""Activation checkpointing whose saved layer inputs live in CPU memory until the backward pass needs them."""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.weak import WeakTensorKeyDictionary

from lit_qlp.models.stash import CheckpointStash, stashing


@functools.cache
def _copy_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU copy of a CUDA tensor, made on a side stream into pinned memory so that compute does not wait."""
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    stream = _copy_stream(tensor.device)
    stream.wait_stream(torch.cuda.current_stream(tensor.device))
    with torch.cuda.stream(stream):
        host.copy_(tensor, non_blocking=True)
    tensor.record_stream(stream)  # its memory is not reused before the copy has read it
    return host


def _fetch(host: torch.Tensor, device: torch.device) -> Callable[[], torch.Tensor]:
    """Starts copying a pinned host tensor to ``device`` on the side stream, behind the GPU work queued so far (the
    copy's memory comes from the compute stream's pool), so that it overlaps the work queued after it. Returns what
    gives the copy: the compute stream waits for it there."""
    compute = torch.cuda.current_stream(device)
    stream = _copy_stream(device)
    copy = torch.empty(host.shape, dtype=host.dtype, device=device)
    stream.wait_stream(compute)
    with torch.cuda.stream(stream):
        copy.copy_(host, non_blocking=True)
    copy.record_stream(stream)  # not reused before the copy is done, even if it is never taken
    done = torch.cuda.Event()
    done.record(stream)

    def ready() -> torch.Tensor:
        torch.cuda.current_stream(device).wait_event(done)
        return copy

    return ready


def _prefetch(ctx) -> None:
    """Starts copying back what a checkpoint's backward pass will need (its offloaded inputs and kept outputs) while
    the backward pass of the layer after it runs: the copies then overlap that layer's computation instead of
    delaying the compute stream at the start of this one's. One layer ahead: one more layer's inputs and kept
    outputs in GPU memory."""
    if not ctx.cuda_rng or ctx.saved is None or ctx.ready is not None:
        return
    ctx.ready = [
        _fetch(saved, device)
        if isinstance(saved, torch.Tensor) and device is not None and saved.device != device
        else None
        for saved, device in zip(ctx.saved, ctx.devices)
    ]
    ctx.stash.prefetch(_fetch)


_PRODUCERS = WeakTensorKeyDictionary()
"""Output tensor of an offloaded checkpoint -> (a weak reference to) its context: the checkpoint that takes it as
input finds the one whose backward pass comes after its own, to prefetch for."""


HOST_FRACTION = 0.8
"""The share of the host memory available when training starts that offloaded tensors (layer inputs and kept
outputs) may hold at once, split between the processes of a node (counted as its visible GPUs)."""

KEPT_HOST_FRACTION = 0.5
"""The share of that limit that kept outputs may hold; the rest stays for layer inputs."""


class HostBudget:
    """Bytes of offloaded tensors in pinned host memory, against their limit: ``HOST_FRACTION`` of the memory
    available at the first request, divided by the node's GPUs; kept outputs (``lit_qlp.models.stash``) at most
    ``KEPT_HOST_FRACTION`` of it. A tensor returns its bytes when it is freed."""

    def __init__(self) -> None:
        self.limit: int | None = None
        self.live = 0
        self.kept_live = 0
        self.inputs_refused = 0

    def reserve(self, nbytes: int, kept: bool = False) -> bool:
        """Counts ``nbytes`` more (of a kept output, or of a layer input) if they fit under the limits; whether
        they did."""
        if self.limit is None:
            import psutil

            processes = max(torch.cuda.device_count(), 1)
            self.limit = int(psutil.virtual_memory().available * HOST_FRACTION / processes)
        if self.live + nbytes > self.limit:
            return False
        if kept and self.kept_live + nbytes > self.limit * KEPT_HOST_FRACTION:
            return False
        self.live += nbytes
        self.kept_live += nbytes if kept else 0
        return True

    def release(self, nbytes: int, kept: bool = False) -> None:
        self.live -= nbytes
        self.kept_live -= nbytes if kept else 0


HOST_BUDGET = HostBudget()


def _host_copy(tensor: torch.Tensor, kept: bool) -> torch.Tensor | None:
    """A pinned host copy of a CUDA tensor (a CPU tensor as it is) counted in ``HOST_BUDGET`` until it is freed, or
    None when the budget has no room for it."""
    nbytes = tensor.numel() * tensor.element_size()
    budget = HOST_BUDGET
    if not budget.reserve(nbytes, kept):
        return None
    host = _to_host(tensor) if tensor.is_cuda else tensor
    weakref.finalize(host, budget.release, nbytes, kept)
    return host


def _keep_on_host(tensor: torch.Tensor) -> torch.Tensor | None:
    """Where a stash keeps a tensor: a pinned host copy, or None (not kept) when ``HOST_BUDGET`` has no room."""
    return _host_copy(tensor, kept=True)


def _offload_input(tensor: torch.Tensor) -> torch.Tensor:
    """Where a checkpoint keeps a floating CUDA input until its backward pass: a pinned host copy, or the tensor itself
    on its GPU once ``HOST_BUDGET`` is full (warned once: the host memory, not the GPU's, is then the limit)."""
    host = _host_copy(tensor, kept=False)
    if host is not None:
        return host
    if HOST_BUDGET.inputs_refused == 0:
        rank_zero_warn(
            f"activation offload: the offloaded tensors fill their host memory budget ({HOST_BUDGET.limit / 2**30:.1f} "
            f"GiB, {HOST_FRACTION:.0%} of the host memory available at the start, split between the GPUs); further "
            "layer inputs stay in GPU memory. Shorter sequences or more pipeline stages take less host memory."
        )
    HOST_BUDGET.inputs_refused += 1
    return tensor


class _OffloadedCheckpoint(torch.autograd.Function):
    """Runs ``function(*inputs)`` without keeping activations; keeps floating CUDA inputs on the host (on their GPU
    once ``HOST_BUDGET`` is full).

    The backward pass copies the inputs back (or takes the copies that the next checkpoint's backward pass started,
    ``_prefetch``), recomputes the function with gradients and back-propagates through it. What the function keeps
    during the forward pass in a ``CheckpointStash`` (``lit_qlp.models.stash``: the outputs of chunked MLPs and of
    attention kernels under ``model.long_context``, also on the host) spares the recomputation those parts.
    ``anchor`` is an empty tensor that requires grad, so that the backward runs even when no input requires grad (the
    first stage, whose embedding output is frozen) and the parameters inside still get gradients.
    """

    @staticmethod
    def forward(ctx, function, anchor, passed, *inputs):
        ctx.function = function
        ctx.devices = [x.device if isinstance(x, torch.Tensor) else None for x in inputs]
        ctx.grad_inputs = [isinstance(x, torch.Tensor) and x.requires_grad for x in inputs]
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = {d: torch.cuda.get_rng_state(d) for d in set(ctx.devices) if d is not None and d.type == "cuda"}
        ctx.saved = [
            _offload_input(x) if isinstance(x, torch.Tensor) and x.is_cuda and x.is_floating_point() else x
            for x in inputs
        ]
        ctx.stash = CheckpointStash(offload=_keep_on_host)
        ctx.ready = None
        producers = [_PRODUCERS.get(x) for x in inputs if isinstance(x, torch.Tensor) and x.is_floating_point()]
        ctx.previous = next((p for p in producers if p is not None), None)
        with torch.no_grad(), stashing(ctx.stash, replaying=False):
            outputs = function(*inputs)
        single = isinstance(outputs, torch.Tensor)
        ctx.single = single
        outputs = (outputs,) if single else tuple(outputs)
        ctx.mark_non_differentiable(*[o for o in outputs if not o.is_floating_point()])
        for i, output in enumerate(outputs):
            if output.is_floating_point():
                _PRODUCERS[output] = weakref.ref(ctx)
            else:
                passed.update({i: j for j, x in enumerate(inputs) if output is x})
        return outputs[0] if single else outputs

    @staticmethod
    def backward(ctx, *grads):
        if ctx.cuda_rng:
            torch.cuda.current_stream().wait_stream(_copy_stream(next(iter(ctx.cuda_rng))))
        inputs = []
        ready = ctx.ready or [None] * len(ctx.saved)
        for saved, device, needs_grad, copy in zip(ctx.saved, ctx.devices, ctx.grad_inputs, ready):
            if copy is not None:
                saved = copy().detach().requires_grad_(needs_grad)
            elif isinstance(saved, torch.Tensor) and saved.is_floating_point():
                saved = saved.to(device, non_blocking=True).detach().requires_grad_(needs_grad)
            inputs.append(saved)
        previous = ctx.previous() if ctx.previous is not None else None
        if previous is not None:
            _prefetch(previous)
        with torch.random.fork_rng(devices=list(ctx.cuda_rng)):
            torch.set_rng_state(ctx.cpu_rng)
            for device, state in ctx.cuda_rng.items():
                torch.cuda.set_rng_state(state, device)
            with torch.enable_grad(), stashing(ctx.stash, replaying=True):
                outputs = ctx.function(*inputs)
        outputs = (outputs,) if ctx.single else tuple(outputs)
        pairs = [(o, g) for o, g in zip(outputs, grads) if o.requires_grad and g is not None]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        ctx.saved = ctx.stash = ctx.ready = None
        input_grads = [
            x.grad if isinstance(x, torch.Tensor) and needs else None for x, needs in zip(inputs, ctx.grad_inputs)
        ]
        return (None, None, None, *input_grads)


def offloaded_checkpoint(function, *inputs):
    """Activation checkpoint of ``function(*inputs)`` that keeps its floating CUDA inputs in pinned host memory
    (within ``HOST_BUDGET``; past it they stay on their GPU).

    A drop-in ``activation_checkpoint_func`` for DeepSpeed's PipelineModule. On CPU tensors it is a plain
    recomputing checkpoint (nothing to offload).
    """
    anchor = torch.empty(0, requires_grad=True)
    passed: dict[int, int] = {}  # output index -> input index, for integer inputs the function returned as they came
    outputs = _OffloadedCheckpoint.apply(function, anchor, passed, *inputs)
    if not passed:
        return outputs
    # autograd returns a new view of each; the input itself goes on instead, so that the next layer meets the same
    # position_ids tensor and reuses the mask and rotary tables computed for it (models.pipeline.PositionCache).
    if isinstance(outputs, torch.Tensor):
        return inputs[passed[0]]
    return tuple(inputs[passed[i]] if i in passed else output for i, output in enumerate(outputs))


__all__ = ["offloaded_checkpoint"]
