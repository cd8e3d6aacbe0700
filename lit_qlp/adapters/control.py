"""Control Adapters: a multiplicative, two-directional change of what a decoder layer adds to the residual stream.

A decoder layer maps ``h`` to ``h + δ``. The adapter of layer i holds ``Q`` (H×r, orthonormal columns) and ``S``
(r). At positions of control class +1 it turns ``δ`` into ``δ + Q diag(expm1(S)) Qᵀ δ``, at class -1 into
``δ + Q diag(expm1(-S)) Qᵀ δ``, and leaves class 0 alone. With ``QᵀQ = I`` the two are exact inverses:
``(I + Q diag(e^S - 1) Qᵀ)(I + Q diag(e^-S - 1) Qᵀ) = I``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from lit_qlp.adapters.lora import layer_generator


def control_scale(classes: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Per position and rank component: ``expm1(S)`` at class +1, ``expm1(-S)`` at class -1, 0 at class 0.

    Args:
        classes: [batch, seq] integers in {-1, 0, 1}.
        s: [r].

    Returns:
        [batch, seq, r] in ``s``'s dtype.
    """
    positive, negative = torch.expm1(s), torch.expm1(-s)
    c = classes.unsqueeze(-1)
    zero = torch.zeros((), dtype=s.dtype, device=s.device)
    return torch.where(c == 1, positive, torch.where(c == -1, negative, zero))


class ControlAdapterLayer(nn.Module):
    """A decoder layer wrapped with a Control Adapter; called like the layer plus ``control_classes``.

    Args:
        base_layer: The HF decoder layer (frozen).
        hidden_size: H.
        rank: r.
        dropout: Dropout on ``δ`` before it enters the adapter.
        dtype: Dtype of ``Q`` and ``S``; ``δ`` is cast to it and the adapter output cast back.
        generator: RNG for ``Q``'s orthogonal initialisation (seeded per layer, so every pipeline layout starts
            alike).
    """

    takes_control_classes = True

    def __init__(
        self,
        base_layer: nn.Module,
        hidden_size: int,
        rank: int,
        dropout: float = 0.0,
        dtype: torch.dtype = torch.float32,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if rank > hidden_size:
            raise ValueError(f"control adapter rank {rank} exceeds the hidden size {hidden_size}")
        self.base_layer = base_layer
        device = next(base_layer.parameters()).device
        q = torch.empty(hidden_size, rank, dtype=torch.float32)
        nn.init.orthogonal_(q, generator=generator)
        self.control_Q = nn.Parameter(q.to(device=device, dtype=dtype))
        self.control_S = nn.Parameter(torch.zeros(rank, device=device, dtype=dtype))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, hidden_states: torch.Tensor, *args, control_classes: torch.Tensor, **kwargs) -> torch.Tensor:
        output = self.base_layer(hidden_states, *args, **kwargs)
        delta = self.dropout(output - hidden_states).to(self.control_Q.dtype)
        scaled = (delta @ self.control_Q) * control_scale(control_classes, self.control_S)
        return output + (scaled @ self.control_Q.T).to(output.dtype)

    @torch.no_grad()
    def update_norm(self) -> torch.Tensor:
        """The largest gain of the adapter on ``δ``, ``max |expm1(S)|``; 0-dim."""
        return torch.expm1(self.control_S.float()).abs().max()


class ControlAdapter:
    """Wraps the selected decoder layers in ``ControlAdapterLayer``; called as ``adapter(layer, index, prefix)``.

    Args:
        rank: r.
        dropout: Dropout on ``δ``.
        layers: Indices of the decoder layers that get adapters.
        hidden_size: H.
        dtype: Dtype of ``Q`` and ``S``.
        seed: Base seed of the per-layer initialisation RNG.
    """

    def __init__(
        self, rank: int, dropout: float, layers: Iterable[int], hidden_size: int, dtype: torch.dtype, seed: int
    ) -> None:
        self.rank = rank
        self.dropout = dropout
        self.layers = set(layers)
        self.hidden_size = hidden_size
        self.dtype = dtype
        self.seed = seed

    def __call__(self, layer: nn.Module, index: int, prefix: str) -> nn.Module:
        if index not in self.layers:
            return layer
        generator = layer_generator(self.seed, index)
        return ControlAdapterLayer(layer, self.hidden_size, self.rank, self.dropout, self.dtype, generator)


@torch.no_grad()
def regularize_(adapter: ControlAdapterLayer, gamma: float, lr: float, weight_decay: float) -> dict[str, float]:
    """The step after each optimizer step: ``Q ← Q - γ Q (QᵀQ - I)`` and ``S ← S - lr·weight_decay·S``.

    Computed in float32 and written back in the parameters' dtype. Returns this layer's metrics: ``norm``
    (max |expm1(S)| after the step), ``orthogonality`` (‖QᵀQ - I‖²_F after the step) and ``weight_decay`` (how
    much the decay lowered the norm).
    """
    q = adapter.control_Q.float()
    eye = torch.eye(q.shape[1], device=q.device)
    q = q - gamma * q @ (q.T @ q - eye)
    adapter.control_Q.copy_(q)
    s = adapter.control_S.float()
    before = torch.expm1(s).abs().max()
    if weight_decay:
        s = s - lr * weight_decay * s
        adapter.control_S.copy_(s)
    after = torch.expm1(adapter.control_S.float()).abs().max()
    q = adapter.control_Q.float()
    return {
        "norm": float(after),
        "orthogonality": float((q.T @ q - eye).square().sum()),
        "weight_decay": float(before - after),
    }


__all__ = [
    "ControlAdapter",
    "ControlAdapterLayer",
    "control_scale",
    "regularize_",
]
