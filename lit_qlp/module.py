"""CausalLMModule: what to train (model, adapters, optimizer) and how one step feeds the pipeline."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from typing_extensions import override

from lit_qlp.adapters.lora import LoraAdapter, lora_tensors, peft_adapter_config, save_peft_adapter
from lit_qlp.adapters.targeting import ALL_LINEAR, check_targets, linear_names, match_targets, parse_layer_ranges
from lit_qlp.data.text import TOKENIZER_FILES
from lit_qlp.kernels import TokenWeightedLoss
from lit_qlp.kernels.cross_entropy import IGNORE_INDEX
from lit_qlp.models.pipeline import DecoderLayerPipe, EmbeddingPipe, ModelSource, OutputPipe, stage_weights
from lit_qlp.strategies.pipeline import PipelineSpec

# Copied beside exported weights so that the export loads on its own.
EXPORTED_FILES = (*TOKENIZER_FILES, "generation_config.json")


def shift_left(tensor: torch.Tensor, fill: int) -> torch.Tensor:
    """``out[..., t] = tensor[..., t + 1]`` with the last position ``fill``: targets aligned with next-token logits."""
    return F.pad(tensor[..., 1:], (0, 1), value=fill)


class CausalLMModule(pl.LightningModule):
    """Fine-tunes a Hugging Face decoder-only language model through the pipeline strategy.

    Args:
        model_dir: Hugging Face model directory (config.json, safetensors weights, tokenizer files).
        mode: What trains. "lora": low-rank adapters on frozen weights.
        dtype: Dtype of the model's weights and activations ("float32" for CPU runs and exactness tests).
        attn_implementation: "sdpa" or "eager"; architectures without SDPA support fall back to "eager".
        lora_rank: LoRA rank r. alpha is fixed to r (scale 1): tune ``lr`` instead of alpha.
        lora_dropout: Dropout on the LoRA input.
        target_modules: Linear layers that get LoRA: "all-linear" (every linear layer of the decoder layers) or
            names such as ``[q_proj, v_proj]``.
        layers_to_transform: Decoder layers that get adapters, e.g. "0:31", "0:10,20:25,30" or "1,3,5"
            (inclusive ranges); all layers when unset.
        lora_weight_dtype: Dtype of the LoRA weights (and of their optimizer state).
        lr: Learning rate of the optimizer (optimi Adam).
        betas: Adam's (beta1, beta2).
        eps: Adam's epsilon.
        loss_implementation: The fused LM head + cross-entropy: "auto" (Triton on CUDA, torch on CPU), "triton"
            or "torch".
        loss_chunk_size: Tokens per chunk of the fused head + loss; the last stage holds this many tokens' logits
            at a time instead of the whole sequence's.
        trust_remote_code: Allow custom model code from ``model_dir``'s config.
    """

    def __init__(
        self,
        model_dir: Path,
        mode: Literal["lora"] = "lora",
        dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16",
        attn_implementation: Literal["sdpa", "eager"] = "sdpa",
        lora_rank: int = 64,
        lora_dropout: float = 0.0,
        target_modules: str | list[str] = ALL_LINEAR,
        layers_to_transform: str | None = None,
        lora_weight_dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        lr: float = 2e-5,
        betas: tuple[float, float] = (0.9, 0.99),
        eps: float = 1e-6,
        loss_implementation: Literal["auto", "triton", "torch"] = "auto",
        loss_chunk_size: int = 1024,
        trust_remote_code: bool = False,
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
        self.mode = mode
        self.lora_rank = lora_rank
        self.lora_dropout = lora_dropout
        self.target_modules = target_modules
        self.layers_to_transform = layers_to_transform
        self.lora_weight_dtype = lora_weight_dtype
        self.lr = lr
        self.betas = tuple(betas)
        self.eps = eps
        self.source = ModelSource(self.model_dir, dtype, attn_implementation, trust_remote_code=trust_remote_code)
        num_layers = self.source.quirks.num_layers
        self.adapter_layers = parse_layer_ranges(layers_to_transform, num_layers, key="model.layers_to_transform")
        decoder_linears = linear_names(self.source.submodule("model.layers.0"))
        check_targets(decoder_linears, target_modules, f"{self.model_dir.name}'s decoder layers")
        self.targeted = [n.rsplit(".", 1)[-1] for n in match_targets(decoder_linears, target_modules)]
        if loss_chunk_size < 1:
            raise ValueError(f"model.loss_chunk_size={loss_chunk_size} must be a positive number of tokens")
        self.loss_fn = TokenWeightedLoss(loss_implementation, loss_chunk_size)
        self.pipe: torch.nn.Module | None = None
        self._eval_loss_sum = 0.0
        self._eval_tokens = 0

    # ----------------------------------------------------------------- model
    def pipeline_spec(self, device: torch.device) -> PipelineSpec:
        """The pipeline layers of this model: embedding, decoder layers (with adapters), norm + head."""
        from deepspeed.pipe import LayerSpec

        self.source.device = torch.device(device)
        adapter = LoraAdapter(
            rank=self.lora_rank,
            alpha=self.lora_rank,
            dropout=self.lora_dropout,
            target_modules=self.target_modules,
            layers=self.adapter_layers,
            dtype=getattr(torch, self.lora_weight_dtype),
            seed=torch.initial_seed(),
        )
        layers = [LayerSpec(EmbeddingPipe, self.source)]
        layers += [LayerSpec(DecoderLayerPipe, self.source, i, adapter) for i in range(self.source.quirks.num_layers)]
        layers.append(LayerSpec(OutputPipe, self.source, self.loss_fn))
        return PipelineSpec(
            layers=layers,
            parameter_counts=stage_weights(self.source),
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
        self.log("train/loss", result.loss, prog_bar=True, rank_zero_only=True)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], rank_zero_only=True)
        return result.loss

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

    # ----------------------------------------------------------------- export
    def export(self, directory: Path) -> None:
        """Writes the trained adapter in PEFT format plus the tokenizer files into ``directory``.

        Collective: every rank must call it; stages send their tensors to global rank 0, which writes.
        """
        local_layers = list(self.pipe.forward_funcs) if self.pipe is not None else []
        gathered = self.trainer.strategy.gather_from_stages(lora_tensors(local_layers))
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


def copy_tokenizer_files(model_dir: Path, directory: Path) -> None:
    """Copies the tokenizer (and chat template, generation config) files of ``model_dir`` into ``directory``."""
    for name in EXPORTED_FILES:
        if (Path(model_dir) / name).is_file():
            shutil.copy2(Path(model_dir) / name, Path(directory) / name)
