"""One generic decomposition of a Hugging Face decoder-only model into pipeline layers.

Any model laid out as ``model.embed_tokens`` / ``model.layers`` / ``model.norm`` / ``lm_head`` /
``model.rotary_emb`` becomes ``[EmbeddingPipe, DecoderLayerPipe × N, OutputPipe]``; no per-architecture code.
The differences between architectures are read from the HF config into ``ModelQuirks``. The skeleton is
built on the meta device and each pipeline layer materialises only its own modules, reading their tensors
from the checkpoint as it is built, so a process holds nothing but its own stage.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import weakref
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple, Protocol, runtime_checkable

import torch
import torch.nn.attention
from torch import nn

from lit_qlp.compat.torch import version_counter
from lit_qlp.compat.transformers import (
    causal_lm_class,
    init_weights,
    mask_cache_keyword,
    packed_sequence_ids,
    register_attention_by_mask,
    set_attn_implementation,
    supports_sdpa,
)
from lit_qlp.formats.hf import CheckpointReader
from lit_qlp.models.chunked import chunk_mlp
from lit_qlp.models.experts import IMPLEMENTATION as EXPERTS_IMPLEMENTATION
from lit_qlp.models.stash import kept_attention


class StageTensors(NamedTuple):
    """The tensors that travel between pipeline stages.

    DeepSpeed sends plain tuples of tensors; ``pack`` and ``StageTensors(*inputs)`` convert.

    Attributes:
        hidden_states: [batch, seq, hidden] floating point, part of the autograd graph.
        position_ids: [batch, seq] int64; every decoder layer computes its rotary embedding from it.
        control_classes: [batch, seq] int64 in {-1, 0, 1}, used by Control Adapters.
    """

    hidden_states: torch.Tensor
    position_ids: torch.Tensor
    control_classes: torch.Tensor

    def pack(self) -> tuple[torch.Tensor, ...]:
        return tuple(self)


@dataclass(frozen=True)
class ModelQuirks:
    """The facts about an architecture that the generic decomposition needs, read from its HF config.

    Attributes:
        model_type: The config's ``model_type``.
        num_layers: Number of decoder layers.
        layer_types: Per decoder layer, "full_attention" or "sliding_attention".
        tie_word_embeddings: The head shares the embedding matrix.
        logit_scale: Multiplier of the logits (Cohere), or None.
        final_logit_softcapping: ``cap * tanh(logits / cap)`` on the logits (Gemma 2), or None.
        rotary_per_layer_type: The rotary embedding takes the layer's attention type (one set of frequencies per
            type, as Gemma 3's local and global layers).
    """

    model_type: str
    num_layers: int
    layer_types: tuple[str, ...]
    tie_word_embeddings: bool
    logit_scale: float | None
    final_logit_softcapping: float | None
    rotary_per_layer_type: bool = False

    @classmethod
    def from_config(cls, config, rotary_class: type | None = None) -> ModelQuirks:
        """The quirks of ``config``'s architecture; ``rotary_class`` is its rotary-embedding module class."""
        n = config.num_hidden_layers
        layer_types = getattr(config, "layer_types", None)
        if not layer_types:
            sliding = getattr(config, "sliding_window", None) is not None
            layer_types = ["sliding_attention" if sliding else "full_attention"] * n
        return cls(
            model_type=config.model_type,
            num_layers=n,
            layer_types=tuple(layer_types),
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            logit_scale=getattr(config, "logit_scale", None),
            final_logit_softcapping=getattr(config, "final_logit_softcapping", None),
            rotary_per_layer_type=rotary_class is not None
            and "layer_type" in inspect.signature(rotary_class.forward).parameters,
        )


SDPA_OR_FLEX = "lit_qlp_sdpa_or_flex"
"""The attention implementation of models that run SDPA: flex attention where a stage built a block mask for
documents packed on their own, SDPA otherwise (``compat.transformers.register_attention_by_mask``)."""
register_attention_by_mask(SDPA_OR_FLEX)

SDPA_KEPT = "lit_qlp_sdpa_kept"
"""``SDPA_OR_FLEX`` whose SDPA kernel, inside lit_qlp's offloaded checkpoint, keeps its outputs for the layer's
recomputation, which then skips it (``lit_qlp.models.stash``): the attention of ``long_context``."""
register_attention_by_mask(SDPA_KEPT, around_sdpa=kept_attention)

DocumentAttention = Literal["auto", "flex", "mask"]

SdpaBackend = Literal["cudnn", "flash", "efficient", "math"]

SDPA_BACKENDS: dict[str, torch.nn.attention.SDPBackend] = {
    "cudnn": torch.nn.attention.SDPBackend.CUDNN_ATTENTION,
    "flash": torch.nn.attention.SDPBackend.FLASH_ATTENTION,
    "efficient": torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION,
    "math": torch.nn.attention.SDPBackend.MATH,
}
"""The names of torch's SDPA kernels that ``sdpa_priority`` takes: cuDNN's fused attention, flash attention (on the
CPU torch's own flash kernel), memory-efficient attention, and the math path (matmuls and a softmax)."""


def sdpa_priority(backends: list[str]) -> contextlib.AbstractContextManager:
    """Inside, SDPA runs only the ``backends`` named (``SDPA_BACKENDS``), the first of them that takes the call;
    a call none of them takes fails with torch's reason for each.

    The choice is torch's process-wide setting, read when a call is dispatched and when ``torch.compile`` traces
    one, so it holds for compiled layers too.

    Raises:
        ValueError: A name that is not a key of ``SDPA_BACKENDS``, a name twice, or none at all.
    """
    unknown = [name for name in backends if name not in SDPA_BACKENDS]
    repeated = sorted({name for name in backends if list(backends).count(name) > 1})
    if unknown or repeated or not backends:
        reason = f" ({', '.join(map(repr, unknown))} is not one)" if unknown else ""
        reason += f" ({', '.join(map(repr, repeated))} named twice)" if repeated else ""
        raise ValueError(
            f"model.sdpa_backends={list(backends)!r}: name one or more of {sorted(SDPA_BACKENDS)} in the order to try "
            f"them, each once{reason}"
        )
    return torch.nn.attention.sdpa_kernel([SDPA_BACKENDS[name] for name in backends], set_priority=True)


FLEX_MIN_HEAD_DIM = 16
"""The smallest head dimension torch's FlexAttention kernels take on CUDA (its Triton lowering refuses less)."""


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


class ModelSource:
    """A Hugging Face model directory from which pipeline layers materialise themselves; read-only once built.

    Holds the config, a meta-device skeleton of the whole model (no memory) and the checkpoint reader. Where the
    layers go, how their frozen weights are stored and which parameters train belong to the stage that builds them
    (``StageBuilder``), not to the source.

    Args:
        model_dir: Hugging Face model directory (config.json + safetensors).
        dtype: Dtype of the model's weights and activations.
        attn_implementation: "sdpa" (default) or "eager"; architectures without SDPA support (Gemma 2, whose
            attention softcapping SDPA cannot do) use "eager". Set explicitly because a bare config falls back
            to eager, which with no mask applies no causal mask.
        trust_remote_code: Passed to ``AutoConfig``.
        random_weights: Fill the weights with random values (normal, std 0.02; norm weights 1, biases 0) on their
            device instead of reading them: ``model_dir`` then needs only ``config.json``. For measuring the speed
            and memory of a shape whose checkpoint is not at hand (or would not fit the disk).
        document_attention: The kernel for sequences of documents packed on their own (``data.packing:
            documents``; a stage tells them by their ``position_ids``, which restart at each document): "auto"
            (the default) FlexAttention on CUDA, the block-diagonal mask elsewhere; "flex": FlexAttention with a
            block mask built from the positions, which computes only the blocks within documents (no
            [seq, seq] tensor; compiled by torch, also on the CPU, about 10 s per shape there); "mask": transformers'
            mask with the documents' blocks on its diagonal, for SDPA or eager attention ([seq, seq] booleans per
            micro-batch, and SDPA cannot use its fastest kernels with a mask). Flex needs SDPA attention
            (``attn_implementation``); models that run eager attention use the mask. A sequence of one document
            runs SDPA's own path (its causal kernel) whatever this says.
        keep_attention: Models that run SDPA run ``SDPA_KEPT``: inside lit_qlp's offloaded checkpoint the attention
            kernel's outputs are kept for the recomputation, which skips the kernel (``model.long_context``).

    Attributes:
        attn_implementation: The attention the model runs, "sdpa" or "eager" (the config names ``SDPA_OR_FLEX``
            or ``SDPA_KEPT`` for "sdpa").
    """

    def __init__(
        self,
        model_dir: Path,
        dtype: str = "bfloat16",
        attn_implementation: str = "sdpa",
        trust_remote_code: bool = False,
        random_weights: bool = False,
        document_attention: DocumentAttention = "auto",
        keep_attention: bool = False,
    ) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM

        self.model_dir = Path(model_dir)
        self.dtype = _dtype(dtype)
        self.config = AutoConfig.from_pretrained(self.model_dir, trust_remote_code=trust_remote_code)
        if attn_implementation == "sdpa" and not supports_sdpa(causal_lm_class(self.config)):
            attn_implementation = "eager"
        if document_attention == "flex" and attn_implementation != "sdpa":
            raise ValueError(
                f"model.document_attention=flex runs FlexAttention in place of SDPA, but {self.config.model_type} "
                f"runs {attn_implementation} attention here; use model.document_attention=mask (or auto)"
            )
        self.attn_implementation = attn_implementation
        self.document_attention = document_attention
        sdpa = SDPA_KEPT if keep_attention else SDPA_OR_FLEX
        set_attn_implementation(self.config, sdpa if attn_implementation == "sdpa" else attn_implementation)
        self.flex_config = copy.deepcopy(self.config)  # what the mask functions read to build block masks
        set_attn_implementation(self.flex_config, "flex_attention")
        with torch.device("meta"):
            # Fused MoE experts run lit_qlp's grouped forward (lit_qlp.models.experts); dense models have none.
            self.skeleton = AutoModelForCausalLM.from_config(
                self.config, dtype=self.dtype, experts_implementation=EXPERTS_IMPLEMENTATION
            )
        rotary = getattr(self.skeleton.model, "rotary_emb", None)
        self.quirks = ModelQuirks.from_config(self.config, type(rotary) if rotary is not None else None)
        self.reader = None
        if not random_weights:
            self.reader = CheckpointReader(self.model_dir, self.quirks.model_type, self.quirks.tie_word_embeddings)

    def __repr__(self) -> str:
        return f"ModelSource({self.model_dir.name})"

    def submodule(self, name: str) -> nn.Module:
        return self.skeleton.get_submodule(name)

    @property
    def head_dim(self) -> int:
        """Dimensions of each attention head: the config's ``head_dim``, else hidden size / heads."""
        return getattr(self.config, "head_dim", None) or self.config.hidden_size // self.config.num_attention_heads

    def flex_for_documents(self, device: torch.device) -> bool:
        """Whether stages on ``device`` run FlexAttention for documents packed on their own (``document_attention``).

        On CUDA FlexAttention needs heads of at least ``FLEX_MIN_HEAD_DIM`` dimensions: "auto" then uses the mask,
        "flex" raises ValueError.
        """
        if self.attn_implementation != "sdpa" or self.document_attention == "mask":
            return False
        on_cuda = torch.device(device).type == "cuda"
        head_dim = self.head_dim
        if on_cuda and head_dim < FLEX_MIN_HEAD_DIM:
            if self.document_attention == "flex":
                raise ValueError(
                    f"model.document_attention=flex: FlexAttention on CUDA needs heads of at least "
                    f"{FLEX_MIN_HEAD_DIM} dimensions, this model's have {head_dim}; use model.document_attention=mask"
                )
            return False
        return self.document_attention == "flex" or on_cuda

    def check_sdpa_backends(self, backends: list[str], device: torch.device) -> None:
        """Raises ValueError when none of the SDPA ``backends`` (``model.sdpa_backends``) takes this model's causal
        attention on ``device`` in its dtype (a short sequence of its head shape, grouped key/value heads as
        transformers passes them): before training, rather than at the first attention call. Calls with a mask
        (sliding windows) are not probed."""
        if self.attn_implementation != "sdpa":
            return
        heads, head_dim = self.config.num_attention_heads, self.head_dim
        kv_heads = getattr(self.config, "num_key_value_heads", None) or heads
        query = torch.zeros(1, heads, 16, head_dim, dtype=self.dtype, device=device)
        key = torch.zeros(1, kv_heads, 16, head_dim, dtype=self.dtype, device=device)
        try:
            with sdpa_priority(backends), torch.no_grad():
                nn.functional.scaled_dot_product_attention(
                    query, key, key, is_causal=True, enable_gqa=kv_heads != heads
                )
        except RuntimeError as error:
            raise ValueError(
                f"model.sdpa_backends={list(backends)!r}: none of these kernels takes this model's attention on "
                f"{torch.device(device).type} in {str(self.dtype).removeprefix('torch.')} ({heads}/{kv_heads} heads of "
                f"{head_dim}); torch says: {str(error).splitlines()[0]} Add a kernel that does (flash, or math, which "
                "takes every call) or leave model.sdpa_backends unset"
            ) from None

    def num_parameters(self, name: str) -> int:
        return sum(p.numel() for p in self.submodule(name).parameters())

    def materialize(self, name: str, device: torch.device | str, trainable: frozenset[str] = frozenset()) -> nn.Module:
        """A copy of submodule ``name`` of the skeleton on ``device``, filled with the checkpoint's tensors; the
        skeleton itself stays on the meta device, unchanged (what adapters later do to the copy never shows in it).

        Non-persistent buffers (Gemma's embedding scale, for example) are not in the checkpoint; the model's own
        ``_init_weights`` recomputes them.

        Args:
            name: The submodule's name in the HF model (``model.layers.3``).
            device: Where to put it; on "meta" only the shapes (for tools that load trained tensors afterwards).
            trainable: HF names of the parameters that train; every other parameter is frozen.
        """
        module = copy.deepcopy(self.submodule(name))  # meta tensors: copying costs no memory
        device = torch.device(device)
        module.to_empty(device=device)
        if device.type != "meta":
            self._load(name, module)
        for param_name, param in module.named_parameters():
            param.requires_grad_(f"{name}.{param_name}" in trainable)
        return module

    def _load(self, name: str, module: nn.Module) -> None:
        for sub in module.modules():
            if any(b not in sub.state_dict() for b, _ in sub.named_buffers(recurse=False)):
                init_weights(self.skeleton, sub)
        with torch.no_grad():
            for param_name, tensor in module.state_dict(keep_vars=True).items():
                if self.reader is None:
                    _fill_random(param_name, tensor)
                    continue
                source = self.reader.get(f"{name}.{param_name}")
                if source.shape != tensor.shape:
                    raise ValueError(
                        f"{self.model_dir}: tensor {name}.{param_name} has shape {tuple(source.shape)} in the "
                        f"checkpoint but {tuple(tensor.shape)} in the model built from config.json"
                    )
                tensor.copy_(source)

    def rotary_embedding(self, device: torch.device | str) -> nn.Module:
        """A fresh rotary-embedding module on ``device`` (its inverse frequencies are computed, not loaded)."""
        return type(self.skeleton.model.rotary_emb)(config=self.config).to(device)


def _fill_random(name: str, tensor: torch.Tensor) -> None:
    """Random stand-in for a checkpoint tensor: norm weights 1, biases 0, everything else normal with std 0.02."""
    if not tensor.is_floating_point() or name.endswith("bias"):
        tensor.zero_()
    elif tensor.dim() == 1 and "norm" in name:
        tensor.fill_(1.0)
    else:
        tensor.normal_(0.0, 0.02)


LayerAdapter = Callable[[nn.Module, int, str], nn.Module]
"""Called as ``adapter(layer, layer_index, prefix)`` on each decoder layer; returns the layer with its adapters
(the same module changed in place, or a wrapper around it)."""


class LayerConverter(Protocol):
    """How a decoder layer's frozen weights are stored (``lit_qlp.bases.BaseFormat``): converts a layer in place."""

    def convert(self, layer: nn.Module, compute_dtype: torch.dtype) -> None: ...


@runtime_checkable
class TakesControlClasses(Protocol):
    """A decoder layer (or wrapper) that is called with ``control_classes=`` ([batch, seq] in {-1, 0, 1}) besides the
    HF layer's own arguments; it declares so with ``takes_control_classes = True``."""

    takes_control_classes: Literal[True]


class PositionCache:
    """Values computed from a micro-batch's ``position_ids`` (attention mask, rotary cos/sin), computed once and
    shared by every decoder layer of the stage that receives the same tensor.

    The decoder layers of a stage pass one ``position_ids`` tensor along, so the first layer computes and the rest
    (and their recomputation in the backward pass) reuse. This matters beyond the saved work: transformers' mask
    functions look for packed sequences with a data-dependent branch, a device-to-host synchronisation, which per
    layer kept the CPU from running ahead of the GPU (64 synchronisations per micro-batch of an 8B model).

    Entries are held per live tensor: a tensor that is freed, or changed in place, is never matched again. The
    values of freed tensors are dropped at the next new tensor, so at most one micro-batch's stay after a step.
    One cache belongs to one stage (its ``StageBuilder``).
    """

    def __init__(self) -> None:
        self._entries: dict[int, tuple[weakref.ref, int, dict[Hashable, object]]] = {}

    def get(self, position_ids: torch.Tensor, key: Hashable, compute: Callable[[], object]) -> object:
        """``compute()`` the first time ``key`` is asked of this ``position_ids`` tensor, the same object after."""
        entry = self._entries.get(id(position_ids))
        if entry is None or entry[0]() is not position_ids or entry[1] != version_counter(position_ids):
            self._entries = {k: e for k, e in self._entries.items() if e[0]() is not None}
            entry = (weakref.ref(position_ids), version_counter(position_ids), {})
            self._entries[id(position_ids)] = entry
        values = entry[2]
        if key not in values:
            values[key] = compute()
        return values[key]


@dataclass(frozen=True)
class StageBuilder:
    """What the layers of one pipeline stage are built from: the model, the stage's device, how the frozen weights
    of the decoder layers are stored, which parameters train, and the stage's own ``PositionCache``.

    Attributes:
        source: The model directory.
        device: Where the stage's layers are materialised ("meta": shapes only).
        base: How the decoder layers' frozen weights are held (``lit_qlp.bases``); None keeps them in the source's
            dtype.
        trainable: HF names of the parameters that train (full fine-tuning); empty freezes every weight.
        positions: The mask / rotary cache shared by this stage's decoder layers.
    """

    source: ModelSource
    device: torch.device
    base: LayerConverter | None = None
    trainable: frozenset[str] = frozenset()
    positions: PositionCache = field(default_factory=PositionCache, compare=False, repr=False)

    def module(self, name: str, device: torch.device | str | None = None) -> nn.Module:
        """Submodule ``name`` materialised on ``device`` (the stage's by default), trainable where selected."""
        return self.source.materialize(name, self.device if device is None else device, self.trainable)

    def decoder_layer(self, index: int) -> nn.Module:
        """Decoder layer ``index`` with its frozen weights in the base format."""
        layer = self.module(f"model.layers.{index}")
        if self.base is not None:
            self.base.convert(layer, self.source.dtype)
        return layer


class EmbeddingPipe(nn.Module):
    """Pipeline layer 0: token ids to hidden states (including any embedding scale of the architecture).

    With tied embeddings this module's matrix is also the LM head's weight, given to the loss (``loss.tie``) by the
    stage that holds both: the only stage of a one-stage pipeline, or, for a trained matrix spread over stages, the
    last stage's copy that DeepSpeed's ``TiedLayerSpec`` builds there (it keeps the copies equal and sums their
    gradients).

    Args:
        builder: The stage's builder.
        loss: The pipeline's loss, to tie the head weight to this embedding matrix; or None.
        on_cpu: Keep the (frozen) embedding matrix in CPU memory, outside the module's parameters so that the
            engine does not move it; the looked-up rows are copied to the device.
    """

    hf_prefix = "model.embed_tokens"

    def __init__(self, builder: StageBuilder, loss=None, on_cpu: bool = False) -> None:
        super().__init__()
        self.device = builder.device
        self.on_cpu = on_cpu
        embed_tokens = builder.module(self.hf_prefix, device="cpu" if on_cpu else None)
        if on_cpu:
            if any(p.requires_grad for p in embed_tokens.parameters()):
                raise ValueError("model.embeddings_on_cpu needs frozen embeddings (an adapter method)")
            self._cpu_embedding = (embed_tokens,)  # a tuple hides it from nn.Module's registry and .to()
        else:
            self.embed_tokens = embed_tokens
        if loss is not None:
            loss.tie(lambda: self.embed_tokens.weight)

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        input_ids, position_ids, control_classes = inputs
        if self.on_cpu:
            hidden_states = self._cpu_embedding[0](input_ids.cpu()).to(self.device, non_blocking=True)
        else:
            hidden_states = self.embed_tokens(input_ids)
        return StageTensors(hidden_states, position_ids, control_classes).pack()

    def hf_tensors(self) -> dict[str, torch.Tensor]:
        """This layer's weights under their names in the HF model."""
        return hf_names(self.state_dict(), {"embed_tokens": self.hf_prefix})


def tied_head(embedding: EmbeddingPipe, hidden_states: torch.Tensor) -> torch.Tensor:
    """The last pipeline layer of a model whose trained tied embeddings span stages: the loss applies the embedding
    matrix."""
    return hidden_states


class DecoderLayerPipe(nn.Module):
    """One HF decoder layer, with the rotary embedding and attention mask computed from ``position_ids``: by the
    stage's first layer, then taken from the stage's ``PositionCache`` by the others and by the recomputation.

    Args:
        builder: The stage's builder.
        index: Index of the decoder layer.
        adapter: Adds adapters (LoRA, ...) to the layer, or None.
        compile: Run the rotary embedding and the HF layer with its adapters through ``torch.compile``:
            elementwise chains (norms, rotary, SwiGLU, residuals, LoRA additions) fuse into few kernels and far
            fewer launches. Every layer shares the compiled code. The attention mask stays eager: traced,
            transformers materialises even a plain causal mask, and SDPA with a mask tensor is about 3x slower than
            its causal kernel (measured on an H200).
        mlp_chunk_tokens: Run the layer's MLP over longer sequences in chunks of this many tokens
            (``lit_qlp.models.chunked.ChunkedMLP``); None runs it whole.
    """

    def __init__(
        self,
        builder: StageBuilder,
        index: int,
        adapter: LayerAdapter | None = None,
        compile: bool = False,
        mlp_chunk_tokens: int | None = None,
    ) -> None:
        super().__init__()
        self.index = index
        self.hf_prefix = f"model.layers.{index}"
        self.config = builder.source.config
        self.attention_type = builder.source.quirks.layer_types[index]
        self.flex_config = builder.source.flex_config if builder.source.flex_for_documents(builder.device) else None
        self.positions = builder.positions
        self.layer = builder.decoder_layer(index)
        self.rotary_emb = builder.source.rotary_embedding(builder.device)
        # One rotary embedding per attention type (Gemma 3: local and global layers have their own bases).
        self.rotary_args = (self.attention_type,) if builder.source.quirks.rotary_per_layer_type else ()
        if adapter is not None:
            self.layer = adapter(self.layer, index, self.hf_prefix)
        self.passes_control_classes = isinstance(self.layer, TakesControlClasses)
        chunked = chunk_mlp(self.layer, mlp_chunk_tokens) if mlp_chunk_tokens is not None else None
        if compile:
            self.layer.compile()  # its graph breaks around a ChunkedMLP, whose chunks run the MLP compiled on its own
            self.rotary_emb.compile()
            if chunked is not None:
                chunked.compile_mlp()

    def attention_mask(self, hidden_states: torch.Tensor, position_ids: torch.Tensor):
        """The mask of this layer's attention type for ``position_ids``: transformers' mask functions find the
        documents of a packed row where the positions restart; with FlexAttention for documents (``flex_config``)
        a packed micro-batch gets a block mask, which the attention implementation runs with flex attention."""
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        make = create_sliding_window_causal_mask if self.attention_type == "sliding_attention" else create_causal_mask
        no_cache = {mask_cache_keyword(make): None}
        packed = self.flex_config is not None and packed_sequence_ids(position_ids) is not None
        return make(
            config=self.flex_config if packed else self.config,
            inputs_embeds=hidden_states,
            attention_mask=None,
            position_ids=position_ids,
            **no_cache,
        )

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        x = StageTensors(*inputs)
        extra = {"control_classes": x.control_classes} if self.passes_control_classes else {}
        hidden, positions = x.hidden_states, x.position_ids
        # The stage's layers share one mask (per attention type) and one rotary embedding per micro-batch.
        like = (hidden.dtype, hidden.device, hidden.shape[0])
        mask = self.positions.get(
            positions, ("mask", self.attention_type, *like), lambda: self.attention_mask(hidden, positions)
        )
        rotary = self.positions.get(
            positions,
            ("rotary", *self.rotary_args, *like),
            lambda: self.rotary_emb(hidden, positions, *self.rotary_args),
        )
        hidden_states = self.layer(
            hidden, attention_mask=mask, position_ids=positions, position_embeddings=rotary, **extra
        )
        return x._replace(hidden_states=hidden_states).pack()

    def hf_tensors(self) -> dict[str, torch.Tensor]:
        """This layer's weights under their names in the HF model."""
        return hf_names(self.state_dict(), {"layer": self.hf_prefix})


class OutputPipe(nn.Module):
    """The last pipeline layer: the final norm. The LM head lives here but is applied by the loss.

    ``forward`` returns the normalised hidden states; the pipeline's loss (bound here through ``loss.bind``)
    projects them through ``lm_head`` with the architecture's logit scale and softcap chunk by chunk, fused with
    the cross-entropy, so the logits are never materialised. ``logits`` gives them explicitly.

    Args:
        builder: The stage's builder.
        loss: The pipeline's loss, bound to this head; or None.
        tied: The head is the embedding matrix, held by an ``EmbeddingPipe`` of the same stage (the first layer of a
            one-stage pipeline, or a tied one after this layer) that gives it to the loss; this layer then holds only
            the norm.
    """

    hf_prefix = "lm_head"

    def __init__(self, builder: StageBuilder, loss=None, tied: bool = False) -> None:
        super().__init__()
        self.norm = builder.module("model.norm")
        if not tied:
            self.lm_head = builder.module("lm_head")
        self.loss = loss
        self.logit_scale = builder.source.quirks.logit_scale
        self.softcap = builder.source.quirks.final_logit_softcapping
        if loss is not None:
            loss.bind(self)

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return self.norm(StageTensors(*inputs).hidden_states)

    def logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The logits of normalised hidden states (materialised: for tests and inspection)."""
        weight = self.lm_head.weight if hasattr(self, "lm_head") else self.loss.head_weight()
        logits = hidden_states @ weight.to(hidden_states.dtype).T
        if self.logit_scale is not None:
            logits = logits * self.logit_scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def hf_tensors(self) -> dict[str, torch.Tensor]:
        """This layer's weights under their names in the HF model."""
        return hf_names(self.state_dict(), {"norm": "model.norm", "lm_head": "lm_head"})


def hf_names(state_dict: dict[str, torch.Tensor], prefixes: dict[str, str]) -> dict[str, torch.Tensor]:
    """Renames a pipeline layer's state dict to HF names: the first name component maps through ``prefixes``.

    Entries under other children (the rotary embedding's buffers) are not part of the HF checkpoint and are left
    out.
    """
    out = {}
    for name, tensor in state_dict.items():
        child, _, rest = name.partition(".")
        if child in prefixes:
            out[f"{prefixes[child]}.{rest}"] = tensor
    return out


__all__ = [
    "DecoderLayerPipe",
    "EmbeddingPipe",
    "ModelQuirks",
    "ModelSource",
    "OutputPipe",
    "PositionCache",
    "SDPA_BACKENDS",
    "SdpaBackend",
    "StageBuilder",
    "StageTensors",
    "TakesControlClasses",
    "hf_names",
    "sdpa_priority",
    "tied_head",
]
