"""Tiny Hugging Face models of each tested architecture, built from configs (no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 96
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def _configs() -> dict:
    from transformers import (
        CohereConfig,
        Gemma2Config,
        Gemma3TextConfig,
        GptOssConfig,
        LlamaConfig,
        MistralConfig,
        MixtralConfig,
        OlmoeConfig,
        Phi3Config,
        Qwen2Config,
        Qwen2MoeConfig,
        Qwen3Config,
        Qwen3MoeConfig,
    )

    return {
        "llama": LlamaConfig(**COMMON),
        # Tied embeddings with a tokenizer that AutoTokenizer loads as saved (for qwen2 it substitutes its own class).
        "llama_tied": LlamaConfig(**COMMON, tie_word_embeddings=True),
        # A window shorter than the test sequences, so the sliding-window mask matters.
        "mistral": MistralConfig(**COMMON, sliding_window=8),
        "qwen2": Qwen2Config(**COMMON, tie_word_embeddings=True),
        "qwen3": Qwen3Config(**COMMON, head_dim=8),
        # Embedding scale, logit softcapping, alternating sliding/full attention, tied embeddings.
        "gemma2": Gemma2Config(
            **COMMON, head_dim=8, sliding_window=8, final_logit_softcapping=5.0, attn_logit_softcapping=20.0
        ),
        "phi3": Phi3Config(**COMMON),
        "cohere": CohereConfig(**COMMON, logit_scale=0.5, tie_word_embeddings=True),
        "mixtral": MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2),
        # Shared expert with its gate, every layer sparse (decoder_sparse_step 1).
        "qwen2_moe": Qwen2MoeConfig(
            **COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=24
        ),
        # q/k norms; one dense layer (mlp_only_layers) among the sparse ones.
        "qwen3_moe": Qwen3MoeConfig(
            **COMMON, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, mlp_only_layers=[1]
        ),
        "olmoe": OlmoeConfig(**COMMON, num_experts=4, num_experts_per_tok=2),
        # Attention sinks, alternating sliding/full layers, expert biases and its clamped gated activation.
        "gpt_oss": GptOssConfig(
            **{**COMMON, "intermediate_size": 16},
            head_dim=8,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention"] * 2,
        ),
        # Local/global layers with their own rope bases, q/k norms, embedding scale, tied embeddings.
        "gemma3": Gemma3TextConfig(**COMMON, head_dim=8, sliding_window=8, sliding_window_pattern=2),
    }


MOE_ARCHITECTURES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss")
ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "cohere", *MOE_ARCHITECTURES)


def make_tiny_model(arch: str, directory: Path, seed: int = 0, **overrides) -> Path:
    """Saves a randomly initialised tiny ``arch`` model (float32, safetensors) into ``directory``; ``overrides`` set
    config attributes (``head_dim=16``)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = _configs()[arch]
    for name, value in overrides.items():
        setattr(config, name, value)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        # Non-trivial norm weights, so that a norm loaded wrongly would show.
        for name, param in model.named_parameters():
            if "norm" in name and param.dim() == 1:
                param.uniform_(0.5, 1.5) if "gemma" not in arch else param.uniform_(-0.5, 0.5)
    model.save_pretrained(directory)
    return Path(directory)


def make_tiny_tokenizer(directory: Path) -> None:
    """A word-level tokenizer over VOCAB ids, with <pad>=0, <s>=1, </s>=2, saved into ``directory``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(VOCAB - 4)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.save_pretrained(directory)


def load_hf(model_dir: Path, attn_implementation: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation=attn_implementation
    ).eval()


def stage_layers(source, adapter=None, base=None, trainable=frozenset(), loss=None, device="cpu") -> list:
    """``[EmbeddingPipe, DecoderLayerPipe × N, OutputPipe]`` of ``source`` built in one process (one stage)."""
    from lit_qlp.models.pipeline import DecoderLayerPipe, EmbeddingPipe, OutputPipe, StageBuilder

    builder = StageBuilder(source, torch.device(device), base, frozenset(trainable))
    decoders = [DecoderLayerPipe(builder, i, adapter) for i in range(source.quirks.num_layers)]
    return [EmbeddingPipe(builder), *decoders, OutputPipe(builder, loss)]
