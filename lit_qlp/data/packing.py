"""Tokenised documents to fixed-length sequences."""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from lit_qlp.data.tokenize import Encoded
from lit_qlp.kernels.fused_loss import IGNORE_INDEX


@dataclass
class Packed:
    """``[n, sequence_len]`` arrays of a packed dataset, and what packing did (counted over every document packed,
    before any split).

    Attributes:
        packed_sequences: Sequences packed (before ``max_sequences`` and the split).
        dropped_tokens: Document tokens left out (cut tails, the final partial sequence); the prefix tokens a
            document leaves out where the sequence prefix puts them back do not count.
        padding_tokens: Padding after whole chats.
        chats: Chat documents packed.
        truncated_chats: Chats longer than a sequence, cut to their first tokens.
        answers: Answers (runs of labelled tokens) in the chats.
        answers_without_prompt: Answers with labelled tokens in a sequence that does not hold their chat's start.
        answers_without_prompt_as_text: The same had chats been packed like text (the stream, ``drop_tails`` as
            given): what keeping chats whole saved.
    """

    input_ids: np.ndarray
    labels: np.ndarray
    control_classes: np.ndarray
    dropped_tokens: int
    packed_sequences: int = 0
    padding_tokens: int = 0
    chats: int = 0
    truncated_chats: int = 0
    answers: int = 0
    answers_without_prompt: int = 0
    answers_without_prompt_as_text: int = 0

    COUNTS = (
        "dropped_tokens",
        "packed_sequences",
        "padding_tokens",
        "chats",
        "truncated_chats",
        "answers",
        "answers_without_prompt",
        "answers_without_prompt_as_text",
    )

    @classmethod
    def concatenate(cls, parts: Sequence[Packed], sequence_len: int) -> Packed:
        if not parts:
            empty = np.zeros((0, sequence_len), dtype=np.int64)
            return cls(empty, empty.copy(), empty.copy(), 0)
        return cls(
            np.concatenate([p.input_ids for p in parts]),
            np.concatenate([p.labels for p in parts]),
            np.concatenate([p.control_classes for p in parts]),
            **{name: sum(getattr(p, name) for p in parts) for name in cls.COUNTS},
        )

    def take(self, rows: np.ndarray) -> Packed:
        counts = {name: getattr(self, name) for name in self.COUNTS}
        return Packed(self.input_ids[rows], self.labels[rows], self.control_classes[rows], **counts)


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
            doc = replace(doc, ids=doc.ids[:room], trained=doc.trained[:room])
        kept.append(doc)
        total += len(doc.ids)
    return kept, sum(len(d.ids) for d in documents) - total


Segment = tuple[int, int, int]
"""``(document, start, end)``: tokens ``start:end`` of a document, placed next in a sequence."""


@dataclass
class Placement:
    """Where each document's tokens go: ``rows[r]`` lists the segments of sequence ``r`` in order, each sequence
    ``prefix + segments + padding`` (only chats kept whole leave room for padding); ``left_out[r]`` counts the
    leading tokens that documents opening sequence ``r`` leave to the prefix (``prefix_length_to_drop``);
    ``truncated_chats`` counts the chats longer than a sequence, cut to their first ``sequence_len - len(prefix)``
    tokens."""

    rows: list[list[Segment]]
    left_out: list[int]
    truncated_chats: int = 0


def prefix_length_to_drop(document: Encoded, prefix: Sequence[int]) -> int:
    """How many leading tokens of ``document`` to leave out where it opens a sequence: all of ``prefix`` if the
    document starts with exactly those tokens (a chat template's own BOS under the default ``[BOS]`` prefix), since
    the prefix puts them back; else none."""
    n = len(prefix)
    return n if n and len(document.ids) >= n and document.ids[:n].tolist() == list(prefix) else 0


def place_concatenated(documents: Sequence[Encoded], indices: Sequence[int], content: int, prefix: Sequence[int]):
    """One stream of the documents cut every ``content`` tokens; the final partial sequence is left out."""
    rows: list[list[Segment]] = [[]]
    left_out = [0]
    position = 0
    for i in indices:
        start, end = prefix_length_to_drop(documents[i], prefix) if position == 0 else 0, len(documents[i].ids)
        left_out[-1] += start
        while start < end:
            take = min(end - start, content - position)
            rows[-1].append((i, start, start + take))
            start, position = start + take, position + take
            if position == content:
                rows.append([])
                left_out.append(0)
                position = 0
    return Placement(rows[:-1], left_out[:-1])


def place_drop_tails(documents: Sequence[Encoded], indices: Sequence[int], content: int, prefix: Sequence[int]):
    """Every sequence opens with a document; the one that does not fit fills the sequence and loses its tail."""
    rows: list[list[Segment]] = []
    left_out: list[int] = []
    position = content
    for i in indices:
        if position == content:
            rows.append([])
            left_out.append(0)
            position = 0
        start = prefix_length_to_drop(documents[i], prefix) if position == 0 else 0
        left_out[-1] += start
        take = min(len(documents[i].ids) - start, content - position)
        if take > 0:
            rows[-1].append((i, start, start + take))
            position += take
    if position < content:  # the last sequence is not full
        rows, left_out = rows[:-1], left_out[:-1]
    return Placement(rows, left_out)


def place_whole(documents: Sequence[Encoded], indices: Sequence[int], content: int, prefix: Sequence[int]):
    """Best fit: each document goes whole into the open sequence with the least room that holds it, or opens a new
    one; what room is left at the end is padding. A document longer than a sequence gets one of its own and keeps
    its first ``content`` tokens.

    The document opening a sequence leaves out the leading tokens the prefix puts back
    (``prefix_length_to_drop``); one placed after another keeps them.
    """
    rows: list[list[Segment]] = []
    left_out: list[int] = []
    open_rows: list[tuple[int, int]] = []  # (room left, row), sorted: the first with enough room fits best
    truncated = 0
    for i in indices:
        length = len(documents[i].ids)
        k = bisect.bisect_left(open_rows, (length, -1))
        if k < len(open_rows):
            room, r = open_rows.pop(k)
            rows[r].append((i, 0, length))
            if room > length:
                bisect.insort(open_rows, (room - length, r))
            continue
        start = prefix_length_to_drop(documents[i], prefix)
        end = min(length, start + content)
        truncated += end < length
        rows.append([(i, start, end)])
        left_out.append(start)
        if end - start < content:
            bisect.insort(open_rows, (content - (end - start), len(rows) - 1))
    return Placement(rows, left_out, truncated)


def trained_runs(trained: np.ndarray) -> list[tuple[int, int]]:
    """The ``(start, end)`` runs of consecutive labelled tokens: in a chat, one per assistant answer."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], trained.astype(np.int8), [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def answers_without_prompt(documents: Sequence[Encoded], placement: Placement) -> tuple[int, int]:
    """``(answers, cut)``: how many answers (runs of labelled tokens, ``trained_runs``) the chats among
    ``documents`` hold, and of those how many train tokens in a sequence other than the one that holds the chat's
    first token, where the model sees the answer without (all of) its prompt."""
    segments: dict[int, list[tuple[int, int, int]]] = {}
    for r, row in enumerate(placement.rows):
        for i, start, end in row:
            if documents[i].chat:
                segments.setdefault(i, []).append((r, start, end))
    answers = sum(len(trained_runs(d.trained)) for d in documents if d.chat)
    cut = 0
    for i, pieces in segments.items():
        first_row = pieces[0][0]
        for a, b in trained_runs(documents[i].trained):
            cut += any(r != first_row and start < b and a < end for r, start, end in pieces)
    return answers, cut


def pack(
    documents: list[Encoded],
    control_classes: Sequence[int],
    sequence_len: int,
    prefix: Sequence[int],
    drop_tails: bool,
    whole_chats: bool = False,
    pad_id: int = 0,
) -> Packed:
    """Packs documents into sequences of ``sequence_len`` tokens, each opening with ``prefix``.

    Each sequence is ``prefix + content``, content being ``sequence_len - len(prefix)`` tokens. Text documents
    (and chats unless ``whole_chats``) form one stream: without ``drop_tails`` it runs on across sequences and only
    the final partial sequence is dropped; with it, a document that does not fit into the rest of a sequence fills
    it and its tail is dropped, so every sequence starts with a fresh document. With ``whole_chats`` chats are never
    cut: each goes whole into one sequence (best fit, ``place_whole``), the room left is padded with ``pad_id``, and
    a chat longer than a sequence keeps its first tokens in a sequence of its own (its tail is dropped, counted in
    ``truncated_chats``). A document that opens a sequence and starts with the prefix's tokens (a chat template's
    own BOS) leaves them out there: the prefix puts them back; anywhere else it keeps them.

    Labels are the token ids where the token is trained and -100 elsewhere (prefix, padding, masked and untrained
    chat tokens), and control classes are the document's class there and 0 elsewhere.

    Args:
        documents: Tokenised documents, in order.
        control_classes: Control class of each document.
        sequence_len: Tokens per sequence.
        prefix: Token ids opening every sequence (e.g. [BOS]).
        drop_tails: Start every sequence of the stream with a fresh document.
        whole_chats: Put every chat whole into one sequence.
        pad_id: The token id of padding.
    """
    content = sequence_len - len(prefix)
    if content <= 0:
        raise ValueError(f"the sequence prefix ({len(prefix)} tokens) leaves no room in sequence_len={sequence_len}")
    streamed = [i for i, d in enumerate(documents) if not (whole_chats and d.chat)]
    whole = [i for i, d in enumerate(documents) if whole_chats and d.chat]
    place_stream = place_drop_tails if drop_tails else place_concatenated
    stream, chats = place_stream(documents, streamed, content, prefix), place_whole(documents, whole, content, prefix)
    placement = Placement(stream.rows + chats.rows, stream.left_out + chats.left_out, chats.truncated_chats)
    answers, cut = answers_without_prompt(documents, placement)
    if whole:  # what packing the chats like text would have cut, for the data report
        as_text = answers_without_prompt(documents, place_stream(documents, range(len(documents)), content, prefix))[1]
    else:
        as_text = cut

    ids = np.full((len(placement.rows), content), pad_id, dtype=np.int64)
    trained = np.zeros((len(placement.rows), content), dtype=bool)
    classes = np.zeros((len(placement.rows), content), dtype=np.int64)
    for r, row in enumerate(placement.rows):
        position = 0
        for i, start, end in row:
            doc, n = documents[i], end - start
            ids[r, position : position + n] = doc.ids[start:end]
            trained[r, position : position + n] = doc.trained[start:end]
            classes[r, position : position + n] = control_classes[i]
            position += n
    placed = sum(end - start for row in placement.rows for _, start, end in row)
    left_out = sum(placement.left_out)
    rows = len(placement.rows)
    return Packed(
        input_ids=np.concatenate([np.broadcast_to(np.asarray(prefix, dtype=np.int64), (rows, len(prefix))), ids], 1),
        labels=np.concatenate(
            [np.full((rows, len(prefix)), IGNORE_INDEX, np.int64), np.where(trained, ids, IGNORE_INDEX)], 1
        ),
        control_classes=np.concatenate([np.zeros((rows, len(prefix)), np.int64), np.where(trained, classes, 0)], 1),
        dropped_tokens=int(sum(len(d.ids) for d in documents) - placed - left_out),
        packed_sequences=rows,
        padding_tokens=int(ids.size - placed),
        chats=sum(d.chat for d in documents),
        truncated_chats=placement.truncated_chats,
        answers=answers,
        answers_without_prompt=cut,
        answers_without_prompt_as_text=as_text,
    )
