"""Turn a GGUF model file into a Hugging Face model directory lit-qlp trains from.

    python tools/gguf_to_hf.py --input model.gguf --output DIR [--dtype float32|bfloat16|float16]

Weights (dequantised: a Q4_1 file gives the values llama.cpp computes with, not the original precision), config,
generation config and the tokenizer with the chat template the GGUF file carries. Also installed as
lit-qlp-gguf-to-hf.
"""

from lit_qlp.commands import gguf_to_hf

if __name__ == "__main__":
    gguf_to_hf()
