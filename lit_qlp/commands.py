"""Command lines of the deployment tools: ``tools/<name>.py`` and the ``lit-qlp-<name>`` console commands."""

from __future__ import annotations

import argparse
import json
import pickle
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path


def command(function: Callable[..., None]) -> Callable[..., None]:
    """Bad input (missing or existing paths, wrong values, a checkpoint file refused by the weights-only unpickler)
    ends the command with its message, not a traceback."""

    @wraps(function)
    def run(argv: list[str] | None = None) -> None:
        try:
            function(argv)
        except (FileExistsError, FileNotFoundError, ValueError, pickle.UnpicklingError) as error:
            sys.exit(f"error: {error}")

    return run


@command
def merge_lora(argv: list[str] | None = None) -> None:
    """lit-qlp-merge-lora --input BASE --adapter ADAPTER --output OUT [--scale 1.0]"""
    from lit_qlp.export.merge import merge_lora as merge

    parser = argparse.ArgumentParser(
        prog="merge_lora",
        description="Merge a PEFT LoRA (also one converted from a Control Adapter) into its 16-bit base model, "
        "shard by shard; the output loads with transformers.",
    )
    parser.add_argument("--input", type=Path, required=True, help="the base model directory the adapter was trained on")
    parser.add_argument("--adapter", type=Path, required=True, help="the PEFT LoRA directory (e.g. <root>/epoch1)")
    parser.add_argument("--output", type=Path, required=True, help="new directory for the merged model")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplier of the adapter (default 1: as trained)")
    args = parser.parse_args(argv)
    merged = merge(args.input, args.adapter, args.output, args.scale)
    print(f"merged {len(merged)} weights into {args.output}")


@command
def convert_ds_checkpoint(argv: list[str] | None = None) -> None:
    """lit-qlp-convert-ds-checkpoint --input CKPT_DIR --config CONFIG.yaml --output OUT"""
    from lit_qlp.export.checkpoint import convert_ds_checkpoint as convert

    parser = argparse.ArgumentParser(
        prog="convert_ds_checkpoint",
        description="Turn a training checkpoint directory into what the epoch export writes: a PEFT adapter, a "
        "Control Adapter or a Hugging Face model directory.",
    )
    parser.add_argument(
        "--input", type=Path, required=True, help="checkpoint directory, e.g. <root>/checkpoints/last.ckpt"
    )
    parser.add_argument("--config", type=Path, required=True, help="the run's resolved config, <root>/config.yaml")
    parser.add_argument("--output", type=Path, required=True, help="new directory for the export")
    args = parser.parse_args(argv)
    print(f"wrote {convert(args.input, args.config, args.output)}")


@command
def control_adapter_to_lora(argv: list[str] | None = None) -> None:
    """lit-qlp-control-adapter-to-lora --base BASE --adapter CA --output LORA [--inverse] [--o-proj]"""
    from lit_qlp.export.control import control_adapter_to_lora as convert

    parser = argparse.ArgumentParser(
        prog="control_adapter_to_lora",
        description="Convert a Control Adapter into a PEFT LoRA: B = Q diag(λ), A = Qᵀ W_down on mlp.down_proj "
        "(exactly the MLP's share of the adapter; see lit_qlp/export/control.py).",
    )
    parser.add_argument("--base", type=Path, required=True, help="base model directory the adapter was trained on")
    parser.add_argument("--adapter", type=Path, required=True, help="Control Adapter directory (an epoch export)")
    parser.add_argument("--output", type=Path, required=True, help="new directory for the PEFT LoRA")
    parser.add_argument("--inverse", action="store_true", help="convert class -1 (λ = expm1(-S))")
    parser.add_argument("--o-proj", action="store_true", help="also target self_attn.o_proj")
    args = parser.parse_args(argv)
    tensors = convert(args.base, args.adapter, args.output, args.inverse, args.o_proj)
    print(f"wrote {len(tensors)} tensors to {args.output}")


@command
def analyze_control_adapters(argv: list[str] | None = None) -> None:
    """lit-qlp-analyze-control-adapters --adapter CA [--no-gpu] [--json OUT.json]"""
    import torch

    from lit_qlp.export.control import analyze_control_adapter

    parser = argparse.ArgumentParser(
        prog="analyze_control_adapters",
        description="Per-layer health of a Control Adapter: ‖QᵀQ - I‖_F, effective rank of Q diag(λ), λ = expm1(S) "
        "(min / median / max), cond(Q) and how far class -1 undoes class +1 (‖T₊T₋ - I‖_F).",
    )
    parser.add_argument("--adapter", type=Path, required=True, help="Control Adapter directory (an epoch export)")
    parser.add_argument("--no-gpu", action="store_true", help="compute on the CPU even when a GPU is present")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not args.no_gpu else "cpu"
    rows = analyze_control_adapter(args.adapter, device)
    print("| layer | ‖QᵀQ-I‖ | eff. rank | λ min | λ median | λ max | cond(Q) | inverse error |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['layer']} | {r['orthogonality']:.2e} | {r['effective_rank']:.2f} | {r['lambda_min']:+.4f} | "
            f"{r['lambda_median']:+.4f} | {r['lambda_max']:+.4f} | {r['condition']:.4f} | {r['inverse_error']:.2e} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


def import_qlora_pipe_config(argv: list[str] | None = None) -> None:
    """lit-qlp-import-qlora-pipe-config config.toml [-o config.yaml]"""
    from lit_qlp.export.qlora_pipe import import_qlora_pipe_config as convert
    from lit_qlp.export.qlora_pipe import render

    parser = argparse.ArgumentParser(
        prog="import_qlora_pipe_config",
        description="Convert a qlora-pipe-lite TOML training config into a lit-qlp YAML config (stdout, or -o).",
    )
    parser.add_argument("config", type=Path, help="qlora-pipe-lite TOML config")
    parser.add_argument("-o", "--output", type=Path, help="YAML file to write (must not exist); default: stdout")
    args = parser.parse_args(argv)
    if args.output is not None and args.output.exists():
        sys.exit(f"error: {args.output} exists; choose another -o path or remove it first")
    try:
        text = render(convert(args.config), args.config)
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")
    if args.output is None:
        sys.stdout.write(text)
        return
    try:
        with args.output.open("x", encoding="utf-8") as f:  # "x": refuses a file created meanwhile, too
            f.write(text)
    except FileExistsError:
        sys.exit(f"error: {args.output} exists; choose another -o path or remove it first")
    print(f"wrote {args.output}", file=sys.stderr)


@command
def lora_to_gguf(argv: list[str] | None = None) -> None:
    """lit-qlp-lora-to-gguf --input ADAPTER --output adapter.gguf [--arch llama] [--outtype F32|F16|BF16|Q8_0]"""
    from lit_qlp.export.gguf import OUTTYPES, supported_architectures
    from lit_qlp.export.gguf import lora_to_gguf as convert

    parser = argparse.ArgumentParser(
        prog="lora_to_gguf",
        description="Convert a PEFT LoRA adapter into a llama.cpp LoRA adapter GGUF (load it with --lora).",
    )
    parser.add_argument("--input", type=Path, required=True, help="the PEFT LoRA directory (e.g. <root>/epoch1)")
    parser.add_argument("--output", type=Path, required=True, help="the new .gguf file (never overwritten)")
    parser.add_argument(
        "--arch",
        help=f"architecture, when the base model's config.json is not at base_model_name_or_path: "
        f"{supported_architectures()}",
    )
    parser.add_argument(
        "--outtype",
        default="F32",
        type=str.upper,
        choices=OUTTYPES,
        help="tensor type (default F32); under Q8_0, tensors whose rows are not whole 32-value blocks are F16",
    )
    args = parser.parse_args(argv)
    summary = convert(args.input, args.output, arch=args.arch, outtype=args.outtype)
    print(
        f"wrote {summary['pairs']} LoRA pairs ({summary['tensors']} tensors, {summary['outtype']}, "
        f"{summary['architecture']}, alpha {summary['alpha']:g}) to {summary['output']}"
    )


@command
def gguf_to_hf(argv: list[str] | None = None) -> None:
    """lit-qlp-gguf-to-hf --input model.gguf --output DIR [--dtype float32|bfloat16|float16]"""
    from lit_qlp.formats.gguf import DTYPES
    from lit_qlp.formats.gguf import gguf_to_hf as convert

    parser = argparse.ArgumentParser(
        prog="gguf_to_hf",
        description="Turn a GGUF model file (llama.cpp's format) into a Hugging Face model directory that "
        "lit-qlp trains from (--model.model_dir): weights, config and the tokenizer with its chat template. "
        "Quantised GGUF weights (Q4_1, Q8_0, K-quants) come back dequantised, the values llama.cpp computes "
        "with, not the precision the model was trained in.",
    )
    parser.add_argument("--input", type=Path, required=True, help="the GGUF model file")
    parser.add_argument("--output", type=Path, required=True, help="new directory for the model (never overwritten)")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=sorted(DTYPES),
        help="dtype of the written weights (default float32: exactly the dequantised values; bfloat16 or float16 "
        "halve the size and round them)",
    )
    args = parser.parse_args(argv)
    summary = convert(args.input, args.output, dtype=args.dtype)
    quantised = summary["gguf_file_type"] or "unknown type"
    print(
        f"wrote {summary['architecture']} ({summary['parameters'] / 1e6:,.1f} M parameters) from a {quantised} GGUF "
        f"to {summary['output']} in {summary['dtype']}"
        + ("" if summary["chat_template"] else " (the GGUF file holds no chat template)")
        + f" in {summary['seconds']} s; quantised tensors were dequantised, not restored to their original precision"
    )


@command
def generate(argv: list[str] | None = None) -> None:
    """lit-qlp-generate --model DIR [--adapter DIR] (--prompt TEXT ... | --prompts FILE) [decoding options]"""
    from lit_qlp.export.generate import DTYPES, Decoding, load_model, read_prompts
    from lit_qlp.export.generate import generate as answer

    parser = argparse.ArgumentParser(
        prog="generate",
        description="Answers of a model, with or without a trained LoRA adapter, to a few prompts: each prompt is "
        "a user turn rendered with the tokenizer's chat template (as the model is served); greedy unless "
        "--temperature is above 0. With --compare, the base model's answers too, beside the adapter's.",
    )
    parser.add_argument("--model", type=Path, required=True, help="Hugging Face model directory (the base)")
    parser.add_argument("--adapter", type=Path, help="PEFT adapter directory over it (an epoch export, <root>/epoch1)")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    parser.add_argument("--prompts", type=Path, help="a .txt file (one prompt a line) or .jsonl (prompt or chat)")
    parser.add_argument("--compare", action="store_true", help="with --adapter: also answer with the base alone")
    parser.add_argument("--system", help="a system message before each prompt (chat template only)")
    parser.add_argument("--no-chat-template", action="store_true", help="continue the raw prompt text instead")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens per answer at most (default 128)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); above 0: sampling")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling's mass (sampling only)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="compute dtype (default float32)")
    args = parser.parse_args(argv)
    prompts = list(args.prompt) + (read_prompts(args.prompts) if args.prompts else [])
    if not prompts:
        parser.error("give at least one --prompt or a --prompts file")
    if args.compare and args.adapter is None:
        parser.error("--compare needs --adapter (it sets the base's answers beside the adapter's)")
    decoding = Decoding(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    options = dict(chat_template=not args.no_chat_template, system=args.system)
    model, tokenizer = load_model(args.model, args.adapter, args.dtype)
    answers = {"adapter" if args.adapter else "model": answer(model, tokenizer, prompts, decoding, **options)}
    if args.compare:
        with model.disable_adapter():
            answers = {"base": answer(model, tokenizer, prompts, decoding, **options), **answers}
    for i, prompt in enumerate(prompts):
        print(f"### prompt {i + 1}: {prompt}")
        for name, texts in answers.items():
            print(f"--- {name}:\n{texts[i]}")
        print()


__all__ = [
    "analyze_control_adapters",
    "control_adapter_to_lora",
    "convert_ds_checkpoint",
    "generate",
    "gguf_to_hf",
    "import_qlora_pipe_config",
    "lora_to_gguf",
    "merge_lora",
]
