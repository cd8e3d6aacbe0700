"""Fixtures shared by the tests of this directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.data.helpers import DEMO_MODEL
from tests.tiny_models import make_tiny_tokenizer


@pytest.fixture(scope="session")
def tiny_tok(tmp_path_factory) -> Path:
    """Directory of the tiny WordLevel tokenizer alone (the session's ``tiny_model`` fixture also builds a model)."""
    directory = tmp_path_factory.mktemp("tiny_tokenizer")
    make_tiny_tokenizer(directory)
    return directory


@pytest.fixture(scope="session")
def demo_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(DEMO_MODEL)
