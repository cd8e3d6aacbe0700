"""lit_qlp.compat.torch against the installed torch."""

from __future__ import annotations

import pytest
import torch

from lit_qlp.compat.torch import version_counter


def test_version_counter_counts_in_place_changes_only():
    tensor = torch.arange(4)
    before = version_counter(tensor)
    assert version_counter(tensor + 1) == 0 and version_counter(tensor) == before
    tensor.add_(1)
    assert version_counter(tensor) == before + 1


def test_version_counter_names_the_module_to_update_when_torch_lacks_it():
    class NoVersion:
        pass

    with pytest.raises(RuntimeError, match="lit_qlp/compat/torch.py needs updating"):
        version_counter(NoVersion())
