"""Long sequences: a decoder layer's MLP run over the sequence in chunks of tokens, recomputed chunk by chunk in the
backward pass, so that its [seq, intermediate] activations never exist for the whole sequence.

An MLP computes each token on its own (an MoE routes each token on its own), so the chunks give exactly the
whole-sequence result. At seq 65536 a Llama-3-8B MLP's gate, up, activation and product are four [65536, 14336]
tensors, 7 GiB in bf16 (and their gradients as many again) inside the recomputed layer of activation
checkpointing: with chunks of 4096 tokens a sixteenth of that.

Under lit_qlp's offloaded checkpoint (``lit_qlp.strategies.offload``) the MLP's output, [seq, hidden], is also kept
in pinned CPU memory during the forward pass (``lit_qlp.models.stash``), so that the layer's recomputation in the
backward pass takes it from there instead of running the MLP once more: the MLP then runs forward twice per step
(forward, and chunk by chunk in its backward), as it does under plain checkpointing.
"""

from __future__ import annotations

import torch
from torch import nn

from lit_qlp.compat.torch import share_contents
from lit_qlp.models.stash import current_stash


class _RngState:
    """The CPU generator's state and the device's (a plain object: a stash keeps it as it is)."""

    def __init__(self, device: torch.device) -> None:
        self.cpu = torch.get_rng_state()
        self.device = torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(device: torch.device, state: _RngState) -> None:
    torch.set_rng_state(state.cpu)
    if state.device is not None:
        torch.cuda.set_rng_state(state.device, device)


class _ChunkedMLPFunction(torch.autograd.Function):
    """``mlp(x)`` computed in chunks of tokens without keeping activations; the backward pass recomputes each chunk
    with gradients and back-propagates it before the next. ``params`` are the MLP's trainable tensors (inputs here
    so that autograd gives them their summed gradients)."""

    @staticmethod
    def forward(ctx, chunked: ChunkedMLP, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        ctx.chunked = chunked
        ctx.params = params
        ctx.rng = _RngState(x.device)  # dropout inside the MLP: the backward's chunks draw the same masks
        ctx.save_for_backward(x)
        stash = current_stash()
        tag = ("mlp", tuple(x.shape))
        kept = stash.take(tag) if stash is not None and stash.replaying else None
        if kept is not None:
            out, rng_after = kept
            _set_rng_state(x.device, rng_after)  # as if the MLP had run (and drawn its random numbers)
            return out
        with torch.no_grad():
            out = chunked.run(x)
        if stash is not None and not stash.replaying:  # kept if the host has room, else recomputed
            stash.keep(tag, (out, _RngState(x.device)))
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (x,) = ctx.saved_tensors
        chunked, params = ctx.chunked, ctx.params
        x_needs_grad = ctx.needs_input_grad[1]
        wanted = [i for i, p in enumerate(params) if ctx.needs_input_grad[2 + i]]
        grad_x = torch.empty_like(x) if x_needs_grad else None
        sums: list[torch.Tensor | None] = [None] * len(params)
        devices = [x.device] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            _set_rng_state(x.device, ctx.rng)
            for start, stop in chunked.spans(x):
                piece = x[..., start:stop, :].detach().requires_grad_(x_needs_grad)
                inputs = ([piece] if x_needs_grad else []) + [params[i] for i in wanted]
                grads = torch.autograd.grad(
                    chunked.call(piece), inputs, grad_out[..., start:stop, :], allow_unused=True
                )
                if x_needs_grad:
                    grad_x[..., start:stop, :] = grads[0]
                    grads = grads[1:]
                for i, grad in zip(wanted, grads):
                    if grad is not None:  # None: an expert no token of this chunk was routed to
                        sums[i] = grad.float() if sums[i] is None else sums[i].add_(grad)
        param_grads = [None if total is None else total.to(param.dtype) for total, param in zip(sums, params)]
        return (None, grad_x, *param_grads)


class ChunkedMLP(nn.Module):
    """A decoder layer's MLP computed over the sequence in chunks of ``chunk_tokens`` tokens
    (``_ChunkedMLPFunction``); a sequence of at most ``chunk_tokens`` tokens runs the MLP as it is.

    It takes the MLP's place in the layer as a view of it: the same children, parameters and buffers (the very
    same dictionaries), so every name in state dicts, checkpoints and exported adapters stays what it was, and
    whatever the MLP's own class does (its forward, on each chunk) is unchanged. Any further outputs of the MLP
    (gpt_oss's router scores, which its decoder layer discards) come back as None.

    Args:
        mlp: The decoder layer's MLP (with its adapters), e.g. ``layer.mlp``.
        chunk_tokens: Tokens per chunk.
    """

    def __init__(self, mlp: nn.Module, chunk_tokens: int) -> None:
        super().__init__()
        if chunk_tokens < 1:
            raise ValueError(f"model.mlp_chunk_tokens={chunk_tokens} must be a positive number of tokens")
        share_contents(self, mlp)
        self._mlp = (mlp,)  # a tuple keeps the original out of the module tree (its children are already ours)
        self.chunk_tokens = chunk_tokens
        self.extra_outputs: int | None = None  # learnt from the first call

    def extra_repr(self) -> str:
        return f"{type(self._mlp[0]).__name__}, chunk_tokens={self.chunk_tokens}"

    def train(self, mode: bool = True) -> ChunkedMLP:
        self._mlp[0].training = mode  # the MLP's own forward may read it (Mixtral's router jitter)
        return super().train(mode)

    def compile_mlp(self) -> None:
        """``torch.compile`` the MLP that each chunk runs."""
        self._mlp[0].compile()

    def call(self, x: torch.Tensor) -> torch.Tensor:
        """The MLP on ``x`` (hooks on it included), its first output only."""
        out = self._mlp[0](x)
        if isinstance(out, tuple):
            self.extra_outputs = len(out) - 1
            out = out[0]
        return out

    def spans(self, x: torch.Tensor) -> list[tuple[int, int]]:
        """``(start, stop)`` of each chunk along ``x``'s token dimension (-2)."""
        tokens = x.shape[-2]
        return [(start, min(start + self.chunk_tokens, tokens)) for start in range(0, tokens, self.chunk_tokens)]

    def run(self, x: torch.Tensor) -> torch.Tensor:
        """The MLP's output on ``x``, computed chunk by chunk into one tensor."""
        out = None
        for start, stop in self.spans(x):
            piece = self.call(x[..., start:stop, :])
            if out is None:
                out = piece.new_empty(*x.shape[:-1], piece.shape[-1])
            out[..., start:stop, :] = piece
        return out

    @torch.compiler.disable  # a compiled decoder layer breaks its graph here: the backward calls autograd itself
    def forward(self, x: torch.Tensor):
        if x.shape[-2] <= self.chunk_tokens:
            return self._mlp[0](x)
        params = [p for p in self.parameters() if p.requires_grad]
        out = _ChunkedMLPFunction.apply(self, x, *params)
        return (out, *[None] * self.extra_outputs) if self.extra_outputs else out


def chunk_mlp(layer: nn.Module, chunk_tokens: int) -> ChunkedMLP:
    """Replaces the MLP of the decoder ``layer`` (the module named ``mlp``, also inside an adapter's wrapper of the
    layer) by a ``ChunkedMLP`` of it; returns that."""
    found = [(name, module) for name, module in layer.named_modules() if name.rpartition(".")[2] == "mlp"]
    if len(found) != 1:
        raise ValueError(
            f"model.long_context chunks a decoder layer's MLP, the module named 'mlp', but {type(layer).__name__} has "
            f"{len(found)} ({[name for name, _ in found]}); turn model.long_context off for this architecture"
        )
    name, mlp = found[0]
    parent_name, _, child = name.rpartition(".")
    parent = layer.get_submodule(parent_name) if parent_name else layer
    chunked = ChunkedMLP(mlp, chunk_tokens)
    setattr(parent, child, chunked)
    return chunked


__all__ = ["ChunkedMLP", "chunk_mlp"]
