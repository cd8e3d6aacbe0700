"""A PEFT LoRA written as a llama.cpp LoRA adapter: ``llama-cli -m base.gguf --lora adapter.gguf``.

The layout follows llama.cpp's own converter (``convert_lora_to_gguf.py`` over ``convert_hf_to_gguf.py``) and
what its loader checks (``llama_adapter_lora_init_impl`` in ``src/llama-adapter.cpp``):

- A pair becomes two tensors named after the weight of the base GGUF: ``blk.3.attn_q.weight.lora_a`` and
  ``blk.3.attn_q.weight.lora_b``. The names come from the ``gguf`` package's ``TensorNameMap``.
- ``lora_a`` keeps PEFT's [r, in] and ``lora_b`` PEFT's [out, r] (numpy/torch order). GGUF records shapes in
  ggml order, reversed: lora_a ``ne = {in, r}``, lora_b ``ne = {r, out}``. The loader wants ``ne[0]`` of the base
  weight (in) equal to lora_a's ``ne[0]``, its ``ne[1]`` (out) equal to lora_b's ``ne[1]``, and lora_a's ``ne[1]``
  equal to lora_b's ``ne[0]`` (the rank).
- Per-expert pairs of an MoE projection (``block_sparse_moe.experts.{j}.w1``, ``mlp.experts.{j}.gate_proj``, ...)
  are stacked on a new first axis, as the converter stacks the expert weights: lora_a [E, r, in], lora_b
  [E, out, r], named after the merged tensor (``blk.N.ffn_gate_exps.weight.lora_a``). Every expert of a
  projection must have a pair of the same rank.
- Fused expert pairs (PEFT's ``target_parameters`` on transformers 5.x's ``mlp.experts.gate_up_proj`` and
  ``down_proj``) are split into the per-expert pairs of the checkpoint's own layout (``lit_qlp.formats.hf.
  LEGACY_EXPERTS``: ``gate_up_proj`` = cat(gate, up) gives expert ``e`` the pairs ``(A_e, B_e[:I])`` and
  ``(A_e, B_e[I:])``, exactly, since ``B A`` splits by rows) and then stacked like them. Families without such a
  row (gpt-oss: transposed, interleaved gate/up, and not an architecture here) are refused with the alternative.
- Where the converter reorders the rows of ``q_proj``/``k_proj`` for llama.cpp's rope (``LlamaModel.permute``:
  the llama, mistral and mixtral configs), lora_b of those projections gets the same row order; lora_a is
  unchanged, since ``P (B A) = (P B) A``.
- Metadata: ``general.type = adapter``, ``general.architecture``, ``adapter.type = lora`` and
  ``adapter.lora.alpha``. llama.cpp multiplies each pair by ``alpha / r``, r read from lora_b.

Not exported (a ValueError says so and what to do): LoRA on the token embeddings or the output head, and what
``lit_qlp.formats.peft.read_lora_adapter`` refuses (full-weight ``modules_to_save``, LoRA biases, DoRA, per-module
``rank_pattern``/``alpha_pattern``, activated LoRA (aLoRA) and the other LoRA variants).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from lit_qlp.formats.hf import LEGACY_EXPERTS
from lit_qlp.formats.peft import ADAPTER_WEIGHTS, LoraAdapterFile, expert_factors, read_lora_adapter

OUTTYPES = ("F32", "F16", "BF16", "Q8_0")
# Per-expert LoRA modules: <stem>.experts.<index>.<projection>, e.g. model.layers.0.mlp.experts.3.gate_proj.
EXPERT_MODULE = re.compile(r"^(?P<stem>.+\.experts)\.(?P<expert>\d+)\.(?P<projection>[A-Za-z0-9_]+)$")
EMBEDDING_NAMES = ("embed_tokens", "lm_head")


@dataclass(frozen=True)
class Architecture:
    """How llama.cpp's converter treats the weights of one Hugging Face ``model_type``.

    Attributes:
        gguf_arch: llama.cpp's name of the architecture (``general.architecture``, a value of
            ``gguf.MODEL_ARCH_NAMES``); the base GGUF must have the same.
        permute_qk: Whether the converter reorders the rows of q_proj and k_proj from Hugging Face's rotate-half
            rope to llama.cpp's interleaved pairs (``undo_permute`` of its ``LlamaModel``).
    """

    gguf_arch: str
    permute_qk: bool = False


# Hugging Face model_type -> its llama.cpp conversion, checked against the converter's classes (LlamaModel also
# takes MistralForCausalLM and MixtralForCausalLM; Qwen2/Qwen2Moe/Qwen3/Qwen3Moe, Gemma/Gemma2, Phi3Mini and
# CommandR2 leave the projection weights as they are). Another architecture is a new row, once checked.
ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("llama", permute_qk=True),
    "mistral": Architecture("llama", permute_qk=True),
    "mixtral": Architecture("llama", permute_qk=True),
    "qwen2": Architecture("qwen2"),
    "qwen2_moe": Architecture("qwen2moe"),
    "qwen3": Architecture("qwen3"),
    "qwen3_moe": Architecture("qwen3moe"),
    "gemma": Architecture("gemma"),
    "gemma2": Architecture("gemma2"),
    "phi3": Architecture("phi3"),
    "cohere": Architecture("command-r"),
}


def supported_architectures() -> str:
    """The accepted ``arch`` values, for messages: Hugging Face model types and llama.cpp names."""
    names = sorted(set(ARCHITECTURES) | {a.gguf_arch for a in ARCHITECTURES.values()})
    return ", ".join(names)


def find_architecture(name: str) -> Architecture:
    """The conversion of a Hugging Face ``model_type`` (``qwen2_moe``) or llama.cpp architecture (``qwen2moe``).

    Args:
        name: The model type or llama.cpp architecture name.

    Raises:
        ValueError: ``name`` is neither.
    """
    if name in ARCHITECTURES:
        return ARCHITECTURES[name]
    for architecture in ARCHITECTURES.values():
        if architecture.gguf_arch == name:
            return architecture
    raise ValueError(f"architecture {name!r} is not supported; use one of: {supported_architectures()}")


def rope_permute(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """The rows of a q/k projection (or of its LoRA B) in the order llama.cpp's converter writes them.

    Within each head, Hugging Face's rope pairs row ``i`` with row ``i + d/2`` (rotate-half); llama.cpp's llama
    rope pairs rows ``2i`` and ``2i + 1``. The new row ``h·d + 2i + c`` is the old row ``h·d + c·d/2 + i``.

    Args:
        rows: Tensor whose first axis is the projection's output, ``n_head · d`` rows.
        n_head: Number of heads of the projection (the key/value heads for k_proj).
    """
    out = rows.shape[0]
    half = out // n_head // 2
    return rows.reshape(n_head, 2, half, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


def _base_config(config: dict) -> tuple[dict | None, Path | None]:
    """The base model's ``config.json`` found at ``base_model_name_or_path``, and its path; (None, path) if absent."""
    base = config.get("base_model_name_or_path")
    if not base:
        return None, None
    path = Path(base).expanduser() / "config.json"
    if not path.is_file():
        return None, path
    return json.loads(path.read_text()), path


def _choose_architecture(arch: str | None, base_config: dict | None, base_path: Path | None) -> Architecture:
    """The ``arch`` argument if given, else the ``model_type`` of the base model's config."""
    if arch is not None:
        return find_architecture(arch)
    if base_config is None:
        where = f"{base_path} does not exist" if base_path else "adapter_config.json names no base_model_name_or_path"
        raise ValueError(
            f"cannot tell the architecture: {where}; pass --arch (one of: {supported_architectures()}) or point "
            "base_model_name_or_path in adapter_config.json at the local base model directory"
        )
    model_type = base_config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"{base_path}: model_type {model_type!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    return ARCHITECTURES[model_type]


def _refuse_embeddings(modules: Iterable[str], weights_path: Path) -> None:
    """Refuses LoRA pairs on the token embeddings or the output head, which this exporter does not write."""
    embeddings = [m for m in modules if any(word in m.split(".") for word in EMBEDDING_NAMES)]
    if embeddings:
        raise ValueError(_embedding_message(weights_path, embeddings))


def _llama_cpp_alpha(adapter: LoraAdapterFile) -> float:
    """The one ``adapter.lora.alpha`` that reproduces every pair's PEFT scale: llama.cpp scales by alpha / r, r
    read from lora_b, so alpha = scale · r (``alpha · sqrt(r)`` for rsLoRA)."""
    alphas = {scale * adapter.pairs[module][1].shape[-1] for module, scale in adapter.scales.items()}
    alphas |= {scale * adapter.expert_ranks[name] for name, scale in adapter.expert_scales.items()}  # r per expert
    if max(alphas) - min(alphas) > 1e-6 * max(abs(a) for a in alphas):
        raise ValueError(
            f"{adapter.directory}: the pairs' scales need alphas {sorted(alphas)}, but a llama.cpp adapter has one "
            "adapter.lora.alpha (scaled by 1 / r); retrain with one rank (LoRA's expert_rank unset), or without "
            "use_rslora, or merge the adapter (tools/merge_lora.py) and convert the merged model"
        )
    return max(alphas)


def _embedding_message(weights_path: Path, keys: list[str]) -> str:
    return (
        f"{weights_path}: the adapter trains the token embeddings or the output head ({', '.join(sorted(keys))}); "
        "this exporter writes LoRA on the linear layers of the decoder only (llama.cpp takes embedding and "
        "untied-output LoRA in special layouts that are not written here). Retrain without embed_tokens/lm_head "
        "in target_modules and modules_to_save, or merge the adapter into the base model (PEFT's "
        "merge_and_unload) and convert the merged model with llama.cpp's convert_hf_to_gguf.py"
    )


def _stack_experts(
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], n_expert: int | None, weights_path: Path
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-expert pairs stacked into one pair per projection (``...experts.gate_proj``: [E, r, in], [E, out, r])."""
    merged: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    groups: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    for module, pair in pairs.items():
        match = EXPERT_MODULE.match(module)
        if match is None:
            merged[module] = pair
        else:
            stem, projection = match["stem"], match["projection"]
            groups.setdefault(f"{stem}.{projection}", {})[int(match["expert"])] = pair
    for name, experts in groups.items():
        count = n_expert if n_expert is not None else max(experts) + 1
        absent = sorted(set(range(count)) - set(experts))
        if absent or max(experts) >= count:
            raise ValueError(
                f"{weights_path}: {name} has LoRA pairs for experts {sorted(experts)} of {count}; llama.cpp keeps "
                f"all experts of a projection in one tensor, so every expert needs a pair (missing: {absent})"
            )
        ranks = {a.shape[0] for a, _ in experts.values()}
        shapes = {(a.shape[1], b.shape[0]) for a, b in experts.values()}
        if len(ranks) != 1 or len(shapes) != 1:
            raise ValueError(
                f"{weights_path}: the experts of {name} have ranks {sorted(ranks)} and (in, out) {sorted(shapes)}; "
                "stacking them into llama.cpp's merged expert tensor needs one rank and shape"
            )
        merged[name] = (
            torch.stack([experts[j][0] for j in range(count)]),
            torch.stack([experts[j][1] for j in range(count)]),
        )
    return merged


def _split_fused_experts(
    adapter: LoraAdapterFile, model_type: str | None, weights_path: Path
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The fused expert pairs of a ``target_parameters`` adapter as per-expert pairs named in the checkpoint's
    legacy layout (``model.layers.0.block_sparse_moe.experts.3.w1``), which ``_stack_experts`` then stacks.

    Raises:
        ValueError: the architecture has no legacy expert layout (``LEGACY_EXPERTS``), so no llama.cpp tensor names.
    """
    if not adapter.expert_pairs:
        return {}
    legacy = LEGACY_EXPERTS.get(model_type or "")
    if legacy is None:
        raise ValueError(
            f"{weights_path}: LoRA on the fused expert tensors ({next(iter(adapter.expert_pairs))}, ...) of a "
            f"{model_type!r} model is not written here (its expert layout has no llama.cpp LoRA mapping in this "
            "exporter); merge the adapter into the base model (tools/merge_lora.py) and convert the merged model "
            "with llama.cpp's convert_hf_to_gguf.py"
        )
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, (a, b) in adapter.expert_pairs.items():
        stem = (name.rsplit(".experts.", 1)[0] + ".").replace(legacy.fused_block, legacy.block)[:-1]
        a_e, b_e = expert_factors(a.float(), b.float(), a.shape[0] // adapter.expert_ranks[name])
        if name.endswith("gate_up_proj"):
            rows = b_e.shape[1] // 2
            projections = ((legacy.gate, slice(0, rows)), (legacy.up, slice(rows, 2 * rows)))
        else:
            projections = ((legacy.down, slice(None)),)
        for expert in range(a_e.shape[0]):
            for projection, rows in projections:
                out[f"{stem}.experts.{expert}.{projection}"] = (a_e[expert], b_e[expert, rows].contiguous())
    return out


def _encode(
    array: np.ndarray, qtype: gguf.GGMLQuantizationType, name: str, fallbacks: list[str]
) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """``array`` in ``qtype``; a Q8_0 tensor whose rows are not whole 32-value blocks is written as F16 instead."""
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if array.shape[-1] % block:
        fallbacks.append(name)
        qtype = gguf.GGMLQuantizationType.F16
    return gguf.quants.quantize(array, qtype), qtype


def _block_order(name: str) -> tuple[int, str]:
    match = re.match(r"blk\.(\d+)\.", name)
    return (int(match[1]) if match else -1, name)


def lora_to_gguf(adapter_dir: Path, output: Path, arch: str | None = None, outtype: str = "F32") -> dict:
    """Writes a PEFT LoRA adapter as a llama.cpp LoRA adapter GGUF.

    The architecture is ``arch`` if given, else the ``model_type`` of ``<base_model_name_or_path>/config.json``.
    That config, when present, also gives the number of layers, of experts and, for the llama architecture, of
    attention heads (needed to reorder the LoRA B of q_proj/k_proj as llama.cpp's converter reorders the weights).
    With ``outtype`` Q8_0, a tensor whose last axis is not a multiple of 32 (lora_b has the rank there, often 8
    or 16) is written as F16, as llama.cpp's converter does; the note is printed and the names are returned.

    Args:
        adapter_dir: PEFT LoRA directory (``adapter_config.json`` and ``adapter_model.safetensors``).
        output: The new ``.gguf`` file; an existing file is never overwritten.
        arch: Hugging Face model type (``llama``, ``qwen2_moe``) or llama.cpp architecture (``qwen2moe``).
        outtype: Tensor type: F32, F16, BF16 or Q8_0.

    Returns:
        A summary: ``output``, ``architecture``, ``outtype``, ``alpha``, ``pairs``, ``tensors`` (the count) and
        ``f16_fallback`` (names written as F16 under Q8_0).

    Raises:
        FileExistsError: ``output`` exists.
        FileNotFoundError: The adapter files are missing.
        ValueError: The adapter cannot be expressed as a llama.cpp adapter, or the architecture is unknown.
    """
    adapter_dir, output = Path(adapter_dir), Path(output)
    if outtype.upper() not in OUTTYPES:
        raise ValueError(f"--outtype {outtype!r} is not one of {', '.join(OUTTYPES)}")
    qtype = gguf.GGMLQuantizationType[outtype.upper()]
    if output.exists():
        raise FileExistsError(f"--output {output} exists; choose a new file name (an output is never overwritten)")
    adapter = read_lora_adapter(adapter_dir)
    weights_path = adapter_dir / ADAPTER_WEIGHTS
    _refuse_embeddings(adapter.pairs, weights_path)
    base_config, base_path = _base_config(adapter.config)
    if adapter.expert_pairs and arch is None and base_config and base_config.get("model_type") not in LEGACY_EXPERTS:
        _split_fused_experts(adapter, base_config.get("model_type"), weights_path)  # raises, naming the alternative
    architecture = _choose_architecture(arch, base_config, base_path)
    base_config = base_config or {}
    alpha = _llama_cpp_alpha(adapter)

    pairs = {module: (a.float(), b.float()) for module, (a, b) in adapter.pairs.items()}
    model_type = base_config.get("model_type") or next(
        (t for t, a in ARCHITECTURES.items() if a is architecture and t in LEGACY_EXPERTS), None
    )
    pairs.update(_split_fused_experts(adapter, model_type, weights_path))
    n_expert = base_config.get("num_local_experts", base_config.get("num_experts"))
    pairs = _stack_experts(pairs, n_expert, weights_path)

    layer_numbers = [int(m) for name in pairs for m in re.findall(r"\.layers\.(\d+)\.", name)]
    n_blocks = max([base_config.get("num_hidden_layers", 0), *(n + 1 for n in layer_numbers)])
    model_arch = {name: key for key, name in gguf.MODEL_ARCH_NAMES.items()}[architecture.gguf_arch]
    name_map = gguf.get_tensor_name_map(model_arch, n_blocks)

    out: list[tuple[str, torch.Tensor]] = []
    embeddings: list[str] = []
    for module, (a, b) in pairs.items():
        found = name_map.get_type_and_name(module)
        if found is None:
            raise ValueError(
                f"{weights_path}: module {module} has no tensor in llama.cpp's {architecture.gguf_arch!r} "
                "architecture; check --arch, or retrain without this module in target_modules"
            )
        kind, base_name = found
        if kind in (gguf.MODEL_TENSOR.TOKEN_EMBD, gguf.MODEL_TENSOR.OUTPUT):
            embeddings.append(module)
            continue
        if architecture.permute_qk and kind in (gguf.MODEL_TENSOR.ATTN_Q, gguf.MODEL_TENSOR.ATTN_K):
            b = _permuted_b(b, kind is gguf.MODEL_TENSOR.ATTN_K, base_config, base_path, module)
        out.append((f"{base_name}.weight.lora_a", a))
        out.append((f"{base_name}.weight.lora_b", b))
    if embeddings:
        raise ValueError(_embedding_message(weights_path, embeddings))
    out.sort(key=lambda item: _block_order(item[0]))

    writer = gguf.GGUFWriter(path=None, arch=architecture.gguf_arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_name(adapter_dir.resolve().name)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    fallbacks: list[str] = []
    for name, tensor in out:
        data, data_type = _encode(tensor.contiguous().numpy(), qtype, name, fallbacks)
        writer.add_tensor(name, data, raw_dtype=data_type)
    if fallbacks:
        shown = ", ".join(fallbacks[:3]) + (", ..." if len(fallbacks) > 3 else "")
        print(
            f"note: {len(fallbacks)} tensors whose rows are not whole Q8_0 blocks (32 values) written as F16: {shown}"
        )

    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.name}.partial")
    try:
        writer.write_header_to_file(path=partial)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    if output.exists():
        partial.unlink()
        raise FileExistsError(f"--output {output} appeared while writing; it is left as it is")
    os.replace(partial, output)
    return {
        "output": str(output),
        "architecture": architecture.gguf_arch,
        "outtype": outtype.upper(),
        "alpha": alpha,
        "pairs": len(out) // 2,
        "tensors": len(out),
        "f16_fallback": fallbacks,
    }


def _permuted_b(b: torch.Tensor, is_k: bool, config: dict, config_path: Path | None, module: str) -> torch.Tensor:
    """LoRA B of a q_proj/k_proj with llama.cpp's rope row order; stacked experts are not q/k, so B is 2-D."""
    n_head = config.get("num_attention_heads")
    if n_head is None:
        where = config_path or "base_model_name_or_path"
        raise ValueError(
            f"{module}: llama.cpp's llama architecture reorders the rows of q_proj/k_proj per attention head, and "
            f"the head counts come from the base model's config.json, which was not found ({where}); point "
            "base_model_name_or_path in adapter_config.json at the local base model directory"
        )
    heads = (config.get("num_key_value_heads") or n_head) if is_k else n_head
    if b.shape[0] % (2 * heads):
        raise ValueError(
            f"{module}: lora_B has {b.shape[0]} rows, not a multiple of 2 × {heads} heads; the base config "
            f"{config_path} does not belong to this adapter"
        )
    return rope_permute(b, heads)
