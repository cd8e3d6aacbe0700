"""lit_qlp.compat.transformers against the installed transformers, on a tiny Llama; and its errors when a target
is gone."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.models.auto import modeling_auto

from lit_qlp.compat import transformers as compat

OUTDATED = r"transformers \S+ has no .*lit_qlp/compat/transformers.py needs updating"


def tiny_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )


def test_causal_lm_class_is_what_auto_model_builds(monkeypatch):
    config = tiny_config()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert compat.causal_lm_class(config) is type(model) is LlamaForCausalLM
    with pytest.raises(ValueError, match="has no causal language model for"):
        compat.causal_lm_class(PretrainedConfig())
    monkeypatch.delattr(modeling_auto, "MODEL_FOR_CAUSAL_LM_MAPPING")
    with pytest.raises(RuntimeError, match=OUTDATED):
        compat.causal_lm_class(config)


def test_supports_sdpa_reads_the_models_declaration(monkeypatch):
    class NoSdpa(LlamaForCausalLM):
        _supports_sdpa = False

    assert compat.supports_sdpa(LlamaForCausalLM)
    assert not compat.supports_sdpa(NoSdpa)
    monkeypatch.delattr(PreTrainedModel, "_supports_sdpa")
    with pytest.raises(RuntimeError, match=OUTDATED):
        compat.supports_sdpa(LlamaForCausalLM)


@pytest.mark.parametrize("name", ["eager", "sdpa"])
def test_set_attn_implementation_is_what_models_use(name):
    config = tiny_config()
    compat.set_attn_implementation(config, name)
    reference = LlamaForCausalLM(tiny_config()).eval()
    reference.set_attn_implementation(name)  # transformers' public switch, on a built model
    model = AutoModelForCausalLM.from_config(config).eval()
    assert model.config._attn_implementation == reference.config._attn_implementation == name
    model.load_state_dict(reference.state_dict())
    ids = torch.arange(8).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits)


def test_set_attn_implementation_needs_the_config_attribute(monkeypatch):
    config = tiny_config()
    monkeypatch.delattr(PretrainedConfig, "_attn_implementation")
    with pytest.raises(RuntimeError, match=OUTDATED):
        compat.set_attn_implementation(config, "eager")


def test_init_weights_recomputes_buffers_and_sets_norms_without_gradients(monkeypatch):
    model = LlamaForCausalLM(tiny_config())
    rotary, norm = model.model.rotary_emb, model.model.norm
    inv_freq = rotary.inv_freq.clone()
    with torch.no_grad():
        rotary.inv_freq.zero_()
        norm.weight.zero_()
    compat.init_weights(model, rotary)
    compat.init_weights(model, norm)
    torch.testing.assert_close(rotary.inv_freq, inv_freq)
    assert torch.equal(norm.weight, torch.ones_like(norm.weight)) and norm.weight.grad_fn is None
    for owner in type(model).__mro__:
        if "_init_weights" in vars(owner):
            monkeypatch.delattr(owner, "_init_weights")
    with pytest.raises(RuntimeError, match=OUTDATED):
        compat.init_weights(model, norm)


@pytest.mark.parametrize("mask_function", [create_causal_mask, create_sliding_window_causal_mask])
def test_mask_cache_keyword_builds_masks_without_a_deprecation_warning(mask_function):
    keyword = compat.mask_cache_keyword(mask_function)
    assert keyword in compat.MASK_CACHE_KEYWORDS
    config = tiny_config()
    config.sliding_window = 4
    compat.set_attn_implementation(config, "eager")
    embeds, positions = torch.zeros(1, 6, 16), torch.arange(6).unsqueeze(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mask = mask_function(
            config=config, inputs_embeds=embeds, attention_mask=None, position_ids=positions, **{keyword: None}
        )
    assert mask.shape[-2:] == (6, 6)


def test_mask_cache_keyword_needs_a_cache_argument():
    def mask_function(config, inputs_embeds, attention_mask, kv_cache, position_ids=None):
        return None

    with pytest.raises(RuntimeError, match=OUTDATED) as error:
        compat.mask_cache_keyword(mask_function)
    assert "cache or past_key_values argument of" in str(error.value)


def test_a_registered_experts_implementation_is_what_experts_modules_run(tiny_model):
    calls = []

    def forward(experts, hidden_states, top_k_index, top_k_weights):
        calls.append(type(experts).__name__)
        return torch.zeros_like(hidden_states)

    compat.register_experts_implementation("lit_qlp_test_probe", forward)
    model = AutoModelForCausalLM.from_pretrained(tiny_model("qwen3_moe"), experts_implementation="lit_qlp_test_probe")
    model(input_ids=torch.tensor([[1, 5, 7]]))
    assert calls and set(calls) == {"Qwen3MoeExperts"}


def test_register_experts_implementation_needs_the_interface(monkeypatch):
    from transformers.integrations import moe

    monkeypatch.delattr(moe, "ExpertsInterface")
    with pytest.raises(RuntimeError, match=OUTDATED):
        compat.register_experts_implementation("x", lambda *args: None)


def test_experts_activation_is_the_modules_gate_or_its_activation(tiny_model, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(tiny_model("gpt_oss"))
    experts = next(m for m in model.modules() if type(m).__name__ == "GptOssExperts")
    up = torch.randn(3, 2 * experts.intermediate_size)
    torch.testing.assert_close(compat.experts_activation(experts)(up), experts._apply_gate(up))  # clamped GLU
    monkeypatch.setattr(experts, "has_gate", False, raising=False)
    monkeypatch.setattr(experts, "act_fn", torch.nn.GELU(), raising=False)  # an ungated experts module's activation
    assert compat.experts_activation(experts) is experts.act_fn


def test_gguf_architectures_and_forgetting_the_quantizer_of_a_model_not_from_gguf():
    assert {"llama", "qwen3", "gemma2"} <= set(compat.gguf_architectures())
    assert "general" not in compat.gguf_architectures()
    with pytest.raises(ValueError, match="not loaded from a GGUF file"):
        compat.forget_gguf_quantization(LlamaForCausalLM(tiny_config()))
