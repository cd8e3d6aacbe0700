"""lit_qlp: LoRA / QLoRA / full fine-tuning of Hugging Face causal LMs on Lightning + DeepSpeed pipelines."""

__version__ = "0.1.0"
