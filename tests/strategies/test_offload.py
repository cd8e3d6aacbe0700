"""Activation offload (lit_qlp/strategies/offload.py): the gradients of the plain forward; its option checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn


def _offload_layer():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 6), nn.Dropout(0.3), nn.Tanh(), nn.Linear(6, 6))


@pytest.mark.parametrize("input_requires_grad", [True, False])
def test_offloaded_checkpoint_gives_the_gradients_of_the_plain_forward(input_requires_grad):
    """Same outputs and gradients (dropout replayed), also when the input does not require grad (stage 0)."""
    from lit_qlp.strategies.offload import offloaded_checkpoint

    def run(layer, x, positions):
        return layer(x), positions

    grads = []
    for checkpointed in (False, True):
        layer = _offload_layer()
        x = torch.randn(3, 6, generator=torch.Generator().manual_seed(1)).requires_grad_(input_requires_grad)
        positions = torch.arange(3)
        torch.manual_seed(7)
        if checkpointed:
            out, passed = offloaded_checkpoint(lambda *a: run(layer, *a), x, positions)
        else:
            out, passed = run(layer, x, positions)
        assert passed is positions  # the same tensor goes on (models.pipeline.PositionCache keys on it)
        (out * torch.arange(6.0)).sum().backward()
        grads.append([p.grad.clone() for p in layer.parameters()] + ([x.grad.clone()] if input_requires_grad else []))
    for plain, offloaded in zip(*grads):
        torch.testing.assert_close(offloaded, plain)


def test_activation_offload_needs_activation_checkpointing():
    from lit_qlp.strategies import PipelineStrategy

    with pytest.raises(ValueError, match="activation_offload=True .*activation_checkpointing=True"):
        PipelineStrategy(activation_checkpointing=False, activation_offload=True)


def test_each_backward_prefetches_for_the_checkpoint_whose_output_it_took(monkeypatch):
    """A checkpoint's backward pass starts the copies back for the checkpoint that made its input, the one whose
    backward pass comes next (on CUDA; on the CPU there is nothing to copy); the first, whose input no checkpoint
    made, starts none. Micro-batches are chains of their own."""
    from lit_qlp.strategies import offload

    prefetched = []
    monkeypatch.setattr(offload, "_prefetch", lambda ctx: prefetched.append(ctx.function.__name__))

    def first(h, positions):
        return h * 2, positions

    def second(h, positions):
        return h.sin(), positions

    def third(h, positions):
        return h * 3, positions

    chains = []
    for _ in range(2):  # two micro-batches, the second's forward before the first's backward
        h = torch.randn(4, requires_grad=True)
        x = (h, torch.arange(4))
        for function in (first, second, third):
            x = offload.offloaded_checkpoint(function, *x)
        chains.append((h, x[0]))
    for h, out in chains:
        out.sum().backward()
        torch.testing.assert_close(h.grad, 6 * (2 * h.detach()).cos())
    assert prefetched == ["second", "first", "second", "first"]
