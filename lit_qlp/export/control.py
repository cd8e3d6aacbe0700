"""Control Adapter conversions and analysis (library code of tools/control_adapter_to_lora.py and
tools/analyze_control_adapters.py).

What the LoRA conversion reproduces. A Control Adapter at class +1 turns a decoder layer's residual update
``δ = attn_out + mlp_out`` into ``δ + Q diag(λ) Qᵀ δ`` with ``λ = expm1(S)`` (``expm1(-S)`` for class -1). A LoRA
on ``mlp.down_proj`` with ``B = Q diag(λ)`` and ``A = Qᵀ W_down`` adds exactly ``Q diag(λ) Qᵀ mlp_out`` (``BA x =
Q diag(λ) Qᵀ W_down x``; ``down_proj`` has no bias in the supported families): the MLP's share of the update, at
every position (a LoRA has no control classes: it is the adapter at class +1, or -1 with ``inverse``, everywhere).
The attention's share ``Q diag(λ) Qᵀ attn_out`` is not reproduced. With ``o_proj=True`` it is added at
``self_attn.o_proj`` as well; for parallel-block layers (Cohere: ``out = h + attn(norm h) + mlp(norm h)``) the
two LoRAs together are then exactly the Control Adapter. For sequential layers (Llama and most others) the
attention LoRA also changes the MLP's input, so ``o_proj=True`` is not exact there.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from lit_qlp.formats.control import load_control_adapter
from lit_qlp.formats.hf import copy_tokenizer_files
from lit_qlp.formats.peft import PEFT_PREFIX, peft_adapter_config, save_peft_adapter


def control_adapter_to_lora(
    base_dir: Path, adapter_dir: Path, output_dir: Path, inverse: bool = False, o_proj: bool = False
) -> dict[str, torch.Tensor]:
    """Writes a PEFT LoRA (rank r, alpha r) equivalent to the Control Adapter's MLP share; see the module notes.

    Args:
        base_dir: The base model the adapter was trained on (its ``down_proj`` / ``o_proj`` weights are read).
        adapter_dir: The Control Adapter (``adapter_config.json`` + ``adapter_model.safetensors``).
        output_dir: Where the LoRA goes; must not exist or be empty.
        inverse: Convert class -1 (``λ = expm1(-S)``) instead of class +1.
        o_proj: Also target ``self_attn.o_proj`` (exact for parallel-block models such as Cohere).

    Returns:
        The LoRA tensors under PEFT's keys.
    """
    from transformers import AutoConfig

    from lit_qlp.formats.hf import CheckpointReader

    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        raise FileExistsError(f"--output {output_dir} exists and is not empty; choose a new directory")
    config, adapters = load_control_adapter(adapter_dir)
    base = AutoConfig.from_pretrained(base_dir)
    reader = CheckpointReader(Path(base_dir), base.model_type, bool(getattr(base, "tie_word_embeddings", False)))
    targets = ["mlp.down_proj"] + (["self_attn.o_proj"] if o_proj else [])
    tensors = {}
    for index, (q, s) in adapters.items():
        q, s = q.double(), s.double()
        lam = torch.expm1(-s if inverse else s)
        b = q * lam  # Q diag(λ)
        for target in targets:
            name = f"model.layers.{index}.{target}"
            try:
                weight = reader.get(f"{name}.weight").double()
            except KeyError as error:
                raise ValueError(
                    f"{base_dir} has no linear {name} (fused MoE experts are not converted); this conversion "
                    "needs a dense mlp.down_proj"
                ) from error
            if weight.shape[0] != q.shape[0]:
                raise ValueError(f"{name} has {weight.shape[0]} outputs but the adapter's Q has {q.shape[0]} rows")
            tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = (q.T @ weight).float().contiguous()
            tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b.float().contiguous()
    rank = config["r"]
    lora_config = peft_adapter_config(
        base_model=str(base_dir),
        rank=rank,
        alpha=rank,
        dropout=0.0,
        target_modules=[t.rsplit(".", 1)[-1] for t in targets],
        layers_to_transform=sorted(adapters),
    )
    save_peft_adapter(output_dir, tensors, lora_config)
    copy_tokenizer_files(base_dir, output_dir)
    return tensors


def analyze_control_adapter(adapter_dir: Path, device: str = "cpu") -> list[dict[str, float]]:
    """Per layer: orthogonality error, effective rank, spectrum of λ, condition number of Q and the inverse error.

    - ``orthogonality``: ‖QᵀQ - I‖_F.
    - ``effective_rank``: exp(entropy) of the normalised singular values of ``Q diag(λ)``: how many directions
      the adapter really uses (r at most).
    - ``lambda_min`` / ``lambda_median`` / ``lambda_max``: of ``λ = expm1(S)`` (class +1).
    - ``condition``: σ_max / σ_min of Q (1 for orthonormal columns).
    - ``inverse_error``: ‖(I + Q diag(λ+) Qᵀ)(I + Q diag(λ-) Qᵀ) - I‖_F, computed in rank space as
      ``tr(Mᵀ G M G)`` with ``G = QᵀQ`` and ``M = diag(λ+) + diag(λ-) + diag(λ+) G diag(λ-)``: how far -1 undoes
      +1.
    """
    _, adapters = load_control_adapter(adapter_dir)
    rows = []
    for index, (q, s) in adapters.items():
        q, s = q.to(device, torch.float64), s.to(device, torch.float64)
        gram = q.T @ q
        eye = torch.eye(q.shape[1], device=device, dtype=torch.float64)
        positive, negative = torch.expm1(s), torch.expm1(-s)
        sigma_q = torch.linalg.svdvals(q)
        sigma = torch.linalg.svdvals(q * positive)
        p = sigma / sigma.sum() if sigma.sum() > 0 else sigma
        entropy = -(p[p > 0] * p[p > 0].log()).sum()
        m = torch.diag(positive) + torch.diag(negative) + torch.diag(positive) @ gram @ torch.diag(negative)
        inverse_error = torch.trace(m.T @ gram @ m @ gram).clamp(min=0).sqrt()
        rows.append(
            {
                "layer": index,
                "orthogonality": float(torch.linalg.matrix_norm(gram - eye)),
                "effective_rank": float(entropy.exp()) if sigma.sum() > 0 else 0.0,
                "lambda_min": float(positive.min()),
                "lambda_median": float(positive.median()),
                "lambda_max": float(positive.max()),
                "condition": float(sigma_q.max() / sigma_q.min()) if sigma_q.min() > 0 else math.inf,
                "inverse_error": float(inverse_error),
            }
        )
    return rows


__all__ = ["analyze_control_adapter", "control_adapter_to_lora"]
