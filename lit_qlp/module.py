"""CausalLMModule: the model, the loss, the optimizer and the steps; what trains and how the base is held are
two options of their own (``method``, ``base``)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lit_qlp.bases import BaseFormat
from lit_qlp.kernels import TokenWeightedLoss
from lit_qlp.kernels.fused_loss import IGNORE_INDEX
from lit_qlp.methods import LoRA, TrainingMethod
from lit_qlp.models.layout import TIED_EMBEDDING, PipelineSpec, pipeline_spec
from lit_qlp.models.pipeline import ModelSource, SdpaBackend, StageBuilder, sdpa_priority
from lit_qlp.strategies.stages import StageGroup


def shift_left(tensor: torch.Tensor, fill: int) -> torch.Tensor:
    """``out[..., t] = tensor[..., t + 1]`` with the last position ``fill``: targets aligned with next-token logits."""
    return F.pad(tensor[..., 1:], (0, 1), value=fill)


@runtime_checkable
class HasDatasets(Protocol):
    """A data module that lists its dataset sources (``TextDataModule``)."""

    datasets: list


class CausalLMModule(pl.LightningModule):
    """Fine-tunes a Hugging Face decoder-only language model through the pipeline strategy.

    Args:
        model_dir: Hugging Face model directory (config.json, safetensors weights, tokenizer files).
        method: What trains (``lit_qlp.methods``): ``LoRA`` (the default, with its defaults), ``ControlAdapters``
            or ``FullFineTuning``, each with its own options.
        base: How the frozen base is held (``lit_qlp.bases``): unset keeps it in ``dtype``;
            ``BitsAndBytes4bit`` stores the decoder layers' linear weights in 4-bit (QLoRA). Every adapter method
            works on either; full fine-tuning needs the unquantised base.
        dtype: Dtype of the model's weights and activations ("float32" for CPU runs and exactness tests); with a
            4-bit base also the dtype the weights are dequantised to for each matmul.
        attn_implementation: "sdpa" or "eager"; architectures without SDPA support fall back to "eager".
        document_attention: The attention kernel for documents packed on their own (``data.packing: documents``):
            "auto" (FlexAttention on CUDA, a block-diagonal mask on the CPU), "flex" or "mask"
            (``lit_qlp.models.pipeline.ModelSource``).
        embeddings_on_cpu: Keep the frozen embedding matrix in CPU memory (saves vocab × hidden × 2 bytes of GPU
            memory on the first stage, 1 GiB for Llama-3-8B; costs a small copy per step). Not when it trains.
        lr: Learning rate of the optimizer (optimi Adam).
        betas: Adam's (beta1, beta2).
        eps: Adam's epsilon.
        loss_implementation: The fused LM head + cross-entropy: "auto" (Triton on CUDA, torch on CPU), "triton"
            or "torch".
        loss_chunk_size: Tokens per chunk of the fused head + loss; the last stage holds this many tokens' logits
            at a time instead of the whole sequence's.
        compile_layers: ``torch.compile`` each decoder layer (with its adapters and rotary embedding; the
            attention mask stays eager): norms, rotary, SwiGLU, residual and LoRA additions fuse into few kernels,
            4-bit dequantisation into one, and far fewer kernel launches leave the GPU less idle (the eager step
            of an 8B model on an H200 waits on the CPU). All layers share one compiled graph. The first step of
            each shape (training, evaluation) compiles first, about a minute on an 8B model; after a second
            sequence length the code is recompiled for any length.
        long_context: Train long sequences in less GPU memory (for lengths that do not fit without it; README,
            Long context): each decoder layer's MLP runs over the sequence in chunks of
            ``mlp_chunk_tokens`` tokens, recomputed chunk by chunk in its backward pass (its [seq, intermediate]
            activations never exist whole: 7 GiB at seq 65536 for Llama-3-8B); the activation checkpoint keeps each
            layer's input in pinned CPU memory (the strategy's ``activation_offload``, turned on by this option:
            seq × hidden × 2 bytes per decoder layer, 16 GiB at seq 65536 for Llama-3-8B) and each layer's
            attention and MLP outputs too (as much again each), so that the recomputation in the backward pass skips
            the attention kernel and the MLP (``lit_qlp.models.stash``). Host memory: all of these within 80% of
            what is available at the start (split between a node's GPUs), the kept outputs within half of that
            (past it the recomputation computes them); layer inputs past it stay in GPU memory, with a warning.
            Needs the strategy's activation checkpointing. Exact: the same loss and gradients as without. The MLP
            of sequences of at most ``mlp_chunk_tokens`` tokens runs whole.
        mlp_chunk_tokens: Tokens per MLP chunk under ``long_context``: smaller holds less (4 × chunk ×
            intermediate × 2 bytes of MLP activations), larger runs bigger matmuls.
        sdpa_backends: The kernels SDPA attention may run, tried in this order: "cudnn" (cuDNN's fused attention),
            "flash", "efficient" (memory-efficient), "math"; e.g. ``[cudnn, flash]`` prefers cuDNN and falls back
            to flash attention where cuDNN does not take a call. Unset: torch's own choice (flash, then
            memory-efficient, then math, then cuDNN). Set for the whole run in every process (training, evaluation,
            compiled layers). Before training, a list none of whose kernels takes the model's causal attention on
            the device in ``dtype`` is refused with torch's reason; a masked call (sliding windows) that none takes
            fails when it runs. On the CPU torch tries flash before math whatever the order.
        trust_remote_code: Allow custom model code from ``model_dir``'s config.
        random_weights: Random weights instead of ``model_dir``'s checkpoint (which then needs only
            ``config.json``): for measuring the speed and memory of a shape without its weights, as
            ``tools/benchmark.py --random-weights`` does; the trained result means nothing.
        default_callbacks: Install the method's callbacks (``TrainingMethod.callbacks``: LoRA's
            ``CompositeWeightDecay`` and ``AdapterNormLogging``, Control Adapters' ``ControlAdapterRegularizer``
            and ``AdapterNormLogging``). A callback of the same class in ``trainer.callbacks`` replaces the
            default; false installs none (list the ones wanted in ``trainer.callbacks``).
    """

    def __init__(
        self,
        model_dir: Path,
        method: TrainingMethod | None = None,
        base: BaseFormat | None = None,
        dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16",
        attn_implementation: Literal["sdpa", "eager"] = "sdpa",
        document_attention: Literal["auto", "flex", "mask"] = "auto",
        embeddings_on_cpu: bool = False,
        lr: float = 2e-5,
        betas: tuple[float, float] = (0.9, 0.99),
        eps: float = 1e-6,
        loss_implementation: Literal["auto", "triton", "torch"] = "auto",
        loss_chunk_size: int = 1024,
        compile_layers: bool = False,
        long_context: bool = False,
        mlp_chunk_tokens: int = 4096,
        sdpa_backends: list[SdpaBackend] | None = None,
        trust_remote_code: bool = False,
        random_weights: bool = False,
        default_callbacks: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model_dir = Path(model_dir)
        if not (self.model_dir / "config.json").is_file():
            raise FileNotFoundError(
                f"model.model_dir={str(model_dir)!r} has no config.json; point it at a Hugging Face model directory"
            )
        if lr <= 0:
            raise ValueError(f"model.lr={lr} must be positive")
        if loss_chunk_size < 1:
            raise ValueError(f"model.loss_chunk_size={loss_chunk_size} must be a positive number of tokens")
        if mlp_chunk_tokens < 1:
            raise ValueError(f"model.mlp_chunk_tokens={mlp_chunk_tokens} must be a positive number of tokens")
        if sdpa_backends is not None:
            sdpa_priority(sdpa_backends)  # refuses unknown names now, before anything runs
        self.sdpa_backends = sdpa_backends
        self._sdpa_priority: contextlib.AbstractContextManager | None = None
        self.method = LoRA() if method is None else method
        self.base = base
        self.source = ModelSource(
            self.model_dir,
            dtype,
            attn_implementation,
            trust_remote_code=trust_remote_code,
            random_weights=random_weights,
            document_attention=document_attention,
            keep_attention=long_context,
        )
        self.method.check(self.source, base)
        self.trainable = self.method.trainable(self.source)
        if embeddings_on_cpu and TIED_EMBEDDING in self.trainable:
            raise ValueError(
                f"model.embeddings_on_cpu keeps frozen embeddings on the CPU, but model.method "
                f"{type(self.method).__name__} trains them; remove model.embeddings_on_cpu or keep the embeddings "
                "frozen (an adapter method, or target_modules without embed_tokens/lm_head)"
            )
        self.embeddings_on_cpu = embeddings_on_cpu
        self.compile_layers = compile_layers
        self.long_context = long_context
        self.mlp_chunk_tokens = mlp_chunk_tokens
        self.lr = lr
        self.betas = tuple(betas)
        self.eps = eps
        self.default_callbacks = default_callbacks
        self.loss_fn = TokenWeightedLoss(loss_implementation, loss_chunk_size)
        self.pipe: torch.nn.Module | None = None
        self._eval_loss_sum = 0.0
        self._eval_tokens = 0

    @override
    def setup(self, stage: str) -> None:
        if self.sdpa_backends is not None and self._sdpa_priority is None:
            self._sdpa_priority = sdpa_priority(self.sdpa_backends)
            self._sdpa_priority.__enter__()  # left in teardown

    @override
    def teardown(self, stage: str) -> None:
        if self._sdpa_priority is not None:
            self._sdpa_priority.__exit__(None, None, None)
            self._sdpa_priority = None

    @property
    def offload_activations(self) -> bool:
        """The layers want the offloaded activation checkpoint (the strategy's ``OffloadsActivations``): under
        ``long_context``."""
        return self.long_context

    # ----------------------------------------------------------------- model
    def pipeline_spec(self, device: torch.device, pipeline_stages: int | None = None) -> PipelineSpec:
        """The pipeline layers of this model on ``device``, to be spread over ``pipeline_stages`` stages (None: any
        number; see ``models.layout.pipeline_spec``): embedding, decoder layers (with the method's adapters), norm +
        head."""
        builder = StageBuilder(self.source, torch.device(device), self.base, self.trainable)
        adapter = self.method.layer_adapter(self.source, seed=torch.initial_seed())
        return pipeline_spec(
            builder,
            self.loss_fn,
            adapter,
            self.embeddings_on_cpu,
            self.compile_layers,
            pipeline_stages,
            mlp_chunk_tokens=self.mlp_chunk_tokens if self.long_context else None,
        )

    @override
    def configure_optimizers(self):
        from optimi import Adam

        if self.pipe is None:
            raise RuntimeError("CausalLMModule needs PipelineStrategy (trainer.strategy) to build its layers")
        params = [p for p in self.pipe.parameters() if p.requires_grad]
        return Adam(params, lr=self.lr, betas=self.betas, eps=self.eps, weight_decay=0.0)

    @override
    def configure_callbacks(self) -> list[Callback]:
        if not self.default_callbacks:
            return []
        present = {type(c) for c in self.trainer.callbacks}
        return [c for c in self.method.callbacks() if type(c) not in present]

    # ----------------------------------------------------------------- steps
    def micro_batches(self, batch: dict[str, torch.Tensor]) -> tuple[list, torch.Tensor]:
        """Splits a batch of ``[micro_batches, seq]`` tensors into the engine's ``((inputs), labels)`` items.

        Labels and control classes are shifted one position left so that position t holds the target of the
        logits at t; the last position carries no loss (label -100, class 0). Position ids are the batch's
        ``position_ids`` where it has them (documents packed on their own, whose positions restart at each
        document), else 0 to seq - 1, one tensor shared by every micro-batch.

        Returns:
            The micro-batches and the number of labelled tokens in them.
        """
        input_ids = batch["input_ids"].to(self.device)
        labels = shift_left(batch["labels"].to(self.device), IGNORE_INDEX)
        control = batch.get("control_classes")
        control = shift_left(control.to(self.device), 0) if control is not None else torch.zeros_like(input_ids)
        if "position_ids" in batch:
            positions = list(batch["position_ids"].to(self.device).split(1))
        else:
            positions = [torch.arange(input_ids.shape[1], device=self.device).unsqueeze(0)] * input_ids.shape[0]
        items = [
            ((input_ids[i : i + 1], positions[i], control[i : i + 1]), labels[i : i + 1])
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

    def check_device(self, device: torch.device) -> None:
        """Called by the strategy before anything is written: fails early when the device or the data cannot run
        this method and base."""
        if self.base is not None:
            self.base.check_device(device)
        self.source.flex_for_documents(device)  # document_attention=flex where the device's kernels refuse the model
        if self.sdpa_backends is not None:
            self.source.check_sdpa_backends(self.sdpa_backends, device)
        try:
            datamodule = self.trainer.datamodule
        except RuntimeError:  # not attached to a Trainer
            datamodule = None
        if isinstance(datamodule, HasDatasets):
            self.method.check_data(datamodule.datasets)

    # ----------------------------------------------------------------- export
    def export(self, directory: Path, layers: list | None = None, stages: StageGroup | None = None) -> None:
        """Writes what trained into ``directory`` in the method's format (a PEFT adapter, a Control Adapter, a
        Hugging Face model directory), with the tokenizer files. Collective: every rank must call it.

        Args:
            directory: Where to write.
            layers: This process's pipeline layers; by default those of the running pipeline.
            stages: What gathers the stages' tensors; by default the trainer's strategy.
                ``SingleProcessStages`` exports layers that one process holds (tools/convert_ds_checkpoint.py).
        """
        layers = list(self.pipe.forward_funcs if layers is None else layers)
        stages = self.trainer.strategy if stages is None else stages
        self.method.export(Path(directory), layers, stages, self.source)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The weights travel in the strategy's DeepSpeed checkpoint files, not in Lightning's state_dict.
        checkpoint.pop("state_dict", None)
