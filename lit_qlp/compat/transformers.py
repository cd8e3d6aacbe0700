"""What lit_qlp relies on of transformers beyond its public API: the causal-LM class of a config, its SDPA support,
the attention implementation of a config, an attention implementation that runs flex attention for block masks, the
packed-sequence check of the mask functions, a model's weight initialisation of one submodule, the KV-cache keyword
of the mask functions, the registry and gate of fused MoE experts, and GGUF models as plain ones.

transformers is imported inside the functions.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

# The KV-cache argument of transformers' mask functions: "cache" since 5.24, "past_key_values" before.
MASK_CACHE_KEYWORDS = ("cache", "past_key_values")


def _outdated(name: str, use: str) -> RuntimeError:
    """The error for a transformers version that lacks ``name``, which lit_qlp uses for ``use``."""
    import transformers

    return RuntimeError(
        f"transformers {getattr(transformers, '__version__', '?')} has no {name} (lit_qlp uses it {use}); "
        "lit_qlp/compat/transformers.py needs updating for this transformers version"
    )


def causal_lm_class(config: PretrainedConfig) -> type[PreTrainedModel]:
    """The class ``AutoModelForCausalLM.from_config(config)`` builds (``LlamaForCausalLM`` for a ``LlamaConfig``).

    Read from the mapping ``AutoModelForCausalLM`` itself uses, without building the model.
    """
    from transformers.models.auto import modeling_auto

    mapping = getattr(modeling_auto, "MODEL_FOR_CAUSAL_LM_MAPPING", None)
    if mapping is None:
        raise _outdated("models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING", "to find a config's model class")
    try:
        return mapping[type(config)]
    except KeyError:
        raise ValueError(
            f"transformers has no causal language model for {type(config).__name__} "
            f"(model_type {getattr(config, 'model_type', '?')!r}); lit_qlp needs a model AutoModelForCausalLM builds"
        ) from None


def supports_sdpa(model_class: type[PreTrainedModel]) -> bool:
    """Whether models of ``model_class`` can run torch's scaled-dot-product attention (``_supports_sdpa``)."""
    from transformers import PreTrainedModel

    if not hasattr(PreTrainedModel, "_supports_sdpa"):
        raise _outdated("PreTrainedModel._supports_sdpa", "to choose the attention implementation")
    return bool(getattr(model_class, "_supports_sdpa", False))


def set_attn_implementation(config: PretrainedConfig, name: str) -> None:
    """Makes models built from ``config`` use attention implementation ``name`` ("sdpa", "eager", ...).

    What ``attn_implementation=`` of ``from_pretrained`` sets; also sets it on the config's sub-configs.
    """
    if not hasattr(config, "_attn_implementation"):
        raise _outdated(f"{type(config).__name__}._attn_implementation", "to choose the attention implementation")
    config._attn_implementation = name


def register_attention_by_mask(name: str, around_sdpa: Callable | None = None) -> None:
    """Registers attention implementation ``name``: transformers' flex attention (``flex_attention_forward``) where
    the mask is a FlexAttention ``BlockMask``, its SDPA attention for any other mask or none; and SDPA's mask function
    under the same name, so that ``create_causal_mask`` and the others build SDPA masks for it.

    A stage then picks the kernel per micro-batch by the mask it builds: a block mask for documents packed on their
    own (``find_packed_sequence_indices``), SDPA's causal kernel otherwise. Registering twice changes nothing.

    Args:
        name: The implementation's name (a config's ``_attn_implementation``).
        around_sdpa: Called as ``around_sdpa(sdpa_attention_forward, module, query, ...)`` in place of the SDPA
            forward (``lit_qlp.models.stash.kept_attention``), or None.
    """
    from torch.nn.attention.flex_attention import BlockMask
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.integrations.flex_attention import flex_attention_forward
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import sdpa_mask

    def attention(module, query, key, value, attention_mask, **kwargs):
        if isinstance(attention_mask, BlockMask):
            return flex_attention_forward(module, query, key, value, attention_mask, **kwargs)
        if around_sdpa is not None:
            return around_sdpa(sdpa_attention_forward, module, query, key, value, attention_mask, **kwargs)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, sdpa_mask)


def packed_sequence_ids(position_ids: torch.Tensor) -> torch.Tensor | None:
    """Which sequence each token of a packed row belongs to ([batch, seq], counting from 0 where ``position_ids``
    restart), or None where no row restarts: transformers' ``find_packed_sequence_indices``, which its mask functions
    apply to ``position_ids`` themselves. Synchronises with the device (a data-dependent branch)."""
    from transformers import masking_utils

    find = getattr(masking_utils, "find_packed_sequence_indices", None)
    if find is None:
        raise _outdated("masking_utils.find_packed_sequence_indices", "to tell documents packed on their own")
    return find(position_ids)


def register_experts_implementation(name: str, forward: Callable) -> None:
    """Registers ``forward(experts, hidden_states, top_k_index, top_k_weights)`` as experts implementation ``name``,
    which ``from_config(..., experts_implementation=name)`` then selects for every ``@use_experts_implementation``
    experts module (``ExpertsInterface.register``)."""
    from transformers.integrations import moe

    interface = getattr(moe, "ExpertsInterface", None)
    if interface is None or not hasattr(interface, "register"):
        raise _outdated("integrations.moe.ExpertsInterface.register", "to run fused experts with its own forward")
    interface.register(name, forward)


def experts_activation(experts: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """What an experts module applies between its up and down projections: its gate on the [.., 2I] gate-and-up
    output (``_apply_gate``: SiLU-and-multiply, or gpt-oss's clamped GLU on interleaved rows) when it has one
    (``has_gate``), else its activation (``act_fn``)."""
    if not getattr(experts, "has_gate", True):
        return experts.act_fn
    gate = getattr(experts, "_apply_gate", None)
    if gate is None:
        raise _outdated(f"{type(experts).__name__}._apply_gate", "to gate the experts' up projection")
    return gate


def gguf_architectures() -> list[str]:
    """The GGUF ``general.architecture`` values transformers reads (``GGUF_SUPPORTED_ARCHITECTURES``), sorted."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    names = getattr(gguf_utils, "GGUF_SUPPORTED_ARCHITECTURES", None)
    if names is None:
        raise _outdated("modeling_gguf_pytorch_utils.GGUF_SUPPORTED_ARCHITECTURES", "to name the GGUF architectures")
    return sorted(set(names) - {"general", "tokenizer"})


def forget_gguf_quantization(model: PreTrainedModel) -> None:
    """Makes a model loaded with ``from_pretrained(..., gguf_file=...)`` savable: its tensors are already
    dequantised, but transformers keeps the GGUF quantizer (``hf_quantizer``, ``config.quantization_config``) and
    refuses ``save_pretrained`` ("quantized with gguf and is not serializable")."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None or type(quantizer).__name__ != "GgufHfQuantizer":
        raise ValueError(f"{type(model).__name__} was not loaded from a GGUF file (no GGUF quantizer)")
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def init_weights(model: PreTrainedModel, module: nn.Module) -> None:
    """Initialises ``module`` (a submodule of ``model``) as ``model`` initialises its own submodules.

    Recomputes what checkpoints do not hold (rotary inverse frequencies, Gemma's embedding scale) after a module is
    materialised from the meta device. Gradients are not recorded.
    """
    if not hasattr(model, "_init_weights"):
        raise _outdated(f"{type(model).__name__}._init_weights", "to fill non-persistent buffers")
    with torch.no_grad():
        model._init_weights(module)


@functools.cache
def mask_cache_keyword(mask_function: Callable) -> str:
    """The name of the KV-cache argument of transformers' mask function ``mask_function`` (``create_causal_mask``
    and the others of ``transformers.masking_utils``).

    "cache" since transformers 5.24; before it "past_key_values", which 5.24 still takes with a deprecation
    warning.
    """
    parameters = inspect.signature(mask_function).parameters
    for keyword in MASK_CACHE_KEYWORDS:
        if keyword in parameters:
            return keyword
    name = getattr(mask_function, "__qualname__", repr(mask_function))
    raise _outdated(f"{' or '.join(MASK_CACHE_KEYWORDS)} argument of {name}", "to build masks without a KV cache")


__all__ = [
    "causal_lm_class",
    "experts_activation",
    "forget_gguf_quantization",
    "gguf_architectures",
    "init_weights",
    "mask_cache_keyword",
    "packed_sequence_ids",
    "register_attention_by_mask",
    "register_experts_implementation",
    "set_attn_implementation",
    "supports_sdpa",
]
