"""Loss curves of lit_qlp and transformers + PEFT on the same data from the same LoRA initialisation.

    python tools/compare_losses.py --shape llama3-8b --seq 4096 --steps 20 --mode qlora [--fast] [--compile]
    python tools/compare_losses.py --shape tiny --seq 128 --steps 5 --mode lora --device cpu --dtype float32

Shows that lit_qlp's speed is not bought with different maths. Both sides train the same random-weight model
(``tools/benchmark.py``'s shapes) on the same random token sequences, ``--micro-batches`` per optimizer step,
LoRA r = alpha on all linear layers, no dropout, the same initial A and B (lit_qlp's, loaded into PEFT), optimi
Adam with the same settings, a constant learning rate and gradient clipping at 1.0. lit_qlp runs its real path
(Trainer + PipelineStrategy, one process); the baseline averages the per-sequence losses of a PEFT model (with
transformers' own non-reentrant activation checkpointing). ``--fast`` sets LoRA's ``compute_in_weight_dtype:
false`` on the lit_qlp side, ``--compile`` ``compile_layers: true``, ``--long-context`` ``long_context: true``
(``--mlp-chunk-tokens``). Prints the per-step losses, their relative difference and the largest one.

    python tools/compare_losses.py --shape llama3-8b --seq 65536 --steps 5 --micro-batches 1 --mode qlora --fast \
        --compile --long-context
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import SHAPES, build_model, lit_trainer  # noqa: E402


def sequences(vocab: int, args) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (args.steps * args.micro_batches, args.seq), generator=generator)


def lit_losses(args, initial: Path) -> list[float]:
    """lit_qlp's per-step losses; its initial LoRA weights are saved (PEFT keys) to ``initial``."""
    import lightning.pytorch as pl
    from safetensors.torch import save_file
    from torch.utils.data import DataLoader

    from lit_qlp.adapters.lora import lora_tensors
    from lit_qlp.module import CausalLMModule
    from lit_qlp.strategies import PipelineStrategy

    losses: list[float] = []

    class Record(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            layers = [f for f in pl_module.pipe.forward_funcs if isinstance(f, torch.nn.Module)]
            save_file(lora_tensors(layers), initial)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    from benchmark import lit_module_options

    options, _ = lit_module_options({"training": args.mode, "compute_in_weight_dtype": not args.fast}, args.rank)
    module = CausalLMModule(
        args.model_dir,
        dtype=args.dtype,
        lr=args.lr,
        compile_layers=args.compile,
        long_context=args.long_context,
        mlp_chunk_tokens=args.mlp_chunk_tokens,
        **options,
    )
    ids = sequences(module.source.config.vocab_size, args)

    class Data(pl.LightningDataModule):
        def train_dataloader(self):
            return DataLoader([{"input_ids": r, "labels": r} for r in ids], batch_size=args.micro_batches)

    strategy = PipelineStrategy(gradient_accumulation_steps=args.micro_batches, gradient_clipping=1.0)
    trainer = lit_trainer(args.device, strategy, args.steps, [Record()])
    trainer.fit(module, Data())
    return losses


def peft_losses(args, initial: Path) -> list[float]:
    """transformers + PEFT from the same LoRA initialisation, the same sequences and the same optimizer."""
    from optimi import Adam
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = getattr(torch, args.dtype)
    kwargs = {}
    if args.mode == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )
    model = AutoModelForCausalLM.from_pretrained(
        args.model_dir, dtype=dtype, attn_implementation="sdpa", device_map=args.device, **kwargs
    )
    model.config.use_cache = False
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    config = LoraConfig(r=args.rank, lora_alpha=args.rank, lora_dropout=0.0, target_modules="all-linear")
    model = get_peft_model(model, config)
    result = set_peft_model_state_dict(model, {k: v.to(args.device) for k, v in load_file(initial).items()})
    if result.unexpected_keys:
        raise RuntimeError(f"PEFT did not take lit_qlp's initial LoRA weights: {result.unexpected_keys[:3]}")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = Adam(params, lr=args.lr, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.0)
    ids = sequences(model.config.vocab_size, args).to(args.device)
    losses = []
    for step in range(args.steps):
        total = 0.0
        for row in ids[step * args.micro_batches : (step + 1) * args.micro_batches]:
            loss = model(input_ids=row[None], labels=row[None]).loss  # every sequence has seq - 1 label tokens
            (loss / args.micro_batches).backward()
            total += float(loss.detach()) / args.micro_batches
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total)
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--model-dir", type=Path, default=None, help="default: /tmp/bench-<shape>")
    parser.add_argument("--mode", choices=["lora", "qlora"], default="qlora")
    parser.add_argument("--fast", action="store_true", help="lit_qlp with lora_compute_in_weight_dtype: false")
    parser.add_argument("--compile", action="store_true", help="lit_qlp with compile_layers: true")
    parser.add_argument(
        "--long-context", action="store_true", help="lit_qlp with long_context: true (chunked MLP, kept attention)"
    )
    parser.add_argument("--mlp-chunk-tokens", type=int, default=4096, help="with --long-context: mlp_chunk_tokens")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--micro-batches", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json", type=Path, default=None, help="also write the losses here")
    args = parser.parse_args()
    args.model_dir = args.model_dir or Path(f"/tmp/bench-{args.shape}")
    build_model(args.shape, args.model_dir, args.device)
    with tempfile.TemporaryDirectory() as tmp:
        initial = Path(tmp) / "initial_lora.safetensors"
        lit = lit_losses(args, initial)
        gc.collect()
        if args.device != "cpu":
            torch.cuda.empty_cache()
        reference = peft_losses(args, initial)
    differences = [abs(a - b) / abs(b) for a, b in zip(lit, reference)]
    print(
        f"\n{args.mode}{' (LoRA path in the activation dtype)' if args.fast else ''}"
        f"{' (decoder layers compiled)' if args.compile else ''}, shape {args.shape}, seq "
        f"{args.seq}, {args.micro_batches} sequences per step, {args.dtype}"
    )
    print("| step | lit_qlp loss | transformers + PEFT loss | relative difference |")
    print("| --- | --- | --- | --- |")
    for step, (a, b, d) in enumerate(zip(lit, reference, differences)):
        print(f"| {step} | {a:.5f} | {b:.5f} | {d:.2e} |")
    print(f"largest relative difference: {max(differences):.2e}")
    print("RESULT " + json.dumps({"lit": lit, "reference": reference, "max_relative_difference": max(differences)}))
    if args.json:
        args.json.write_text(json.dumps({"lit": lit, "reference": reference}, indent=2))


if __name__ == "__main__":
    main()
