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
- Where the converter reorders the rows of ``q_proj``/``k_proj`` for llama.cpp's rope (``LlamaModel.permute``:
  the llama, mistral and mixtral configs), lora_b of those projections gets the same row order; lora_a is
  unchanged, since ``P (B A) = (P B) A``.
- Metadata: ``general.type = adapter``, ``general.architecture``, ``adapter.type = lora`` and
  ``adapter.lora.alpha``. llama.cpp multiplies each pair by ``alpha / r``, r read from lora_b.

Not exported (a ValueError says so and what to do): LoRA on the token embeddings or the output head, full-weight
``modules_to_save``, LoRA biases, DoRA, per-module ``alpha_pattern`` and activated LoRA (aLoRA).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from lit_qlp.adapters.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX

OUTTYPES = ("F32", "F16", "BF16", "Q8_0")
# Per-expert LoRA modules: <stem>.experts.<index>.<projection>, e.g. model.layers.0.mlp.experts.3.gate_proj.
EXPERT_MODULE = re.compile(r"^(?P<stem>.+\.experts)\.(?P<expert>\d+)\.(?P<projection>[A-Za-z0-9_]+)$")
EMBEDDING_NAMES = ("embed_tokens", "lm_head", "lora_embedding_A", "lora_embedding_B")


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


def _read_adapter_config(adapter_dir: Path) -> dict:
    """The adapter's ``adapter_config.json``, refused where llama.cpp could not reproduce the adapter."""
    path = adapter_dir / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"--input {adapter_dir} has no {ADAPTER_CONFIG}; point it at a PEFT LoRA directory")
    config = json.loads(path.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type {config.get('peft_type')!r} is not a LoRA; only LoRA adapters convert")
    if config.get("use_dora"):
        raise ValueError(f"{path}: DoRA adapters (use_dora: true) have no llama.cpp form; train a plain LoRA")
    if config.get("alpha_pattern"):
        raise ValueError(
            f"{path}: alpha_pattern {config['alpha_pattern']} gives modules their own alpha, but a llama.cpp adapter "
            "has one adapter.lora.alpha; retrain without alpha_pattern"
        )
    if config.get("alora_invocation_tokens") or config.get("invocation_string"):
        raise ValueError(f"{path}: activated LoRA (aLoRA) is not exported; use llama.cpp's convert_lora_to_gguf.py")
    if "lora_alpha" not in config:
        raise ValueError(f"{path} has no lora_alpha; add the alpha the adapter was trained with")
    return config


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


def _lora_pairs(tensors: dict[str, torch.Tensor], weights_path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The (A, B) pairs of an adapter by module name (``model.layers.0.self_attn.q_proj``), as float32."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    embeddings: list[str] = []
    for key, tensor in tensors.items():
        name = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
        if any(word in name.split(".") for word in EMBEDDING_NAMES):
            embeddings.append(key)
            continue
        if name.endswith(".lora_magnitude_vector") or ".lora_magnitude_vector." in name:
            raise ValueError(f"{weights_path}: {key} is a DoRA magnitude; DoRA adapters have no llama.cpp form")
        for part in ("lora_A", "lora_B"):
            if name.endswith(f".{part}.weight"):
                parts.setdefault(name[: -len(f".{part}.weight")], {})[part] = tensor
                break
        else:
            raise ValueError(
                f"{weights_path}: {key} is not a LoRA tensor (*.lora_A.weight / *.lora_B.weight); a llama.cpp "
                "adapter holds only LoRA pairs, so retrain without modules_to_save and LoRA biases, or merge the "
                "adapter into the base model (PEFT's merge_and_unload) and convert the merged model with "
                "llama.cpp's convert_hf_to_gguf.py"
            )
    if embeddings:
        raise ValueError(_embedding_message(weights_path, embeddings))
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module, pair in parts.items():
        missing = {"lora_A", "lora_B"} - set(pair)
        if missing:
            raise ValueError(f"{weights_path}: {module} has no {missing.pop()}.weight; the adapter is incomplete")
        a, b = pair["lora_A"].float(), pair["lora_B"].float()
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(
                f"{weights_path}: {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; a pair is "
                "lora_A [r, in] and lora_B [out, r]"
            )
        pairs[module] = (a, b)
    if not pairs:
        raise ValueError(f"{weights_path} holds no LoRA pairs (no *.lora_A.weight keys)")
    return pairs


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
    from safetensors.torch import load_file

    adapter_dir, output = Path(adapter_dir), Path(output)
    if outtype.upper() not in OUTTYPES:
        raise ValueError(f"--outtype {outtype!r} is not one of {', '.join(OUTTYPES)}")
    qtype = gguf.GGMLQuantizationType[outtype.upper()]
    if output.exists():
        raise FileExistsError(f"--output {output} exists; choose a new file name (an output is never overwritten)")
    config = _read_adapter_config(adapter_dir)
    weights_path = adapter_dir / ADAPTER_WEIGHTS
    if not weights_path.is_file():
        raise FileNotFoundError(f"--input {adapter_dir} has no {ADAPTER_WEIGHTS} (only safetensors adapters convert)")
    base_config, base_path = _base_config(config)
    architecture = _choose_architecture(arch, base_config, base_path)
    base_config = base_config or {}

    pairs = _lora_pairs(load_file(weights_path), weights_path)
    n_expert = base_config.get("num_local_experts", base_config.get("num_experts"))
    pairs = _stack_experts(pairs, n_expert, weights_path)

    ranks = {b.shape[-1] for _, b in pairs.values()}
    alpha = float(config["lora_alpha"])
    if config.get("use_rslora"):
        # PEFT scales by alpha / sqrt(r), llama.cpp by alpha / r: alpha · sqrt(r) gives the same factor.
        if len(ranks) != 1:
            raise ValueError(
                f"{adapter_dir / ADAPTER_CONFIG}: rsLoRA with ranks {sorted(ranks)}; llama.cpp's one alpha can "
                "reproduce alpha / sqrt(r) for a single rank only; retrain with one rank or without use_rslora"
            )
        alpha *= math.sqrt(ranks.pop())

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
