"""Convert a PEFT LoRA adapter into a llama.cpp LoRA adapter GGUF (``llama-cli -m base.gguf --lora adapter.gguf``).

    python tools/lora_to_gguf.py --input ADAPTER --output adapter.gguf [--arch llama] [--outtype F32|F16|BF16|Q8_0]

The architecture is --arch, else the model_type of <base_model_name_or_path>/config.json from the adapter's
adapter_config.json. Tensor names, layouts and what is refused: lit_qlp/export/gguf.py.
"""

from lit_qlp.commands import lora_to_gguf

if __name__ == "__main__":
    lora_to_gguf()
