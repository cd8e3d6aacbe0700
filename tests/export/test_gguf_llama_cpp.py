"""llama.cpp itself loads the GGUF LoRA export of fused MoE experts: llama-cpp-python runs a tiny Qwen3-MoE base
(written here with the gguf package) with the adapter and gives the logits of PEFT's ``target_parameters`` LoRA
on the Hugging Face model. Skipped where llama-cpp-python is not installed (it is not a dependency)."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from lit_qlp.export.gguf import lora_to_gguf

llama_cpp = pytest.importorskip("llama_cpp")

LAYERS, HIDDEN, EXPERT_FFN, EXPERTS, HEADS, KV_HEADS, HEAD_DIM = 2, 64, 32, 4, 4, 2, 16
VOCAB = 3 + 256 + 61  # unk, bos, eos, the 256 byte tokens llama.cpp's SentencePiece vocabulary expects, plain ones


def tiny_qwen3_moe(directory: Path):
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    config = Qwen3MoeConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=96,
        moe_intermediate_size=EXPERT_FFN,
        num_experts=EXPERTS,
        num_experts_per_tok=2,
        norm_topk_prob=True,  # llama.cpp's qwen3moe renormalises the chosen experts' weights
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if name.endswith("norm.weight"):
                weight.uniform_(0.5, 1.5)  # norms that a misplaced weight would show
    model.save_pretrained(directory)
    return model


def write_base_gguf(model, path: Path) -> None:
    """The model as llama.cpp's converter writes a Qwen3-MoE (float32): gate_up_proj split into the gate and up
    expert tensors, no q/k permutation (NeoX rotary, as Hugging Face's)."""
    weights = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    writer = gguf.GGUFWriter(str(path), arch="qwen3moe")
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(96)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_key_length(HEAD_DIM)
    writer.add_value_length(HEAD_DIM)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_expert_count(EXPERTS)
    writer.add_expert_used_count(2)
    writer.add_expert_feed_forward_length(EXPERT_FFN)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + [f"t{i}" for i in range(VOCAB - 259)]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * VOCAB)
    writer.add_token_types([2, 3, 3] + [6] * 256 + [1] * (VOCAB - 259))  # unknown, control, byte, normal
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_tensor("token_embd.weight", weights["model.embed_tokens.weight"])
    names = {
        "attn_norm": "input_layernorm",
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "attn_q_norm": "self_attn.q_norm",
        "attn_k_norm": "self_attn.k_norm",
        "ffn_norm": "post_attention_layernorm",
        "ffn_gate_inp": "mlp.gate",
    }
    for i in range(LAYERS):
        prefix = f"model.layers.{i}."
        for ours, theirs in names.items():
            writer.add_tensor(f"blk.{i}.{ours}.weight", weights[f"{prefix}{theirs}.weight"])
        gate_up = weights[f"{prefix}mlp.experts.gate_up_proj"]  # [E, gate rows then up rows, hidden]
        writer.add_tensor(f"blk.{i}.ffn_gate_exps.weight", np.ascontiguousarray(gate_up[:, :EXPERT_FFN]))
        writer.add_tensor(f"blk.{i}.ffn_up_exps.weight", np.ascontiguousarray(gate_up[:, EXPERT_FFN:]))
        writer.add_tensor(f"blk.{i}.ffn_down_exps.weight", weights[f"{prefix}mlp.experts.down_proj"])
    writer.add_tensor("output_norm.weight", weights["model.norm.weight"])
    writer.add_tensor("output.weight", weights["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def llama_cpp_logits(base: Path, ids: list[int], adapter: Path | None = None) -> np.ndarray:
    model = llama_cpp.Llama(
        model_path=str(base),
        lora_path=None if adapter is None else str(adapter),
        n_ctx=64,
        logits_all=True,
        n_threads=1,
        verbose=False,
    )
    model.eval(ids)
    return np.array(model.scores[: len(ids)])


def test_llama_cpp_runs_the_fused_expert_adapter_with_peft_logits(tmp_path):
    import peft

    model = tiny_qwen3_moe(tmp_path / "hf")
    write_base_gguf(model, tmp_path / "base.gguf")
    ids = [1, 17, 300, 45, 99, 260, 7, 311]
    with torch.no_grad():
        base_logits = model(torch.tensor([ids])).logits[0].numpy()

    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        target_parameters=["experts.gate_up_proj", "experts.down_proj"],
        init_lora_weights=False,
    )
    adapted = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, weight in adapted.named_parameters():
            if "lora_" in name:
                weight.mul_(3.0)  # an adapter that moves the logits well beyond the comparison's tolerance
        lora_logits = adapted(torch.tensor([ids])).logits[0].numpy()
    adapted.save_pretrained(tmp_path / "adapter")
    adapter_config = tmp_path / "adapter" / "adapter_config.json"
    config_json = json.loads(adapter_config.read_text())
    adapter_config.write_text(json.dumps({**config_json, "base_model_name_or_path": str(tmp_path / "hf")}))
    summary = lora_to_gguf(tmp_path / "adapter", tmp_path / "adapter.gguf")
    assert summary["architecture"] == "qwen3moe" and summary["pairs"] == LAYERS * 5  # q, v, gate, up, down

    # The base as written is llama.cpp's model of the HF one, so the adapter's test means something.
    np.testing.assert_allclose(llama_cpp_logits(tmp_path / "base.gguf", ids), base_logits, atol=2e-3)
    assert np.abs(lora_logits - base_logits).max() > 0.2
    with_adapter = llama_cpp_logits(tmp_path / "base.gguf", ids, tmp_path / "adapter.gguf")
    np.testing.assert_allclose(with_adapter, lora_logits, atol=2e-3)
