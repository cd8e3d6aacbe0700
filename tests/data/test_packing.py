"""Packing documents into sequences, against a reference packer written here; token caps."""

from __future__ import annotations

import random

import numpy as np
import pytest

from lit_qlp.data.packing import pack, truncate_tokens
from lit_qlp.data.tokenize import Encoded
from lit_qlp.kernels.fused_loss import IGNORE_INDEX
from tests.data.helpers import Row

# ----------------------------------------------------------------------------------------------------- packing


def reference_pack(docs, trained, classes, prefix, sequence_len, drop_tails) -> list[Row]:
    """Token-by-token packing written independently of ``pack``: fill a sequence, start the next one."""
    content = sequence_len - len(prefix)
    tokens = [(t, m, c) for doc, tr, c in zip(docs, trained, classes) for t, m in zip(doc, tr)]
    if drop_tails:
        chunks, current = [], None
        for doc, tr, c in zip(docs, trained, classes):
            current = [] if current is None else current
            current += [(t, m, c) for t, m in zip(doc, tr)]
            if len(current) >= content:  # this document fills the sequence; its tail is dropped
                chunks.append(current[:content])
                current = None
    else:
        chunks = [tokens[i : i + content] for i in range(0, len(tokens) - content + 1, content)]
    return [
        (
            tuple(prefix) + tuple(t for t, _, _ in chunk),
            (IGNORE_INDEX,) * len(prefix) + tuple(t if m else IGNORE_INDEX for t, m, _ in chunk),
            (0,) * len(prefix) + tuple(c if m else 0 for _, m, c in chunk),
        )
        for chunk in chunks
    ]


@pytest.mark.parametrize("drop_tails", [False, True])
def test_pack_against_reference(drop_tails):
    rng = random.Random(int(drop_tails))
    for _ in range(300):
        n = rng.randint(0, 8)
        docs = [[rng.randrange(1000) for _ in range(rng.choice([0, 1, 3, 7, 15, 30, 40]))] for _ in range(n)]
        trained = [[rng.random() < 0.7 for _ in d] for d in docs]
        classes = [rng.choice([-1, 0, 1]) for _ in docs]
        sequence_len = rng.randint(2, 20)
        prefix = [rng.randrange(1000) for _ in range(rng.randint(0, 1))]
        encoded = [Encoded(np.asarray(d, dtype=np.int64), np.asarray(t, dtype=bool)) for d, t in zip(docs, trained)]
        packed = pack(encoded, classes, sequence_len, prefix, drop_tails)
        expected = reference_pack(docs, trained, classes, prefix, sequence_len, drop_tails)
        got = [
            (tuple(i), tuple(lab), tuple(c))
            for i, lab, c in zip(packed.input_ids.tolist(), packed.labels.tolist(), packed.control_classes.tolist())
        ]
        assert got == expected, (docs, classes, sequence_len, prefix)
        assert packed.input_ids.shape == (len(expected), sequence_len)
        kept = sum(len(r[0]) - len(prefix) for r in expected)
        assert packed.dropped_tokens == sum(map(len, docs)) - kept


def test_pack_prefix_must_leave_room():
    with pytest.raises(ValueError, match="sequence_len=4"):
        pack([Encoded(np.arange(9), np.ones(9, bool))], [0], 4, [1, 1, 1, 1], False)


def test_truncate_tokens():
    docs = [Encoded(np.arange(n, dtype=np.int64), np.ones(n, dtype=bool)) for n in (5, 3, 4)]
    for limit, kept_lengths in [
        (None, [5, 3, 4]),
        (100, [5, 3, 4]),
        (12, [5, 3, 4]),
        (8, [5, 3]),
        (6, [5, 1]),
        (2, [2]),
    ]:
        kept, removed = truncate_tokens(docs, limit)
        assert [len(d.ids) for d in kept] == kept_lengths, limit
        assert [d.ids.tolist() for d in kept] == [list(range(n)) for n in kept_lengths]
        assert removed == 12 - sum(kept_lengths)
