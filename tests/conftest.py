from __future__ import annotations

import os
import sys

import pytest
import torch

from tests.tiny_models import make_tiny_model, make_tiny_tokenizer

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """``tiny_model(arch)``: directory of a tiny random ``arch`` model with a tokenizer, built once per session."""
    cache: dict[str, object] = {}

    def make(arch: str = "llama"):
        if arch not in cache:
            directory = tmp_path_factory.mktemp(arch)
            make_tiny_model(arch, directory)
            make_tiny_tokenizer(directory)
            cache[arch] = directory
        return cache[arch]

    return make


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A jsonl corpus of short documents with a learnable pattern (see ``tests.runs.write_corpus``)."""
    from tests.runs import write_corpus

    return write_corpus(tmp_path_factory.mktemp("data") / "corpus.jsonl")


@pytest.fixture
def clean_process_state(monkeypatch):
    """For tests that run the CLI in this process: it sets environment variables (seed, ranks, master port) and
    may leave a process group; every test gets a pristine environment back and must not leak either."""
    monkeypatch.setattr(sys, "argv", ["lit-qlp"])  # LightningCLI warns when it sees pytest's own arguments
    saved = dict(os.environ)
    default_dtype = torch.get_default_dtype()
    yield
    os.environ.clear()
    os.environ.update(saved)
    assert torch.get_default_dtype() == default_dtype
    assert not torch.distributed.is_initialized(), "a failed run left a process group behind"
