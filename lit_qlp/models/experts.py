"""lit_qlp's forward of transformers' fused MoE experts: grouped matmuls over tokens sorted by expert, with
gathers (not scatter-adds) moving rows between token and expert order, and LoRA on the experts applied to the
activations (no [E, out, in] update is formed).

transformers 5.x runs an experts module (``@use_experts_implementation``: Mixtral, Qwen2/3-MoE, OLMoE, gpt-oss)
through the implementation its config names; lit_qlp registers this one as ``"lit_qlp_grouped"`` and the model
source selects it. For ``S = tokens · top_k`` (token, expert) pairs sorted by expert, with ``x_s`` the pair's token:

- up: ``u_s = x_s W_up[e_s]ᵀ (+ b_up[e_s]) + s_up · (x_s A_e_sᵀ) B_e_sᵀ``, one ``grouped_mm`` per term;
- the module's own gate (``_apply_gate``: SiLU-and-multiply, gpt-oss's clamped GLU on interleaved rows) or its
  activation;
- down the same way, then ``y_t = Σ_k w_tk · d_(t,k)``.

What differs from transformers' own "grouped_mm" is the cost, not the result: its ``hidden[perm // k]`` and
``out[inverse]`` are advanced indexing, whose backward is an accumulating ``index_put`` (a sort of S indices and a
scatter of S rows; a third of a Qwen3-30B-A3B QLoRA step on an H200), here two gathers: ``dispatch``'s backward sums
each token's k rows, ``combine``'s backward copies each token's gradient to its k rows. And a LoRA parametrization
(``ExpertLora``) on an expert tensor is read apart from the tensor: the grouped matmul runs on the base weight (the
4-bit dequantisation, when the base is 4-bit) and the low-rank term on the activations, r columns per pair, instead
of forming ``W + s · B A`` for all E experts twice per step. The rank is padded with zero rows to a multiple of 8,
as ``grouped_mm`` needs 16-byte strides.

``grouped_mm`` is ``torch.nn.functional.grouped_mm`` (torch 2.10+); where it cannot run (CUDA in a dtype other than
bfloat16, an older torch) each expert's rows are multiplied in turn.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from lit_qlp.adapters.experts import ExpertLora
from lit_qlp.compat.transformers import experts_activation, register_experts_implementation

IMPLEMENTATION = "lit_qlp_grouped"
"""The name under which this forward is registered in transformers' experts interface."""

RANK_ALIGNMENT = 8
"""LoRA ranks are padded to a multiple of this many columns (16-byte strides in bfloat16)."""


class Dispatch(torch.autograd.Function):
    """Rows of ``x`` [T, H] in (token, expert)-pair order sorted by expert: ``x[token_of_row]``, [S, H].

    The backward gathers each token's k rows (``rows_of_token`` [T, k]) and sums them.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, token_of_row: torch.Tensor, rows_of_token: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(rows_of_token)
        return x[token_of_row]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (rows_of_token,) = ctx.saved_tensors
        return grad[rows_of_token].sum(dim=1), None, None


class Combine(torch.autograd.Function):
    """Each token's sum of its k rows of ``y`` [S, H]: ``y[rows_of_token].sum(1)``, [T, H].

    The backward gathers each row's token gradient (``token_of_row`` [S]).
    """

    @staticmethod
    def forward(ctx, y: torch.Tensor, token_of_row: torch.Tensor, rows_of_token: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(token_of_row)
        return y[rows_of_token].sum(dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (token_of_row,) = ctx.saved_tensors
        return grad[token_of_row], None, None


def grouped_mm(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``x[rows of e] @ weight[e]`` for every expert ``e``: x [S, K], weight [E, K, N], offsets [E] (int32, the end
    row of each expert's rows) -> [S, N]."""
    # torch.compile's grouped_mm takes bf16 only, on every device; eager takes any dtype on the CPU.
    eager_cpu = x.device.type != "cuda" and not torch.compiler.is_compiling()
    fused = hasattr(F, "grouped_mm") and (x.dtype == torch.bfloat16 or eager_cpu)
    if fused:
        return F.grouped_mm(x, weight, offs=offsets)
    ends = offsets.tolist()
    starts = [0, *ends[:-1]]
    parts = [x[start:end] @ weight[e] for e, (start, end) in enumerate(zip(starts, ends))]
    return torch.cat(parts) if parts else x.new_zeros(0, weight.shape[-1])


def split_lora(module: nn.Module, name: str) -> tuple[torch.Tensor, ExpertLora | None]:
    """``module.<name>`` without its ``ExpertLora`` (every other parametrization applied in order: the 4-bit
    dequantisation) and that ``ExpertLora``, or None."""
    if not parametrize.is_parametrized(module, name):
        return getattr(module, name), None
    chain = module.parametrizations[name]
    weight, lora = chain.original, None
    for step in chain:
        if isinstance(step, ExpertLora):
            if lora is not None:
                raise ValueError(f"{name} of {type(module).__name__} has two expert LoRAs; one is supported")
            lora = step
        elif lora is not None:
            raise ValueError(
                f"{name} of {type(module).__name__} has a parametrization after its expert LoRA "
                f"({type(step).__name__}); lit_qlp's experts forward applies the LoRA last"
            )
        else:
            weight = step(weight)
    return weight, lora


def low_rank(x: torch.Tensor, lora: ExpertLora, offsets: torch.Tensor) -> torch.Tensor:
    """``s · (x A_eᵀ) B_eᵀ`` of every row's expert: two grouped matmuls of rank r (padded to ``RANK_ALIGNMENT``)."""
    a, b = lora.factors()  # [E, r, in], [E, out, r]
    a = a.to(x.dtype)
    pad = -lora.rank % RANK_ALIGNMENT
    if pad:
        a = F.pad(a, (0, 0, 0, pad))
    # [E, in, r] column-major as A is stored; B's columns are interleaved by expert, so [E, r, out] is copied.
    hidden = grouped_mm(x, a.transpose(1, 2), offsets)
    return grouped_mm(hidden, expert_b_rows(b, x.dtype, pad), offsets) * lora.scaling


@torch.compiler.disable
def expert_b_rows(b: torch.Tensor, dtype: torch.dtype, pad: int) -> torch.Tensor:
    """B_e of every expert as ``grouped_mm``'s right operand, [E, r + pad, out] row-major, in ``dtype``, its ``pad``
    extra rows zero.

    Run eagerly inside a compiled layer: Inductor (torch 2.11-2.13) fuses this copy into the matmul's input and may
    lay the buffer out with the experts innermost (strides [1, r, r·E] from PEFT's interleaved columns), which
    ``grouped_mm`` refuses ("Invalid strides/sizes").
    """
    return F.pad(b.to(dtype), (0, pad)).transpose(1, 2).contiguous()


def expert_linear(
    module: nn.Module, name: str, x: torch.Tensor, offsets: torch.Tensor, expert_of_row: torch.Tensor
) -> torch.Tensor:
    """One projection of every row by its expert: the base weight ``module.<name>``, its bias (``<name>_bias``)
    where the module has biases, and its LoRA."""
    weight, lora = split_lora(module, name)
    weight = weight if module.is_transposed else weight.transpose(1, 2)  # [E, in, out]
    out = grouped_mm(x.to(weight.dtype), weight, offsets)
    if module.has_bias:
        out = out + getattr(module, f"{name}_bias")[expert_of_row]
    if lora is not None:
        out = out + low_rank(x, lora, offsets).to(out.dtype)
    return out


def grouped_experts_forward(
    module: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The experts module's output for ``hidden_states`` [T, H] routed to ``top_k_index`` [T, k] with
    ``top_k_weights`` [T, k]: [T, H] in ``hidden_states``' dtype. The signature of transformers' experts
    implementations. Expert parallelism (experts sharded over processes) is not supported: lit_qlp never shards
    them."""
    tokens, top_k = top_k_index.shape
    expert_of_pair = top_k_index.reshape(-1)
    expert_of_row, pair_of_row = torch.sort(expert_of_pair, stable=True)
    row_of_pair = torch.empty_like(pair_of_row)
    row_of_pair[pair_of_row] = torch.arange(pair_of_row.numel(), device=pair_of_row.device)
    token_of_row = pair_of_row // top_k
    rows_of_token = row_of_pair.view(tokens, top_k)
    # The end row of each expert's rows, found in the sorted experts; torch.bincount would copy the minimum and
    # maximum to the host first (CUDA), a synchronisation per layer that leaves the GPU idle while the CPU catches up.
    experts = torch.arange(module.num_experts, device=expert_of_row.device, dtype=expert_of_row.dtype)
    offsets = torch.searchsorted(expert_of_row, experts, right=True, out_int32=True)

    x = Dispatch.apply(hidden_states, token_of_row, rows_of_token)
    up_name = "gate_up_proj" if module.has_gate else "up_proj"
    up = expert_linear(module, up_name, x, offsets, expert_of_row)
    activated = experts_activation(module)(up)
    down = expert_linear(module, "down_proj", activated, offsets, expert_of_row)
    if module.has_post_expert_norm:
        down = module.post_expert_norm(down)
    weighted = down * top_k_weights.reshape(-1)[pair_of_row].unsqueeze(-1)  # in the routing weights' dtype
    return Combine.apply(weighted, token_of_row, rows_of_token).to(hidden_states.dtype)


register_experts_implementation(IMPLEMENTATION, grouped_experts_forward)

__all__ = [
    "IMPLEMENTATION",
    "Combine",
    "Dispatch",
    "expert_linear",
    "grouped_experts_forward",
    "grouped_mm",
    "low_rank",
    "split_lora",
]
