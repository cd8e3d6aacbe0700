"""Merge a PEFT LoRA into its 16-bit base model, shard by shard (memory near one shard).

    python tools/merge_lora.py --input BASE --adapter ADAPTER --output OUT [--scale 1.0]

Copies config, tokenizer and chat template files; the output loads with transformers. A LoRA converted from
a Control Adapter (tools/control_adapter_to_lora.py) merges the same way. Also installed as lit-qlp-merge-lora.
"""

from lit_qlp.commands import merge_lora

if __name__ == "__main__":
    merge_lora()
