"""Answers of a model, with or without a trained LoRA adapter, to a few prompts (chat template applied).

    python tools/generate.py --model BASE [--adapter runs/lora/epoch1 [--compare]] --prompt "..." [--prompt ...]
        [--prompts prompts.jsonl] [--max-new-tokens 128] [--temperature 0] [--top-p 1] [--seed 0] [--system ...]

Greedy unless --temperature is above 0; --compare prints the base model's answer beside the adapter's. Also
installed as lit-qlp-generate.
"""

from lit_qlp.commands import generate

if __name__ == "__main__":
    generate()
