"""Answers of a base model, with or without a trained adapter, to a few prompts: what training did, without writing
code (``lit-qlp-generate``, ``tools/generate.py``).

The model is a Hugging Face directory (a base model or a merged one); an adapter is an epoch export of a LoRA run
(PEFT's format), loaded over it with ``PeftModel.from_pretrained``. Each prompt is a user turn rendered with the
tokenizer's chat template (generation prompt added, as the model is served), or the raw text with
``chat_template=False`` or a tokenizer without one. Decoding is greedy by default; ``temperature > 0`` samples
(with ``top_p``), seeded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Decoding:
    """How answers are decoded.

    Args:
        max_new_tokens: Tokens generated at most per answer.
        temperature: 0: greedy (the most likely token each step); above 0: sampling at that temperature.
        top_p: Nucleus sampling's probability mass (sampling only).
        seed: Seed of the sampling.
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be at least 1")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be 0 (greedy) or positive (sampling)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")


def read_prompts(path: Path) -> list[str]:
    """Prompts of a file: one per line of a ``.txt``; of a ``.jsonl``, each record's ``prompt`` (or its chat's
    first user turn: ``messages``/``conversations`` with role ``user``). Blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such prompts file")
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix != ".jsonl":
            prompts.append(line)
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {number}: not JSON ({error.msg})") from None
        turns = record.get("messages") or record.get("conversations") if isinstance(record, dict) else None
        if isinstance(record, dict) and isinstance(record.get("prompt"), str):
            prompts.append(record["prompt"])
        elif isinstance(turns, list) and any(isinstance(t, dict) and t.get("role") == "user" for t in turns):
            prompts.append(next(t["content"] for t in turns if isinstance(t, dict) and t.get("role") == "user"))
        else:
            raise ValueError(f"{path}, line {number}: needs a 'prompt' string or a chat with a 'user' turn")
    if not prompts:
        raise ValueError(f"{path} holds no prompt")
    return prompts


def load_model(model_dir: Path, adapter: Path | None = None, dtype: str = "float32"):
    """The model of ``model_dir`` in ``dtype``, with the PEFT adapter ``adapter`` over it, in eval mode, and its
    tokenizer (the adapter directory's when it has one, as the epoch export copies it)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a Hugging Face model directory (no config.json)")
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    tokenizer_dir = model_dir
    if adapter is not None:
        adapter = Path(adapter)
        if not (adapter / "adapter_config.json").is_file():
            control = (adapter / "control_adapter_config.json").is_file() or any(adapter.glob("*control*"))
            hint = (
                "; a Control Adapter converts to one with lit-qlp-control-adapter-to-lora"
                if control
                else " (an epoch export of a LoRA run, e.g. <root>/epoch1)"
            )
            raise FileNotFoundError(f"{adapter} is not a PEFT adapter directory (no adapter_config.json){hint}")
        if (adapter / "tokenizer_config.json").is_file():
            tokenizer_dir = adapter
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[dtype])
    if adapter is not None:
        import peft

        model = peft.PeftModel.from_pretrained(model, adapter)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return model.eval(), tokenizer


def prompt_ids(tokenizer, prompt: str, chat_template: bool = True, system: str | None = None) -> list[int]:
    """The token ids the model continues: the chat template's rendering of one user turn (after ``system``) with
    the generation prompt, or the raw text's tokens."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        turns = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        ids = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    if system:
        raise ValueError(
            "a system message needs the tokenizer's chat template (drop --system or the --no-chat-template)"
        )
    return tokenizer(prompt)["input_ids"]


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], decoding: Decoding = Decoding(), **prompt_options) -> list[str]:
    """Each prompt's answer (the generated text, special tokens removed), one prompt at a time, by transformers'
    ``generate``: it stops at the generation config's EOS tokens (the tokenizer's EOS if the config names none)
    or after ``decoding.max_new_tokens``. ``prompt_options``: those of ``prompt_ids``."""
    device = next(model.parameters()).device
    sampling = decoding.temperature > 0
    options = dict(max_new_tokens=decoding.max_new_tokens, do_sample=sampling, top_k=None)
    # Greedy: no sampling settings (a generation config's defaults would only warn); sampling: exactly these.
    options |= (
        dict(temperature=decoding.temperature, top_p=decoding.top_p) if sampling else dict(temperature=None, top_p=None)
    )
    if getattr(model.generation_config, "eos_token_id", None) is None:
        options["eos_token_id"] = tokenizer.eos_token_id
    options["pad_token_id"] = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers = []
    for prompt in prompts:
        if sampling:
            torch.manual_seed(decoding.seed)  # each answer reproducible on its own
        ids = torch.tensor([prompt_ids(tokenizer, prompt, **prompt_options)], device=device)
        output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **options)
        answers.append(tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True))
    return answers


__all__ = ["Decoding", "generate", "load_model", "prompt_ids", "read_prompts"]
