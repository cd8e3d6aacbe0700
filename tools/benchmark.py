"""Training-step benchmark: lit_qlp's real training path against Hugging Face transformers + PEFT, in one run.

    python tools/benchmark.py --shape llama3-8b --seq 4096 --modes lit-qlora,hf-qlora,hf-qlora-kbit
    python tools/benchmark.py --shape llama3-8b --modes lit-lora,hf-lora
    python tools/benchmark.py --shape llama-1b --modes lit-full,hf-full
    python tools/benchmark.py --shape tiny --seq 128 --device cpu --modes lit-lora,hf-lora   # a smoke run anywhere
    python tools/benchmark.py --shape llama3-70b --random-weights --devices 2 --pipeline-stages 2 --modes lit-lora-fast

Builds a model of the given shape with random weights (throughput and memory do not depend on the values) and
saves it to ``--model-dir``, then runs each mode in a fresh process so that peak memory is its own. With
``--random-weights`` only the config is written: lit_qlp fills each stage's weights on its own device
(``random_weights``) and the hf modes build the model from the config on the device (the QLoRA ones then
quantise its linear layers in memory, as transformers' loader does): for shapes whose checkpoint would not fit
the disk, such as qwen3-30b-a3b (61 GB in bf16).

``--devices N --pipeline-stages S`` runs the lit modes in N processes, S pipeline stages × N/S data-parallel
replicas; tokens/s then counts every replica's sequences, and the peak memory of each process is reported. With
``--profile`` each process also reports its GPU kernel time in the profiled step: how busy each stage is, which
is what ``--partition-method`` choices trade.

lit_qlp modes (Trainer + CausalLMModule + PipelineStrategy, one process, one stage, ``--micro-batches`` sequences
per optimizer step, activation checkpointing unless the mode says otherwise):

- ``lit-lora``: bf16 base, LoRA on all linear layers.
- ``lit-qlora``: nf4 base with double quantisation, bf16 compute, LoRA on all linear layers.
- ``lit-qlora-offload``: the same with the checkpointed layer inputs in CPU memory and the embedding on the CPU.
- ``lit-qlora-no-ckpt``: QLoRA without activation checkpointing (what checkpointing saves and costs).
- ``lit-full``: full fine-tuning, bf16 weights, optimi Adam with Kahan summation.
- ``lit-lora-fast`` / ``lit-qlora-fast``: the low-rank path computed in bf16 (LoRA's ``compute_in_weight_dtype:
  false``).
- ``lit-qlora-attn`` (MoE): LoRA on the attention projections only, the experts frozen in 4-bit;
  ``lit-qlora-expert-r2``: rank-2 pairs on the fused expert tensors (LoRA's ``expert_rank``), ``--rank`` elsewhere;
  ``lit-qlora-expert-r2-compile``: the same, the low-rank path in bf16 and each decoder layer compiled.
- ``lit-lora-compile`` / ``lit-qlora-compile``: the fast path with each decoder layer under ``torch.compile``
  (``compile_layers: true``); ``-embcpu`` adds ``embeddings_on_cpu``, ``lit-lora-compile-offload`` and
  ``lit-qlora-compile-embcpu-offload`` ``activation_offload``.
- ``lit-qlora-long`` / ``lit-qlora-long-compile``: long sequences (``long_context: true``: the MLP in chunks of
  4096 tokens, the layer inputs, attention and MLP outputs in CPU memory), the low-rank path in bf16, the embedding
  on the CPU; eager / compiled layers.
- ``lit-qlora-long-compile-cudnn`` / ``lit-qlora-compile-embcpu-cudnn``: the same with cuDNN's fused attention
  tried first (``sdpa_backends: [cudnn, flash, efficient, math]``).

Any lit mode with ``-documents`` appended (``lit-qlora-compile-embcpu-documents``) trains on documents packed on
their own (``data.packing: documents``): random documents of ``--document-tokens MIN:MAX`` tokens (uniform,
seeded), each opening with BOS, packed by lit_qlp's own ``pack_documents`` (best fit, positions restarting per
document, padding at the end of each sequence); its tokens/s counts the real tokens only (the padding left out), and
it reports the padding fraction. The mode without the suffix, in the same command, is the concatenated baseline.

Hugging Face baselines (``--micro-batches`` sequences of micro-batch 1 per optimizer step, non-reentrant
activation checkpointing, AdamW, SDPA; on MoE shapes LoRA also on the fused expert tensors through PEFT's
``target_parameters``, as lit_qlp's ``all-linear`` does):

- ``hf-lora``: PEFT LoRA (alpha = r) on a bf16 base.
- ``hf-qlora``: PEFT LoRA on an nf4 double-quantised base with bf16 compute, without the float32 upcast of
  ``prepare_model_for_kbit_training`` (the fastest QLoRA of ../shared/gpu/README.md).
- ``hf-qlora-kbit``: the usual recipe, with ``prepare_model_for_kbit_training``.
- ``hf-full``: all weights in bf16, torch AdamW.
- ``hf-qlora-attn`` / ``hf-qlora-expert-r2`` (MoE): LoRA on the attention projections only / rank-2 pairs on the
  experts (PEFT's ``rank_pattern``), the baselines of ``lit-qlora-attn`` / ``lit-qlora-expert-r2``.

Prints one table: mode, seq, tokens/s (median step after warm-up), peak GPU memory
(``torch.cuda.max_memory_allocated``), ratio to the HF baseline of the same kind, and the fraction of the physical
limit (6 × linear parameters FLOP per token against the measured bf16 matmul rate).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

LLAMA3 = dict(num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)
"""What the Llama 3 family shares."""

SHAPES = {
    # Llama-3-8B: the reference shape of ../shared/gpu/README.md.
    "llama3-8b": dict(
        LLAMA3,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        tie_word_embeddings=False,
    ),
    # Llama-3.2-1B: tied embeddings.
    "llama-1b": dict(
        LLAMA3,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        tie_word_embeddings=True,
    ),
    # A 70B-class Llama: 140 GB of bf16 weights (use --random-weights).
    "llama3-70b": dict(
        LLAMA3,
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        tie_word_embeddings=False,
    ),
    # Qwen3-30B-A3B: 48 MoE layers of 128 experts (8 active), 30.5 B parameters, 3.3 B active per token.
    "qwen3-30b-a3b": dict(
        model_type="qwen3_moe",
        hidden_size=2048,
        intermediate_size=6144,
        moe_intermediate_size=768,
        num_experts=128,
        num_experts_per_tok=8,
        num_hidden_layers=48,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        vocab_size=151936,
        max_position_embeddings=40960,
        rope_theta=1000000.0,
        tie_word_embeddings=False,
    ),
    # A two-layer Qwen3-MoE for a smoke run of the MoE modes anywhere.
    "tiny-moe": dict(
        model_type="qwen3_moe",
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_experts=8,
        num_experts_per_tok=2,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=512,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    ),
}


def build_model(shape: str, model_dir: Path, device: str, config_only: bool = False) -> None:
    """Saves a random-weight model of ``shape`` (a Llama unless the shape names its ``model_type``) in bf16
    safetensors to ``model_dir`` (skipped if present), or only its ``config.json`` with ``config_only``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if (model_dir / "config.json").is_file():
        return
    options = dict(SHAPES[shape])
    config = AutoConfig.for_model(options.pop("model_type", "llama"), **options, bos_token_id=1, eos_token_id=2)
    if config_only:
        config.save_pretrained(model_dir)
        return
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(model_dir)
    del model
    if device != "cpu":
        torch.cuda.empty_cache()


def linear_parameters(model_dir: Path) -> int:
    """Number of weights each token is multiplied by in the linear layers (decoder projections, the LM head and,
    for MoE models, the active share ``top_k / E`` of the fused expert tensors), from the config alone."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    dense = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
    active = getattr(config, "num_experts_per_tok", None)
    fused = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 3 and ".experts." in n)
    return dense + (fused * active // experts if experts and active else 0)


def matmul_flops(device: str) -> float:
    """Measured bf16 matmul rate (FLOP/s) on a large square product."""
    if device == "cpu":
        n, dtype = 1024, torch.float32
    else:
        n, dtype = 8192, torch.bfloat16
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    synchronize(device)
    repeats = 20
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    rate = 2 * n**3 * repeats / (time.perf_counter() - start)
    del a, b
    if device != "cpu":
        torch.cuda.empty_cache()
    return rate


def synchronize(device: str) -> None:
    if device != "cpu":
        torch.cuda.synchronize()


def peak_memory(device: str) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device != "cpu" else float("nan")


def kernel_seconds(averages) -> float:
    """GPU kernel time in a profile (the profiler table's "Self CUDA time total"), in seconds."""
    from torch.autograd import DeviceType

    total = sum(
        e.self_device_time_total
        for e in averages
        if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
    )
    return total / 1e6


def lit_trainer(device: str, strategy, max_steps: int, callbacks: list, devices: int = 1):
    """A bare Trainer for lit_qlp's real path: ``devices`` processes, no logging, checkpoints, progress or
    evaluation, the sequences in the order the DataLoader gives them."""
    import lightning.pytorch as pl

    return pl.Trainer(
        accelerator="cpu" if device == "cpu" else "gpu",
        devices=devices,
        strategy=strategy,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        use_distributed_sampler=False,  # Lightning would shuffle them otherwise
        callbacks=callbacks,
    )


def fused_experts(model) -> list[str]:
    """PEFT ``target_parameters`` entries for a model's fused expert tensors (3-D parameters under ``.experts.``),
    e.g. ``["experts.down_proj", "experts.gate_up_proj"]``; empty for a dense model."""
    names = {n for n, p in model.named_parameters() if p.dim() == 3 and ".experts." in n}
    return sorted({"experts." + n.rsplit(".", 1)[1] for n in names})


def quantize_linears(model, device: str) -> None:
    """What transformers' bitsandbytes loader does to a model it quantises, done to one already in memory: every
    ``nn.Linear`` but the LM head becomes an nf4 double-quant ``Linear4bit`` with bf16 compute. Fused expert
    tensors are parameters, not ``nn.Linear``, so they stay in bf16, as transformers leaves them."""
    import bitsandbytes as bnb

    head = model.get_output_embeddings()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear or child is head:
                continue
            quantized = bnb.nn.Linear4bit(
                child.in_features,
                child.out_features,
                bias=child.bias is not None,
                compute_dtype=torch.bfloat16,
                quant_type="nf4",
                compress_statistics=True,
                device="meta",
            )
            quantized.weight = bnb.nn.Params4bit(
                child.weight.data.cpu(), requires_grad=False, quant_type="nf4", compress_statistics=True
            ).to(device)
            if child.bias is not None:
                quantized.bias = child.bias
            setattr(parent, name, quantized)
            del child
    torch.cuda.empty_cache()


def hf_lora_options(model, mode: str, rank: int) -> dict:
    """PEFT ``LoraConfig`` keywords of an hf LoRA mode: lit_qlp's ``all-linear`` (every linear layer but the LM
    head, and on MoE models the fused expert tensors as ``target_parameters``), attention only for
    ``hf-qlora-attn``, rank-2 expert pairs for ``hf-qlora-expert-r2``; alpha = r, no dropout."""
    lora = dict(target_modules="all-linear", target_parameters=fused_experts(model))
    if lora["target_parameters"]:
        # PEFT 0.21's "all-linear" beside target_parameters also adapts Qwen3-MoE's router and doubles the
        # gate_up_proj rank: name the linear layers as lit_qlp's all-linear takes them instead.
        head = model.get_output_embeddings()
        linears = (n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head)
        lora["target_modules"] = sorted({n.rsplit(".", 1)[-1] for n in linears})
    if mode == "hf-qlora-attn":
        lora = dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], target_parameters=[])
    elif mode == "hf-qlora-expert-r2":
        lora |= dict(rank_pattern=dict.fromkeys(lora["target_parameters"], 2))
        lora |= dict(alpha_pattern=lora["rank_pattern"])
    return dict(r=rank, lora_alpha=rank, lora_dropout=0.0, **lora)


def run_hf(args, mode: str) -> dict:
    """transformers (+ PEFT), ``--micro-batches`` sequences per optimizer step; median step time after warm-up.
    With ``--random-weights`` the model is built from its config on the device (random bf16 weights) and, for
    the QLoRA modes, quantised in memory as transformers' loader would (``quantize_linears``)."""
    from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

    device = args.device
    qlora = mode.startswith("hf-qlora")
    if args.random_weights:
        config = AutoConfig.from_pretrained(args.model_dir)
        config._attn_implementation = "sdpa"
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        if qlora:
            quantize_linears(model, device)
    else:
        kwargs = {}
        if qlora:
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16,
            )
        model = AutoModelForCausalLM.from_pretrained(
            args.model_dir, dtype=torch.bfloat16, attn_implementation="sdpa", device_map=device, **kwargs
        )
    model.config.use_cache = False
    model.train()  # from_pretrained returns eval mode, in which transformers skips activation checkpointing
    if mode == "hf-qlora-kbit":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if mode != "hf-full":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(**hf_lora_options(model, mode, args.rank)))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    vocab = model.config.vocab_size
    times = []
    for _ in range(args.warmup + args.steps):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(args.micro_batches):
            ids = torch.randint(0, vocab, (1, args.seq), device=device)
            (model(input_ids=ids, labels=ids).loss / args.micro_batches).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        times.append(time.perf_counter() - start)
    step = statistics.median(times[args.warmup :])
    return {
        "tokens_per_s": args.micro_batches * args.seq / step,
        "peak_gib": peak_memory(device),
        "step_s": step,
        "trainable": sum(p.numel() for p in params),
    }


CUDNN = ["cudnn", "flash", "efficient", "math"]
"""``sdpa_backends`` of the ``-cudnn`` modes."""

FAST = dict(compute_in_weight_dtype=False)
LIT_MODES = {
    "lit-lora": dict(training="lora"),
    "lit-qlora": dict(training="qlora"),
    "lit-qlora-offload": dict(training="qlora", activation_offload=True, embeddings_on_cpu=True),
    "lit-qlora-no-ckpt": dict(training="qlora", activation_checkpointing=False),
    "lit-full": dict(training="full"),
    "lit-lora-fast": dict(training="lora", **FAST),
    "lit-qlora-fast": dict(training="qlora", **FAST),
    "lit-lora-compile": dict(training="lora", **FAST, compile_layers=True),
    "lit-qlora-compile": dict(training="qlora", **FAST, compile_layers=True),
    "lit-lora-compile-embcpu": dict(training="lora", **FAST, compile_layers=True, embeddings_on_cpu=True),
    "lit-qlora-compile-embcpu": dict(training="qlora", **FAST, compile_layers=True, embeddings_on_cpu=True),
    "lit-lora-compile-offload": dict(training="lora", **FAST, compile_layers=True, activation_offload=True),
    "lit-qlora-compile-embcpu-offload": dict(
        training="qlora", **FAST, compile_layers=True, embeddings_on_cpu=True, activation_offload=True
    ),
    # Long sequences (model.long_context): the MLP in chunks of 4096 tokens; layer inputs, attention and MLP outputs on
    # the host.
    "lit-qlora-long": dict(training="qlora", **FAST, long_context=True, embeddings_on_cpu=True),
    "lit-qlora-long-compile": dict(
        training="qlora", **FAST, long_context=True, embeddings_on_cpu=True, compile_layers=True
    ),
    # cuDNN's fused attention first (model.sdpa_backends), flash attention where cuDNN does not take a call.
    "lit-qlora-long-compile-cudnn": dict(
        training="qlora", **FAST, long_context=True, embeddings_on_cpu=True, compile_layers=True, sdpa_backends=CUDNN
    ),
    "lit-qlora-compile-embcpu-cudnn": dict(
        training="qlora", **FAST, compile_layers=True, embeddings_on_cpu=True, sdpa_backends=CUDNN
    ),
    # MoE: LoRA on the attention projections only (the experts frozen in 4-bit).
    "lit-qlora-attn": dict(training="qlora", target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    # MoE: rank-2 pairs on the experts (--rank on the linear layers).
    "lit-qlora-expert-r2": dict(training="qlora", expert_rank=2),
    "lit-qlora-expert-r2-compile": dict(training="qlora", expert_rank=2, **FAST, compile_layers=True),
}
"""Each lit mode: ``training`` (lora: LoRA on a bf16 base; qlora: LoRA on an nf4 double-quant base; full), the
LoRA's ``compute_in_weight_dtype``, the strategy's activation options and the module's other options."""


DOCUMENTS = "-documents"
"""Suffix of a lit mode that trains on documents packed on their own."""


def document_rows(rows: int, seq: int, vocab: int, lengths: tuple[int, int]) -> tuple[list[dict], float]:
    """``rows`` batch rows of random documents of ``lengths[0]``..``lengths[1]`` tokens (BOS + random ids) packed on
    their own by ``lit_qlp.data.packing.pack_documents``, and the fraction of their tokens that is padding."""
    import numpy as np

    from lit_qlp.data.packing import pack_documents
    from lit_qlp.data.tokenize import Encoded

    rng = np.random.default_rng(0)
    documents: list = []
    packed = None
    while packed is None or len(packed.input_ids) < rows + 1:  # the last row may be the only one left half empty
        for _ in range(max(rows, 1) * seq // lengths[0]):
            ids = rng.integers(3, vocab, int(rng.integers(lengths[0], lengths[1] + 1)))
            documents.append(Encoded(ids, np.ones(len(ids), dtype=bool)))
        packed = pack_documents(documents, [0] * len(documents), seq, [1], "split", pad_id=0)
    batch = [
        {
            "input_ids": torch.from_numpy(packed.input_ids[r]),
            "labels": torch.from_numpy(packed.labels[r]),
            "position_ids": torch.from_numpy(packed.position_ids[r]),
        }
        for r in range(rows)
    ]
    return batch, float((packed.input_ids[:rows] == 0).mean())  # padding is id 0, documents are BOS (1) and 3+


def lit_module_options(options: dict, rank: int) -> tuple[dict, dict]:
    """``CausalLMModule`` and ``PipelineStrategy`` keyword arguments of a ``LIT_MODES`` entry."""
    from lit_qlp.bases import BitsAndBytes4bit
    from lit_qlp.methods import FullFineTuning, LoRA

    options = dict(options)
    training = options.pop("training")
    strategy = {k: options.pop(k) for k in ("activation_checkpointing", "activation_offload") if k in options}
    lora = {k: options.pop(k) for k in ("compute_in_weight_dtype", "target_modules", "expert_rank") if k in options}
    if training == "full":
        options["method"] = FullFineTuning()
    else:
        options["method"] = LoRA(rank=rank, **lora)
    if training == "qlora":
        options["base"] = BitsAndBytes4bit("nf4", double_quant=True)
    return options, strategy


def run_lit(args, mode: str) -> dict:
    """lit_qlp's real path: Trainer + CausalLMModule + PipelineStrategy on synthetic token batches."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from lit_qlp.module import CausalLMModule
    from lit_qlp.strategies import PipelineStrategy

    device = args.device
    times: list[float] = []

    class StepTimer(pl.Callback):
        profiler = None
        kernel_seconds: float | None = None
        per_process: list[tuple[float, float | None]] = []  # (peak memory, GPU kernel seconds) of every process
        timed_peak: float | None = None  # the peak up to the timed steps' end, before --memory's step resets it

        def on_train_end(self, trainer, pl_module):
            peak = self.timed_peak if self.timed_peak is not None else peak_memory(device)
            self.per_process = trainer.strategy.all_gather_object((peak, self.kernel_seconds))

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if args.memory and batch_idx == args.warmup + args.steps:  # one more step, not timed
                self.timed_peak = peak_memory(device)
                torch.cuda.memory._record_memory_history(max_entries=1_000_000, stacks="python")
                torch.cuda.reset_peak_memory_stats()
            if args.profile and batch_idx == args.warmup + args.steps:  # one more step, not timed
                activities = [torch.profiler.ProfilerActivity.CPU]
                if device != "cpu":
                    activities.append(torch.profiler.ProfilerActivity.CUDA)
                self.profiler = torch.profiler.profile(activities=activities)
                self.profiler.__enter__()
            synchronize(device)
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            synchronize(device)
            extra = batch_idx == args.warmup + args.steps  # the untimed step of --profile / --memory
            suffix = f"-rank{trainer.global_rank}" if trainer.world_size > 1 else ""
            if args.memory and extra:
                from memory_peak import peak_breakdown  # tools/, this script's directory

                snapshot = torch.cuda.memory._snapshot()
                torch.cuda.memory._record_memory_history(enabled=None)
                args.memory.mkdir(parents=True, exist_ok=True)
                try:
                    breakdown = peak_breakdown(snapshot)
                except Exception as error:  # the measured steps are done; their figures still count
                    breakdown = f"breakdown failed: {error!r}\n"
                    print(f"[{mode}] --memory: {breakdown}", file=sys.stderr, end="")
                (args.memory / f"memory-{mode}{suffix}.txt").write_text(breakdown)
            if not extra:
                times.append(time.perf_counter() - self.start)
                if trainer.global_rank == 0:  # as it happens, so that a run stopped later still tells
                    print(f"[{mode}] step {batch_idx} {times[-1]:.2f} s", file=sys.stderr, flush=True)
            elif self.profiler is not None:
                self.profiler.__exit__(None, None, None)
                averages = self.profiler.key_averages()
                sorts = (
                    ["cpu_time_total"]
                    if device == "cpu"
                    else ["cuda_time_total", "self_cuda_time_total", "self_cpu_time_total"]
                )
                tables = [f"sorted by {sort}\n" + averages.table(sort_by=sort, row_limit=40) for sort in sorts]
                args.profile.mkdir(parents=True, exist_ok=True)
                (args.profile / f"profile-{mode}{suffix}.txt").write_text("\n".join(tables))
                self.kernel_seconds = kernel_seconds(averages)
                self.profiler = None

    documents = mode.endswith(DOCUMENTS)
    padding = 0.0

    class RandomTokens(pl.LightningDataModule):
        def train_dataloader(self):
            nonlocal padding
            if documents:
                rows, padding = document_rows(total, args.seq, vocab, args.document_tokens)
            else:
                generator = torch.Generator().manual_seed(0)
                ids = torch.randint(0, vocab, (total, args.seq), generator=generator)
                rows = [{"input_ids": r, "labels": r} for r in ids]
            return DataLoader(rows, batch_size=args.micro_batches)

    options, strategy_options = lit_module_options(LIT_MODES[mode.removesuffix(DOCUMENTS)], args.rank)
    module = CausalLMModule(args.model_dir, dtype="bfloat16", lr=1e-5, random_weights=args.random_weights, **options)
    vocab = module.source.config.vocab_size
    replicas = args.devices // args.pipeline_stages
    steps = args.warmup + args.steps + (1 if args.profile or args.memory else 0)
    total = steps * args.micro_batches * replicas
    strategy = PipelineStrategy(
        pipeline_stages=args.pipeline_stages,
        gradient_accumulation_steps=args.micro_batches,
        partition_method=args.partition_method,
        **strategy_options,
    )
    timer = StepTimer()
    trainer = lit_trainer(device, strategy, steps, [timer], devices=args.devices)
    trainer.fit(module, RandomTokens())
    if trainer.global_rank != 0:
        return None
    step = statistics.median(times[args.warmup : args.warmup + args.steps])
    result = {
        "tokens_per_s": replicas * args.micro_batches * args.seq * (1 - padding) / step,
        "padding": padding,
        "peak_gib": max(peak for peak, _ in timer.per_process),
        "peak_gib_per_process": [peak for peak, _ in timer.per_process],
        "step_s": step,
        "trainable": sum(p.numel() for p in module.parameters() if p.requires_grad),
    }
    if args.profile:  # per pipeline stage: how busy its GPU was in one step
        result["kernel_s_per_process"] = [busy for _, busy in timer.per_process]
    return result


HF_MODES = ("hf-lora", "hf-qlora", "hf-qlora-kbit", "hf-full", "hf-qlora-attn", "hf-qlora-expert-r2")
RUNNERS = {
    **{mode: functools.partial(run_lit, mode=mode) for mode in LIT_MODES},
    **{mode + DOCUMENTS: functools.partial(run_lit, mode=mode + DOCUMENTS) for mode in LIT_MODES},
    **{mode: functools.partial(run_hf, mode=mode) for mode in HF_MODES},
}
# Each lit mode against the HF baseline of its training mode; the usual QLoRA recipe against the fastest one.
BASELINE = (
    {mode: f"hf-{options['training']}" for mode, options in LIT_MODES.items()}
    | {mode + DOCUMENTS: mode for mode in LIT_MODES}
    | {
        "hf-qlora-kbit": "hf-qlora",
        "lit-qlora-attn": "hf-qlora-attn",
        "lit-qlora-expert-r2": "hf-qlora-expert-r2",
        "lit-qlora-expert-r2-compile": "hf-qlora-expert-r2",
    }
)


def run_mode(command: list[str]) -> tuple[int, str, str]:
    """Run one mode's process: its stderr goes on to ours line by line as it comes (each step's time, so that a run
    cut short by a time limit still shows what it measured) and is kept too; returns (exit status, stdout, stderr)."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    kept: list[str] = []

    def forward() -> None:
        for line in proc.stderr:
            sys.stderr.write(line)
            kept.append(line)

    thread = threading.Thread(target=forward, daemon=True)
    thread.start()
    stdout = proc.stdout.read()
    proc.wait()
    thread.join()
    return proc.returncode, stdout, "".join(kept)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--model-dir", type=Path, default=None, help="default: /tmp/bench-<shape>")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--micro-batches", type=int, default=8, help="lit_qlp sequences per optimizer step")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--modes", default="lit-qlora,hf-qlora")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="lit modes: write a torch profiler table of one more step, after the timed ones, here (one per "
        "process), and report each process's GPU kernel time in that step: per pipeline stage, how busy it was",
    )
    parser.add_argument(
        "--memory",
        type=Path,
        default=None,
        help="lit modes on CUDA: record the allocator's history in one more step, after the timed ones, and write "
        "what is live at its peak, by where it was allocated (tools/memory_peak.py), here; the table's peak stays "
        "the timed steps'",
    )
    parser.add_argument("--devices", type=int, default=1, help="lit modes: processes (one GPU each)")
    parser.add_argument("--pipeline-stages", type=int, default=1, help="lit modes: pipeline stages")
    parser.add_argument("--partition-method", default="compute", help="lit modes: the strategy's partition_method")
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="write only the config; lit_qlp fills random weights on each stage's device, the hf modes build the "
        "model from the config on the device",
    )
    parser.add_argument(
        "--document-tokens",
        type=lambda v: tuple(int(n) for n in v.split(":")),
        default=(200, 800),
        help="modes ending in -documents: MIN:MAX tokens per random document (default 200:800)",
    )
    parser.add_argument("--run", choices=sorted(RUNNERS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.model_dir = args.model_dir or Path(f"/tmp/bench-{args.shape}")

    low, *high = args.document_tokens
    if len(high) != 1 or not 0 < low <= high[0]:
        parser.error(
            f"--document-tokens={':'.join(map(str, args.document_tokens))} must be MIN:MAX with 0 < MIN <= MAX"
        )
    if args.memory and args.device == "cpu":
        parser.error("--memory records the CUDA allocator; it needs --device cuda")
    if args.devices % args.pipeline_stages:
        parser.error(f"--devices={args.devices} must be a multiple of --pipeline-stages={args.pipeline_stages}")
    if args.run:
        result = RUNNERS[args.run](args)
        if result is not None:  # data-parallel and later-stage processes of a multi-process run report nothing
            print("RESULT " + json.dumps(result), flush=True)
        return

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in RUNNERS]
    if unknown:
        parser.error(f"--modes: unknown {unknown}; choose from {sorted(RUNNERS)}")
    build_model(args.shape, args.model_dir, args.device, config_only=args.random_weights)
    flops = matmul_flops(args.device)
    limit = flops / (6 * linear_parameters(args.model_dir))
    results = {}
    for mode in modes:
        command = [sys.executable, __file__, "--run", mode] + [a for a in sys.argv[1:] if a != "--run"]
        returncode, stdout, stderr = run_mode(command)
        lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
        if returncode != 0 or not lines:
            print(stdout[-2000:], file=sys.stderr)
            print(f"benchmark mode {mode} failed (exit {returncode})", file=sys.stderr)
            last = stderr.strip().splitlines()[-1:] or ["?"]
            results[mode] = {"error": last[0][:200]}
            continue
        results[mode] = json.loads(lines[-1][len("RESULT ") :])
        print(f"{mode}: {results[mode]}", flush=True)

    layout = f"{args.devices} processes, {args.pipeline_stages} stages ({args.partition_method})"
    print(
        f"\nshape {args.shape}, seq {args.seq}, LoRA r={args.rank}, matmul {flops / 1e12:.0f} TFLOP/s, "
        f"limit {limit:,.0f} tokens/s per GPU" + (f"; lit modes: {layout}" if args.devices > 1 else "")
    )
    print(
        "| mode | seq | tokens/s | peak GPU memory (GiB) | vs baseline | of physical limit | peak per process "
        "| trainable |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for mode, r in results.items():
        if "error" in r:
            print(f"| {mode} | {args.seq} | failed: {r['error']} | | | | | |")
            continue
        base = results.get(BASELINE.get(mode, ""))
        base = base if base and "error" not in base else None
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "baseline"
        gpus = args.devices if mode.startswith("lit-") else 1
        peaks = ", ".join(f"{p:.2f}" for p in r.get("peak_gib_per_process", [r["peak_gib"]]))
        if r.get("padding"):
            ratio += f" ({r['padding']:.1%} padding)"
        print(
            f"| {mode} | {args.seq} | {r['tokens_per_s']:,.0f} | {r['peak_gib']:.2f} | {ratio} | "
            f"{r['tokens_per_s'] / (limit * gpus):.1%} | {peaks} | {r.get('trainable', 0):,} |"
        )
    for mode, r in results.items():
        if r.get("kernel_s_per_process"):
            busy = ", ".join(f"{b:.2f} s ({b / r['step_s']:.0%})" for b in r["kernel_s_per_process"])
            print(f"{mode}: GPU kernel time per process (profiled step) against the {r['step_s']:.2f} s step: {busy}")
    if args.json:
        args.json.write_text(json.dumps({"limit": limit, "matmul_flops": flops, "results": results}, indent=2))
    failed = [mode for mode, r in results.items() if "error" in r]
    if failed:
        sys.exit(f"benchmark: {', '.join(failed)} failed (above)")


if __name__ == "__main__":
    main()
