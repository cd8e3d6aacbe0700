"""Adapters trained on frozen base weights."""
