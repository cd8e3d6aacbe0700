"""``CheckpointStash`` (lit_qlp/models/stash.py): kept values come back in order, prefetched copies taken."""

from __future__ import annotations

import torch

from lit_qlp.models.stash import CheckpointStash


def test_take_returns_the_copies_that_prefetch_started_for_the_entries_not_yet_taken():
    """Entries kept away from their device (here: the meta device, kept on the CPU) are fetched once each by
    ``prefetch``, entries already taken are not, and ``take`` gives the fetched copy instead of copying again;
    other values come back as they were kept."""
    stash = CheckpointStash(offload=lambda tensor: torch.full(tensor.shape, float(len(stash.entries))))
    for index in range(3):
        assert stash.keep(("attention", index), (torch.empty(2, device="meta"), "kept as it is"))
    stash.replaying = True
    assert stash.take(("attention", 0))[1] == "kept as it is"  # taken before the prefetch: not fetched
    fetched = []

    def fetch(stored, device):
        fetched.append(stored[0].item())
        return lambda: stored + 10

    stash.prefetch(fetch)
    stash.prefetch(fetch)  # started already: not again
    assert fetched == [1.0, 2.0]
    for index in (1, 2):
        copy, value = stash.take(("attention", index))
        assert value == "kept as it is" and torch.equal(copy, torch.full((2,), 10.0 + index))
    assert stash.take(("attention", 3)) is None
