"""lit-qlp-generate (lit_qlp/export/generate.py): greedy answers equal an argmax loop over the model's own forward,
for the base and for base + adapter; prompts rendered with the chat template; bad inputs refused."""

from __future__ import annotations

import json
import shutil

import peft
import pytest
import torch

from lit_qlp.commands import generate as generate_command
from lit_qlp.export.generate import Decoding, generate, load_model, prompt_ids, read_prompts

TEMPLATE = (
    "{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s> assistant{% endif %}"
)


def greedy_reference(model, ids: list[int], steps: int, eos: int) -> list[int]:
    """Argmax decoding by full forwards (no cache): the reference of the generated tokens."""
    tokens = list(ids)
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(input_ids=torch.tensor([tokens])).logits[0, -1].argmax())
            if token == eos:
                break
            tokens.append(token)
    return tokens[len(ids) :]


@pytest.fixture
def model_and_adapter(tiny_model, tmp_path):
    """A copy of the tiny llama with a chat template, and a LoRA adapter over it with non-zero B."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = tmp_path / "base"
    shutil.copytree(tiny_model("llama"), model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
    )
    adapted = peft.get_peft_model(base, config)
    with torch.no_grad():
        for name, weight in adapted.named_parameters():
            if "lora_B" in name:
                weight.normal_(std=2.0, generator=torch.Generator().manual_seed(0))
    adapted.save_pretrained(tmp_path / "adapter")
    return model_dir, tmp_path / "adapter"


def test_greedy_answers_equal_an_argmax_loop_for_base_and_adapter(model_and_adapter):
    model_dir, adapter = model_and_adapter
    prompts = ["w5 w6 w7", "w40 w41"]
    decoding = Decoding(max_new_tokens=6)
    model, tokenizer = load_model(model_dir, adapter)
    ids = prompt_ids(tokenizer, prompts[0])
    turn = [{"role": "user", "content": prompts[0]}]
    rendered = tokenizer.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
    assert rendered == "<s> user w5 w6 w7 </s> <s> assistant"  # the template with the generation prompt
    assert ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    with_adapter = generate(model, tokenizer, prompts, decoding)
    with model.disable_adapter():
        base = generate(model, tokenizer, prompts, decoding)
    for prompt, ours_base, ours_adapted in zip(prompts, base, with_adapter):
        ids = prompt_ids(tokenizer, prompt)
        with model.disable_adapter():
            expected_base = greedy_reference(model, ids, 6, tokenizer.eos_token_id)
        expected_adapted = greedy_reference(model, ids, 6, tokenizer.eos_token_id)
        assert ours_base == tokenizer.decode(expected_base, skip_special_tokens=True)
        assert ours_adapted == tokenizer.decode(expected_adapted, skip_special_tokens=True)
    assert base != with_adapter  # the adapter changes the answers: the comparison above means something


def test_raw_prompts_and_seeded_sampling(model_and_adapter):
    model_dir, _ = model_and_adapter
    model, tokenizer = load_model(model_dir)
    assert prompt_ids(tokenizer, "w5 w6", chat_template=False) == tokenizer("w5 w6")["input_ids"]
    sampled = Decoding(max_new_tokens=8, temperature=1.5, top_p=0.9, seed=3)
    first = generate(model, tokenizer, ["w5 w6"], sampled)
    assert generate(model, tokenizer, ["w5 w6"], sampled) == first  # seeded: reproducible
    with pytest.raises(ValueError, match="temperature=-1"):
        Decoding(temperature=-1)
    with pytest.raises(ValueError, match="top_p=0"):
        Decoding(top_p=0)


def test_prompts_files(tmp_path):
    (tmp_path / "p.txt").write_text("first\n\nsecond\n")
    assert read_prompts(tmp_path / "p.txt") == ["first", "second"]
    records = [{"prompt": "a"}, {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "b"}]}]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    assert read_prompts(tmp_path / "p.jsonl") == ["a", "b"]
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{"text": "x"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl, line 2: needs a 'prompt' string or a chat"):
        read_prompts(tmp_path / "bad.jsonl")


def test_command_line_compares_base_and_adapter(model_and_adapter, capsys):
    model_dir, adapter = model_and_adapter
    generate_command(["--model", str(model_dir), "--adapter", str(adapter), "--compare", "--prompt", "w5 w6"])
    out = capsys.readouterr().out
    model, tokenizer = load_model(model_dir, adapter)
    expected = generate(model, tokenizer, ["w5 w6"])
    with model.disable_adapter():
        expected_base = generate(model, tokenizer, ["w5 w6"])
    assert out.startswith("### prompt 1: w5 w6\n")
    assert f"--- base:\n{expected_base[0]}\n--- adapter:\n{expected[0]}\n" in out
    with pytest.raises(SystemExit, match=r"error: .* is not a PEFT adapter directory"):
        generate_command(["--model", str(model_dir), "--adapter", str(model_dir), "--prompt", "x"])
    with pytest.raises(SystemExit):
        generate_command(["--model", str(model_dir)])  # no prompt
    assert "give at least one --prompt" in capsys.readouterr().err
