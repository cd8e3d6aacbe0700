"""Tokenised documents to fixed-length sequences."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lit_qlp.data.tokenize import Encoded
from lit_qlp.kernels.fused_loss import IGNORE_INDEX


@dataclass
class Packed:
    """``[n, sequence_len]`` arrays of a packed dataset and the number of document tokens left out."""

    input_ids: np.ndarray
    labels: np.ndarray
    control_classes: np.ndarray
    dropped_tokens: int

    @classmethod
    def concatenate(cls, parts: Sequence[Packed], sequence_len: int) -> Packed:
        if not parts:
            empty = np.zeros((0, sequence_len), dtype=np.int64)
            return cls(empty, empty.copy(), empty.copy(), 0)
        return cls(
            np.concatenate([p.input_ids for p in parts]),
            np.concatenate([p.labels for p in parts]),
            np.concatenate([p.control_classes for p in parts]),
            sum(p.dropped_tokens for p in parts),
        )

    def take(self, rows: np.ndarray) -> Packed:
        return Packed(self.input_ids[rows], self.labels[rows], self.control_classes[rows], self.dropped_tokens)


def truncate_tokens(documents: list[Encoded], max_tokens: int | None) -> tuple[list[Encoded], int]:
    """Keeps documents in order until ``max_tokens`` tokens; the document crossing the limit is cut.

    Returns the kept documents and the number of tokens removed.
    """
    if max_tokens is None:
        return documents, 0
    kept, total = [], 0
    for doc in documents:
        room = max_tokens - total
        if room <= 0:
            break
        if len(doc.ids) > room:
            doc = Encoded(doc.ids[:room], doc.trained[:room])
        kept.append(doc)
        total += len(doc.ids)
    return kept, sum(len(d.ids) for d in documents) - total


def pack(
    documents: list[Encoded],
    control_classes: Sequence[int],
    sequence_len: int,
    prefix: Sequence[int],
    drop_tails: bool,
) -> Packed:
    """Concatenates documents and cuts them into sequences of ``sequence_len`` tokens, each opening with ``prefix``.

    Each sequence is ``prefix + content``, content being ``sequence_len - len(prefix)`` tokens of the document
    stream. Without ``drop_tails`` the stream runs on across sequences and only the final partial sequence is
    dropped; with it, a document that does not fit into the rest of a sequence fills it and its tail is dropped,
    so every sequence starts with a fresh document. Labels are the token ids where the token is trained and -100
    elsewhere (prefix, masked and untrained chat tokens), and control classes are the document's class there and 0
    elsewhere.

    Args:
        documents: Tokenised documents, in order.
        control_classes: Control class of each document.
        sequence_len: Tokens per sequence.
        prefix: Token ids opening every sequence (e.g. [BOS]).
        drop_tails: Start every sequence with a fresh document.
    """
    content = sequence_len - len(prefix)
    if content <= 0:
        raise ValueError(f"the sequence prefix ({len(prefix)} tokens) leaves no room in sequence_len={sequence_len}")
    if documents:
        ids = np.concatenate([d.ids for d in documents])
        trained = np.concatenate([d.trained for d in documents])
        classes = np.concatenate([np.full(len(d.ids), c, dtype=np.int64) for d, c in zip(documents, control_classes)])
    else:
        ids, trained, classes = np.zeros(0, np.int64), np.zeros(0, bool), np.zeros(0, np.int64)
    if drop_tails:
        starts, position = [], 0
        lengths = [len(d.ids) for d in documents]
        offset = 0
        chunk_start = None
        for length in lengths:
            # A new sequence opens at this document's start if the previous one is full (or none is open).
            if chunk_start is None or position >= content:
                chunk_start, position = offset, 0
                starts.append(chunk_start)
            position += length
            if position >= content:
                chunk_start = None
            offset += length
        starts = [s for s in starts if s + content <= len(ids)]
        rows = np.asarray(starts, dtype=np.int64)[:, None] + np.arange(content)[None, :]
    else:
        n = len(ids) // content
        rows = np.arange(n * content).reshape(n, content)
    dropped = len(ids) - rows.size
    prefix_ids = np.broadcast_to(np.asarray(prefix, dtype=np.int64), (len(rows), len(prefix)))
    ignore = np.full((len(rows), len(prefix)), IGNORE_INDEX, dtype=np.int64)
    zeros = np.zeros((len(rows), len(prefix)), dtype=np.int64)
    seq_ids = ids[rows] if rows.size else np.zeros((0, content), np.int64)
    seq_trained = trained[rows] if rows.size else np.zeros((0, content), bool)
    seq_classes = classes[rows] if rows.size else np.zeros((0, content), np.int64)
    return Packed(
        input_ids=np.concatenate([prefix_ids, seq_ids], axis=1),
        labels=np.concatenate([ignore, np.where(seq_trained, seq_ids, IGNORE_INDEX)], axis=1),
        control_classes=np.concatenate([zeros, np.where(seq_trained, seq_classes, 0)], axis=1),
        dropped_tokens=int(dropped),
    )
