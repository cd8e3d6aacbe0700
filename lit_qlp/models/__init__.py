"""Generic decomposition of Hugging Face decoder-only models into pipeline layers."""
