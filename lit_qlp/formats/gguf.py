"""GGUF model files (llama.cpp's format) as Hugging Face model directories that lit-qlp trains from.

transformers reads a GGUF model (``from_pretrained(dir, gguf_file=name)``) by dequantising every tensor, but then
refuses to save it ("quantized with gguf and is not serializable"), so it cannot be a ``model.model_dir``.
``gguf_to_hf`` loads it that way and writes what it read: safetensors in ``dtype``, ``config.json``,
``generation_config.json`` and the tokenizer with its chat template, which the GGUF file carries.

Quantised GGUF tensors (Q4_1, Q8_0, K-quants ...) come back dequantised: the values llama.cpp would compute with,
stored in ``dtype``, not the precision the model was trained in, which the file no longer holds. With ``float32``
(the default) the written model gives exactly the logits of transformers' own GGUF loading.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from lit_qlp.compat.transformers import forget_gguf_quantization, gguf_architectures

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def gguf_metadata(path: Path) -> dict[str, object]:
    """``general.type``, ``general.architecture`` and ``general.file_type`` of a GGUF file, and its tensor count
    (read with the gguf package, without loading a tensor)."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as error:
        raise ValueError(f"{path} is not a readable GGUF file: {error}") from None

    def field(key: str):
        found = reader.get_field(key)
        return None if found is None else found.contents()

    file_type = field("general.file_type")
    file_type_name = gguf.LlamaFileType(file_type).name if file_type is not None else None
    return {
        "type": field("general.type") or "model",
        "architecture": field("general.architecture"),
        "file_type": file_type_name,
        "tensors": len(reader.tensors),
    }


def gguf_to_hf(gguf_file: Path, output: Path, dtype: str = "float32") -> dict[str, object]:
    """Writes the model of ``gguf_file`` as a Hugging Face model directory ``output`` (which must not exist).

    Written to ``<output>.partial`` and renamed when complete, so ``output`` only ever holds a whole model.

    Args:
        gguf_file: A GGUF model file (not a LoRA adapter) of an architecture transformers reads from GGUF.
        output: New directory.
        dtype: Dtype of the written weights: "float32" (the dequantised values exactly), "bfloat16" or "float16"
            (half the size, the dequantised values rounded).

    Returns:
        A summary: architecture, GGUF file type, parameters, dtype, output, seconds.

    Raises:
        FileNotFoundError: ``gguf_file`` is missing.
        FileExistsError: ``output`` (or its ``.partial``) exists.
        ValueError: Not a GGUF model file, an unknown dtype, or an architecture transformers cannot read from GGUF.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file, output = Path(gguf_file), Path(output)
    if not gguf_file.is_file():
        raise FileNotFoundError(f"{gguf_file}: no such GGUF file")
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    partial = output.with_name(output.name + ".partial")
    for path in (output, partial):
        if path.exists():
            raise FileExistsError(f"{path} exists; choose a new output directory (nothing is overwritten)")
    metadata = gguf_metadata(gguf_file)
    if metadata["type"] != "model":
        raise ValueError(
            f"{gguf_file} is a GGUF {metadata['type']} (general.type), not a model; convert the base model's GGUF "
            "file, and load an adapter GGUF with llama.cpp's --lora"
        )

    start = time.perf_counter()
    directory, name = str(gguf_file.parent), gguf_file.name
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=DTYPES[dtype])
    except ValueError as error:
        if "not supported" not in str(error):
            raise
        raise ValueError(
            f"{gguf_file}: transformers cannot read a GGUF model of architecture {metadata['architecture']!r} "
            f"(it reads {', '.join(gguf_architectures())}); convert the original Hugging Face checkpoint instead"
        ) from None
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    forget_gguf_quantization(model)
    try:
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        partial.rename(output)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return {
        "architecture": metadata["architecture"],
        "gguf_file_type": metadata["file_type"],
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": dtype,
        "chat_template": bool(getattr(tokenizer, "chat_template", None)),
        "output": str(output),
        "seconds": round(time.perf_counter() - start, 1),
    }


__all__ = ["gguf_metadata", "gguf_to_hf"]
