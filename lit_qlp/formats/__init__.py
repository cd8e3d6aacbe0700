"""The file formats lit-qlp reads and writes, one module each.

- ``lit_qlp.formats.peft``: PEFT LoRA adapters (the epoch export; the one reader of the merge and the GGUF export).
- ``lit_qlp.formats.control``: Control Adapters (PEFT's two files with lit-qlp's ``peft_type``).
- ``lit_qlp.formats.hf``: Hugging Face model directories (safetensors shards and index, config, tokenizer files).
"""
