"""CausalLMModule: what to train (model, adapters, optimizer) and how one step feeds the pipeline."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from typing_extensions import override

from lit_qlp.adapters.control import (
    ControlAdapter,
    ControlAdapterLayer,
    control_adapter_config,
    control_tensors,
    regularize_,
)
from lit_qlp.adapters.lora import (
    LoraAdapter,
    LoraLinear,
    composite_decay_,
    lora_tensors,
    peft_adapter_config,
    save_peft_adapter,
    update_norms,
)
from lit_qlp.adapters.targeting import ALL_LINEAR, check_targets, linear_names, match_targets, parse_layer_ranges
from lit_qlp.kernels import TokenWeightedLoss
from lit_qlp.kernels.cross_entropy import IGNORE_INDEX
from lit_qlp.models.checkpoint import copy_tokenizer_files
from lit_qlp.models.pipeline import (
    DecoderLayerPipe,
    EmbeddingPipe,
    ModelSource,
    OutputPipe,
    stage_weights,
    tied_head,
)
from lit_qlp.models.quantize import Quantization, check_bitsandbytes, import_bitsandbytes
from lit_qlp.strategies.pipeline import PipelineSpec


def shift_left(tensor: torch.Tensor, fill: int) -> torch.Tensor:
    """``out[..., t] = tensor[..., t + 1]`` with the last position ``fill``: targets aligned with next-token logits."""
    return F.pad(tensor[..., 1:], (0, 1), value=fill)


class CausalLMModule(pl.LightningModule):
    """Fine-tunes a Hugging Face decoder-only language model through the pipeline strategy.

    Args:
        model_dir: Hugging Face model directory (config.json, safetensors weights, tokenizer files).
        mode: What trains, one choice:
            "lora": low-rank adapters on the frozen base weights (in ``dtype``);
            "qlora": the same with the decoder layers' linear weights frozen in bitsandbytes 4-bit (quantised as
            each stage loads them; embeddings and LM head stay in ``dtype``);
            "full": the weights themselves (in ``dtype``, bf16 by default, updated by optimi Adam with Kahan
            summation instead of a float32 master copy), restricted by ``target_modules`` and
            ``layers_to_transform``; each epoch's export is a Hugging Face model directory;
            "control": Control Adapters (rank ``lora_rank``) after the decoder layers of ``layers_to_transform``,
            steered by the datasets' ``control_class``.
        dtype: Dtype of the model's weights and activations ("float32" for CPU runs and exactness tests); for
            "qlora" also the dtype the 4-bit weights are dequantised to for each matmul.
        attn_implementation: "sdpa" or "eager"; architectures without SDPA support fall back to "eager".
        lora_rank: LoRA (or Control Adapter) rank r. alpha is fixed to r (scale 1): tune ``lr`` instead of alpha.
        lora_dropout: Dropout on the LoRA input (Control Adapters: on the layer's residual update).
        target_modules: What trains. For "lora"/"qlora", the linear layers that get adapters: "all-linear" (every
            linear layer of the decoder layers, the default) or names such as ``[q_proj, v_proj]``. For "full",
            the modules whose weights train: unset trains everything (embeddings, decoder layers, final norm,
            head), "all-linear" the decoder layers' linear layers, or names such as ``[self_attn, mlp, lm_head]``
            (a name selects every module at or below a module of that name). With tied embeddings,
            ``embed_tokens`` and ``lm_head`` are one matrix: naming either trains it.
        layers_to_transform: Decoder layers that get adapters (or, for "full", whose weights train), e.g. "0:31",
            "0:10,20:25,30" or "1,3,5" (inclusive ranges); all layers when unset.
        lora_weight_dtype: Dtype of the LoRA (or Control Adapter) weights and of their optimizer state.
        lora_compute_in_weight_dtype: LoRA/QLoRA: compute the low-rank path in ``lora_weight_dtype`` (true, as PEFT
            does: the layer input is copied to float32) or in the activations' dtype with A and B cast to it
            (false: bf16 matmuls and no float32 copies, faster; weights, gradients and optimizer state stay in
            ``lora_weight_dtype``).
        lora_weight_decay: Composite weight decay λ of each LoRA pair, applied after every optimizer step as a
            gradient step on ½‖BA‖²_F (``A -= lr·λ·BᵀBA``, ``B -= lr·λ·BAAᵀ``), which shrinks the update ``BA``
            itself rather than A and B separately; for "control", ``S -= lr·λ·S``. Needs float32 adapter
            weights; not for "full".
        control_adapter_gamma: "control": after every optimizer step ``Q ← Q - γ Q (QᵀQ - I)`` pulls Q back to
            orthonormal columns; γ in (0, 0.5].
        quant_type: "qlora": the 4-bit format, "nf4" (default) or "fp4".
        double_quant: "qlora": also quantise the per-block scales (saves about 0.4 bits per weight).
        embeddings_on_cpu: "lora"/"qlora": keep the frozen embedding matrix in CPU memory (saves vocab × hidden
            × 2 bytes of GPU memory on the first stage, 1 GiB for Llama-3-8B; costs a small copy per step).
        lr: Learning rate of the optimizer (optimi Adam).
        betas: Adam's (beta1, beta2).
        eps: Adam's epsilon.
        loss_implementation: The fused LM head + cross-entropy: "auto" (Triton on CUDA, torch on CPU), "triton"
            or "torch".
        loss_chunk_size: Tokens per chunk of the fused head + loss; the last stage holds this many tokens' logits
            at a time instead of the whole sequence's.
        compile_layers: ``torch.compile`` each decoder layer (with its adapters and rotary embedding; the
            attention mask stays eager): norms, rotary, SwiGLU, residual and LoRA additions fuse into few kernels,
            QLoRA's dequantisation into one, and far fewer kernel launches leave the GPU less idle (the eager step
            of an 8B model on an H200 waits on the CPU). All layers share one compiled graph. The first step of
            each shape (training, evaluation) compiles first, about a minute on an 8B model; after a second
            sequence length the code is recompiled for any length.
        trust_remote_code: Allow custom model code from ``model_dir``'s config.
        random_weights: Random weights instead of ``model_dir``'s checkpoint (which then needs only
            ``config.json``): for measuring the speed and memory of a shape without its weights, as
            ``tools/benchmark.py --random-weights`` does; the trained result means nothing.
    """

    def __init__(
        self,
        model_dir: Path,
        mode: Literal["lora", "qlora", "full", "control"] = "lora",
        dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16",
        attn_implementation: Literal["sdpa", "eager"] = "sdpa",
        lora_rank: int = 64,
        lora_dropout: float = 0.0,
        target_modules: str | list[str] | None = None,
        layers_to_transform: str | None = None,
        lora_weight_dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        lora_weight_decay: float = 0.0,
        lora_compute_in_weight_dtype: bool = True,
        control_adapter_gamma: float = 0.5,
        quant_type: Literal["nf4", "fp4"] = "nf4",
        double_quant: bool = True,
        embeddings_on_cpu: bool = False,
        lr: float = 2e-5,
        betas: tuple[float, float] = (0.9, 0.99),
        eps: float = 1e-6,
        loss_implementation: Literal["auto", "triton", "torch"] = "auto",
        loss_chunk_size: int = 1024,
        compile_layers: bool = False,
        trust_remote_code: bool = False,
        random_weights: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model_dir = Path(model_dir)
        if not (self.model_dir / "config.json").is_file():
            raise FileNotFoundError(
                f"model.model_dir={str(model_dir)!r} has no config.json; point it at a Hugging Face model directory"
            )
        if lora_rank < 1:
            raise ValueError(f"model.lora_rank={lora_rank} must be a positive integer")
        if not 0 <= lora_dropout < 1:
            raise ValueError(f"model.lora_dropout={lora_dropout} must be in [0, 1)")
        if lr <= 0:
            raise ValueError(f"model.lr={lr} must be positive")
        if lora_weight_decay < 0:
            raise ValueError(f"model.lora_weight_decay={lora_weight_decay} must be >= 0")
        if mode == "full" and lora_weight_decay:
            raise ValueError(
                f"model.lora_weight_decay={lora_weight_decay} applies to LoRA pairs, and model.mode=full trains no "
                "LoRA; remove model.lora_weight_decay or use model.mode=lora/qlora"
            )
        if not 0 < control_adapter_gamma <= 0.5:
            raise ValueError(f"model.control_adapter_gamma={control_adapter_gamma} must be in (0, 0.5]")
        if lora_weight_decay and lora_weight_dtype != "float32":
            raise ValueError(
                f"model.lora_weight_decay needs float32 LoRA weights, but model.lora_weight_dtype={lora_weight_dtype!r}"
                "; set model.lora_weight_dtype=float32"
            )
        if mode == "full" and embeddings_on_cpu:
            raise ValueError(
                "model.embeddings_on_cpu keeps frozen embeddings on the CPU, but model.mode=full may train them; "
                "remove model.embeddings_on_cpu or use model.mode=lora/qlora"
            )
        quantization = None
        if mode == "qlora":
            import_bitsandbytes()
            quantization = Quantization(quant_type, double_quant, getattr(torch, dtype))
        self.mode = mode
        self.lora_rank = lora_rank
        self.lora_dropout = lora_dropout
        self.target_modules = target_modules
        self.layers_to_transform = layers_to_transform
        self.lora_weight_dtype = lora_weight_dtype
        self.lora_weight_decay = lora_weight_decay
        self.lora_compute_in_weight_dtype = lora_compute_in_weight_dtype
        self.control_adapter_gamma = control_adapter_gamma
        self.embeddings_on_cpu = embeddings_on_cpu
        self.compile_layers = compile_layers
        self.lr = lr
        self.betas = tuple(betas)
        self.eps = eps
        self.source = ModelSource(
            self.model_dir,
            dtype,
            attn_implementation,
            trust_remote_code=trust_remote_code,
            quantization=quantization,
            random_weights=random_weights,
        )
        num_layers = self.source.quirks.num_layers
        self.adapter_layers = parse_layer_ranges(layers_to_transform, num_layers, key="model.layers_to_transform")
        if mode == "control":
            if lora_rank > self.source.config.hidden_size:
                raise ValueError(
                    f"model.lora_rank={lora_rank} exceeds the hidden size {self.source.config.hidden_size}: a "
                    "Control Adapter's Q has orthonormal columns, at most hidden_size of them"
                )
            self.targeted = []
            self.tied_training = False
        elif mode == "full":
            trained = full_trainable_parameters(self.source.skeleton, target_modules, self.adapter_layers)
            self.source.trainable = trained.__contains__
            self.tied_training = self.source.quirks.tie_word_embeddings and "model.embed_tokens.weight" in trained
            self.targeted = []
        else:
            targets = ALL_LINEAR if target_modules is None else target_modules
            decoder_linears = linear_names(self.source.submodule("model.layers.0"))
            check_targets(decoder_linears, targets, f"{self.model_dir.name}'s decoder layers")
            self.targeted = [n.rsplit(".", 1)[-1] for n in match_targets(decoder_linears, targets)]
            self.tied_training = False
        if loss_chunk_size < 1:
            raise ValueError(f"model.loss_chunk_size={loss_chunk_size} must be a positive number of tokens")
        self.loss_fn = TokenWeightedLoss(loss_implementation, loss_chunk_size)
        self.pipe: torch.nn.Module | None = None
        self._eval_loss_sum = 0.0
        self._eval_tokens = 0

    # ----------------------------------------------------------------- model
    def pipeline_spec(self, device: torch.device) -> PipelineSpec:
        """The pipeline layers of this model: embedding, decoder layers (with adapters), norm + head."""
        from deepspeed.pipe import LayerSpec, TiedLayerSpec

        self.source.device = torch.device(device)
        adapter = None
        if self.mode == "control":
            adapter = ControlAdapter(
                rank=self.lora_rank,
                dropout=self.lora_dropout,
                layers=self.adapter_layers,
                hidden_size=self.source.config.hidden_size,
                dtype=getattr(torch, self.lora_weight_dtype),
                seed=torch.initial_seed(),
            )
        elif self.mode != "full":
            adapter = LoraAdapter(
                rank=self.lora_rank,
                alpha=self.lora_rank,
                dropout=self.lora_dropout,
                target_modules=self.targeted,
                layers=self.adapter_layers,
                dtype=getattr(torch, self.lora_weight_dtype),
                seed=torch.initial_seed(),
                compute_in_input_dtype=not self.lora_compute_in_weight_dtype,
            )
        counts = stage_weights(self.source)
        num_layers = self.source.quirks.num_layers
        decoders = [
            LayerSpec(DecoderLayerPipe, self.source, i, adapter, compile=self.compile_layers) for i in range(num_layers)
        ]
        if self.tied_training:
            # One embedding matrix, trained, on the first and the last stage: DeepSpeed keeps the copies equal.
            weight = "embed_tokens.weight"
            layers = [
                TiedLayerSpec("embeddings", EmbeddingPipe, self.source, self.loss_fn, tied_weight_attr=weight),
                *decoders,
                LayerSpec(OutputPipe, self.source, self.loss_fn, tied=True),
                TiedLayerSpec(
                    "embeddings",
                    EmbeddingPipe,
                    self.source,
                    self.loss_fn,
                    forward_fn=tied_head,
                    tied_weight_attr=weight,
                ),
            ]
            norm = float(self.source.num_parameters("model.norm"))
            counts = [*counts[:-1], norm, counts[0]]
        else:
            embedding = LayerSpec(EmbeddingPipe, self.source, on_cpu=self.embeddings_on_cpu)
            layers = [embedding, *decoders, LayerSpec(OutputPipe, self.source, self.loss_fn)]
        return PipelineSpec(
            layers=layers,
            parameter_counts=counts,
            loss_fn=self.loss_fn,
            checkpointable_layers=[DecoderLayerPipe.__name__],
        )

    @override
    def configure_optimizers(self):
        from optimi import Adam

        if self.pipe is None:
            raise RuntimeError("CausalLMModule needs PipelineStrategy (trainer.strategy) to build its layers")
        params = [p for p in self.pipe.parameters() if p.requires_grad]
        return Adam(params, lr=self.lr, betas=self.betas, eps=self.eps, weight_decay=0.0)

    # ----------------------------------------------------------------- steps
    def micro_batches(self, batch: dict[str, torch.Tensor]) -> tuple[list, torch.Tensor]:
        """Splits a batch of ``[micro_batches, seq]`` tensors into the engine's ``((inputs), labels)`` items.

        Labels and control classes are shifted one position left so that position t holds the target of the
        logits at t; the last position carries no loss (label -100, class 0).

        Returns:
            The micro-batches and the number of labelled tokens in them.
        """
        input_ids = batch["input_ids"].to(self.device)
        labels = shift_left(batch["labels"].to(self.device), IGNORE_INDEX)
        control = batch.get("control_classes")
        control = shift_left(control.to(self.device), 0) if control is not None else torch.zeros_like(input_ids)
        positions = torch.arange(input_ids.shape[1], device=self.device).unsqueeze(0)
        items = [
            ((input_ids[i : i + 1], positions, control[i : i + 1]), labels[i : i + 1])
            for i in range(input_ids.shape[0])
        ]
        return items, (labels != IGNORE_INDEX).sum()

    @override
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        items, num_tokens = self.micro_batches(batch)
        result = self.trainer.strategy.train_batch(items, num_tokens)
        lr = self.trainer.optimizers[0].param_groups[0]["lr"]
        if self.mode == "control":
            self.regularize_control_adapters(lr)
        elif self.mode != "full":
            self.decay_lora(lr)
        self.log("train/loss", result.loss, prog_bar=True, rank_zero_only=True)
        self.log("train/lr", lr, rank_zero_only=True)
        return result.loss

    def decay_lora(self, lr: float) -> None:
        """The composite decay of every LoRA pair (when ``lora_weight_decay`` > 0) and the ‖BA‖_F metrics."""
        named = [(name, m) for name, m in self.pipe.named_modules() if isinstance(m, LoraLinear)]
        loras = [m for _, m in named]
        before = update_norms(loras)
        if self.lora_weight_decay:
            for module in loras:
                composite_decay_(module, lr, self.lora_weight_decay)
        after = update_norms(loras) if self.lora_weight_decay else before
        stats = {name: {"norm": a, "weight_decay": b - a} for (name, _), a, b in zip(named, after, before)}
        self.log_adapter_stats(stats, ["norm"] + (["weight_decay"] if self.lora_weight_decay else []))

    def regularize_control_adapters(self, lr: float) -> None:
        """The post-step regulariser of every Control Adapter, with its metrics reduced over all stages."""
        stats = {}
        for layer in self.pipe.forward_funcs:
            if isinstance(getattr(layer, "layer", None), ControlAdapterLayer):
                stats[layer.index] = regularize_(layer.layer, self.control_adapter_gamma, lr, self.lora_weight_decay)
        self.log_adapter_stats(stats, ["norm", "orthogonality"] + (["weight_decay"] if self.lora_weight_decay else []))

    def log_adapter_stats(self, stats: dict, names: list[str]) -> None:
        """Logs ``train/<metric>_{avg,min,max}`` over the adapters of all stages (``norm`` as ``train/norms_*``).

        ``stats`` maps each local adapter (a name unique across stages) to its metrics; collective.
        """
        merged: dict = {}
        for part in self.trainer.strategy.all_gather_object(stats):
            merged.update(part)  # data-parallel replicas report the same adapters with the same values
        if not merged:
            return
        for name in names:
            values = [m[name] for m in merged.values()]
            prefix = "train/norms" if name == "norm" else f"train/{name}"
            self.log(f"{prefix}_avg", sum(values) / len(values), rank_zero_only=True)
            self.log(f"{prefix}_min", min(values), rank_zero_only=True)
            self.log(f"{prefix}_max", max(values), rank_zero_only=True)

    @override
    def on_validation_epoch_start(self) -> None:
        self._eval_loss_sum = 0.0
        self._eval_tokens = 0

    @override
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        items, num_tokens = self.micro_batches(batch)
        result = self.trainer.strategy.eval_batch(items, num_tokens)
        self._eval_loss_sum += float(result.loss) * result.num_tokens
        self._eval_tokens += result.num_tokens

    @override
    def on_validation_epoch_end(self) -> None:
        if self._eval_tokens:
            loss = self._eval_loss_sum / self._eval_tokens
            self.log("eval/loss", loss, prog_bar=True, sync_dist=True)  # equal on all ranks already

    def check_device(self, device: torch.device) -> None:
        """Called by the strategy before anything is written: fails early when the device or the data cannot run
        this mode."""
        if self.mode == "qlora":
            check_bitsandbytes(device)
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if self.mode != "control" and datamodule is not None:
            steered = [s.dataset_path for s in getattr(datamodule, "datasets", []) if s.control_class]
            if steered:
                raise ValueError(
                    f"data.datasets {steered} set control_class, which only Control Adapters use, but "
                    f"model.mode={self.mode}; set model.mode=control or remove control_class"
                )

    # ----------------------------------------------------------------- export
    def export(self, directory: Path, layers: list | None = None, stages: Any = None) -> None:
        """Writes what trained into ``directory``, with the tokenizer files.

        LoRA/QLoRA: a PEFT adapter (``adapter_config.json``, ``adapter_model.safetensors``). Full fine-tuning: a
        Hugging Face model directory (``config.json``, sharded safetensors with an index), loadable with
        ``AutoModelForCausalLM.from_pretrained``.

        Collective: every rank must call it.

        Args:
            directory: Where to write.
            layers: This process's pipeline layers; by default those of the running pipeline.
            stages: What gathers the stages' tensors (``gather_from_stages``, ``all_gather_object``, ``barrier``,
                ``stage_id``, ``data_parallel_rank``, ``is_global_zero``); by default the trainer's strategy.
                ``SingleProcessStages`` exports layers that one process holds (tools/convert_ds_checkpoint.py).
        """
        layers = list(self.pipe.forward_funcs if layers is None else layers)
        stages = self.trainer.strategy if stages is None else stages
        if self.mode == "full":
            self.export_model(directory, layers, stages)
        elif self.mode == "control":
            self.export_control_adapter(directory, layers, stages)
        else:
            self.export_adapter(directory, layers, stages)

    def export_control_adapter(self, directory: Path, layers: list, stages: Any) -> None:
        """Writes ``adapter_model.safetensors`` (``...layers.{i}.control_Q`` / ``control_S``), the config and the
        tokenizer files into ``directory``. Collective."""
        gathered = stages.gather_from_stages(control_tensors(layers))
        if gathered is None:
            return
        tensors = {k: v for part in gathered for k, v in part.items()}
        config = control_adapter_config(
            str(self.model_dir), self.lora_rank, self.lora_dropout, self.adapter_layers, self.control_adapter_gamma
        )
        save_peft_adapter(directory, tensors, config)
        copy_tokenizer_files(self.model_dir, directory)

    def export_model(self, directory: Path, layers: list, stages: Any, max_shard_bytes: int = 5 * 2**30) -> None:
        """Writes the whole model in Hugging Face format; each stage writes its own shards, rank 0 the index."""
        strategy = stages
        tensors: dict[str, torch.Tensor] = {}
        if strategy.data_parallel_rank == 0:  # data-parallel replicas hold the same weights
            for layer in layers:
                if isinstance(layer, torch.nn.Module):
                    tensors.update(layer.hf_tensors())
        if self.source.quirks.tie_word_embeddings:
            tensors.pop("lm_head.weight", None)  # tied checkpoints hold the matrix once, as the embedding
        shards = plan_shards(tensors, max_shard_bytes)
        plans = strategy.all_gather_object((strategy.stage_id, [[(n, tensors[n].nbytes) for n in s] for s in shards]))
        plans = sorted((p for p in plans if p[1]), key=lambda p: p[0])
        total = sum(len(p[1]) for p in plans)
        file_names = {}
        index = 0
        for stage, stage_shards in plans:
            for names in stage_shards:
                index += 1
                name = "model.safetensors" if total == 1 else f"model-{index:05d}-of-{total:05d}.safetensors"
                file_names.update({tensor_name: name for tensor_name, _ in names})
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for names in shards:
            save_shard(directory / file_names[names[0]], {n: tensors[n] for n in names})
        if strategy.is_global_zero:
            if total > 1:
                size = sum(b for _, stage_shards in plans for names in stage_shards for _, b in names)
                index_json = {"metadata": {"total_size": size}, "weight_map": dict(sorted(file_names.items()))}
                (directory / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2) + "\n")
            shutil.copy2(self.model_dir / "config.json", directory / "config.json")
            copy_tokenizer_files(self.model_dir, directory)
        strategy.barrier("export_model")

    def export_adapter(self, directory: Path, layers: list, stages: Any) -> None:
        """Writes the trained adapter in PEFT format plus the tokenizer files into ``directory``.

        Collective: every rank must call it; stages send their tensors to global rank 0, which writes.
        """
        local_layers = [f for f in layers if isinstance(f, torch.nn.Module)]
        gathered = stages.gather_from_stages(lora_tensors(local_layers))
        if gathered is None:
            return
        tensors: dict[str, torch.Tensor] = {}
        for part in gathered:
            tensors.update(part)
        config = peft_adapter_config(
            base_model=str(self.model_dir),
            rank=self.lora_rank,
            alpha=self.lora_rank,
            dropout=self.lora_dropout,
            target_modules=self.targeted,
            layers_to_transform=None
            if len(self.adapter_layers) == self.source.quirks.num_layers
            else self.adapter_layers,
        )
        save_peft_adapter(directory, tensors, config)
        copy_tokenizer_files(self.model_dir, directory)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The weights travel in the strategy's DeepSpeed checkpoint files, not in Lightning's state_dict.
        checkpoint.pop("state_dict", None)


class SingleProcessStages:
    """Stands in for the strategy when one process holds every pipeline layer (exports outside training)."""

    stage_id = 0
    data_parallel_rank = 0
    is_global_zero = True

    def gather_from_stages(self, obj: Any) -> list[Any]:
        return [obj]

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def barrier(self, name: str | None = None) -> None:
        pass


def full_trainable_parameters(
    skeleton: torch.nn.Module, target_modules: str | list[str] | None, layers: list[int]
) -> set[str]:
    """The HF parameter names that full fine-tuning trains (see ``CausalLMModule``'s ``target_modules``).

    Raises:
        ValueError: naming each ``target_modules`` entry that selects nothing, or when nothing would train.
    """
    modules = dict(skeleton.named_modules(remove_duplicate=False))
    names = [n for n, _ in skeleton.named_parameters(remove_duplicate=False)]
    targets = [target_modules] if isinstance(target_modules, str) else target_modules

    def layer_of(name: str) -> int | None:
        match = re.match(r"model\.layers\.(\d+)\.", name)
        return int(match.group(1)) if match else None

    def selected(name: str, entries: list[str]) -> bool:
        module = name.rpartition(".")[0]
        if ALL_LINEAR in entries and layer_of(name) is not None and isinstance(modules[module], torch.nn.Linear):
            return True
        parts = module.split(".")
        ancestors = [".".join(parts[: i + 1]) for i in range(len(parts))]
        return any(a == t or a.endswith("." + t) for a in ancestors for t in entries if t != ALL_LINEAR)

    if targets is not None:
        unmatched = [t for t in targets if not any(selected(n, [t]) for n in names)]
        if unmatched:
            leaves = sorted({m.rsplit(".", 1)[-1] for m in modules if m and not m.rsplit(".", 1)[-1].isdigit()})
            raise ValueError(
                f"model.target_modules entries {unmatched} match no module of the model; its modules are {leaves} "
                f"(or use '{ALL_LINEAR}', or leave target_modules unset to train everything)"
            )
    chosen = {
        n for n in names if (layer_of(n) is None or layer_of(n) in layers) and (targets is None or selected(n, targets))
    }
    tied = {"model.embed_tokens.weight", "lm_head.weight"}
    if getattr(skeleton.config, "tie_word_embeddings", False) and chosen & tied:
        chosen |= tied & set(names)
    if not chosen:
        raise ValueError(
            f"model.target_modules={target_modules!r} with model.layers_to_transform selects no parameter; "
            "nothing would train"
        )
    return chosen


def plan_shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    """Groups tensor names, in order, into shards of at most ``max_bytes`` (a larger tensor gets its own)."""
    shards: list[list[str]] = []
    size = 0
    for name, tensor in tensors.items():
        if not shards or (size + tensor.nbytes > max_bytes and shards[-1]):
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += tensor.nbytes
    return shards


def save_shard(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({n: t.detach().to("cpu").contiguous() for n, t in tensors.items()}, path, metadata={"format": "pt"})
