"""Tokenised documents to fixed-length sequences."""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

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
        position_ids: Position of each token within its document (``pack_documents``), or None where positions
            run 0 to ``sequence_len - 1`` in every sequence.
        documents: Documents packed on their own (``pack_documents``).
        split_documents: Documents longer than a sequence cut into pieces (``pack_documents``).
        dropped_documents: Documents longer than a sequence left out (``pack_documents``).
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
    position_ids: np.ndarray | None = None
    documents: int = 0
    split_documents: int = 0
    dropped_documents: int = 0

    COUNTS = (
        "dropped_tokens",
        "packed_sequences",
        "padding_tokens",
        "chats",
        "truncated_chats",
        "answers",
        "answers_without_prompt",
        "answers_without_prompt_as_text",
        "documents",
        "split_documents",
        "dropped_documents",
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
            position_ids=None if parts[0].position_ids is None else np.concatenate([p.position_ids for p in parts]),
            **{name: sum(getattr(p, name) for p in parts) for name in cls.COUNTS},
        )

    def take(self, rows: np.ndarray) -> Packed:
        counts = {name: getattr(self, name) for name in self.COUNTS}
        positions = None if self.position_ids is None else self.position_ids[rows]
        return Packed(
            self.input_ids[rows], self.labels[rows], self.control_classes[rows], **counts, position_ids=positions
        )


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


def best_fit(lengths: Sequence[int], capacity: int, opening: Sequence[int] | None = None) -> list[list[int]]:
    """Best-fit bin packing in the given order: item ``k`` goes into the open bin with the least room that holds
    ``lengths[k]``, or opens a new bin, where it takes ``opening[k]`` (default ``lengths[k]``; at most
    ``capacity``). Returns the items of each bin, in placement order."""
    bins: list[list[int]] = []
    open_bins: list[tuple[int, int]] = []  # (room left, bin), sorted: the first with enough room fits best
    for k, length in enumerate(lengths):
        i = bisect.bisect_left(open_bins, (length, -1))
        if i < len(open_bins):
            room, b = open_bins.pop(i)
            bins[b].append(k)
        else:
            room, b, length = capacity, len(bins), length if opening is None else opening[k]
            bins.append([k])
        if room > length:
            bisect.insort(open_bins, (room - length, b))
    return bins


def place_whole(documents: Sequence[Encoded], indices: Sequence[int], content: int, prefix: Sequence[int]):
    """Best fit (``best_fit``): each document goes whole into the open sequence with the least room that holds it,
    or opens a new one; what room is left at the end is padding. A document longer than a sequence gets one of its
    own and keeps its first ``content`` tokens.

    The document opening a sequence leaves out the leading tokens the prefix puts back
    (``prefix_length_to_drop``); one placed after another keeps them.
    """
    lengths = [len(documents[i].ids) for i in indices]
    starts = [prefix_length_to_drop(documents[i], prefix) for i in indices]
    opening = [min(n - start, content) for n, start in zip(lengths, starts)]
    rows: list[list[Segment]] = []
    left_out: list[int] = []
    truncated = 0
    for first, *rest in best_fit(lengths, content, opening):
        end = starts[first] + opening[first]
        truncated += end < lengths[first]
        rows.append([(indices[first], starts[first], end)] + [(indices[k], 0, lengths[k]) for k in rest])
        left_out.append(starts[first])
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


def document_pieces(
    documents: Sequence[Encoded], indices: Sequence[int], content: int, prefix: Sequence[int], split: bool
) -> tuple[list[Segment], list[int]]:
    """The pieces that ``pack_documents`` places: each document's tokens after those the prefix puts back
    (``prefix_length_to_drop``), whole when they fit into ``content`` tokens; a longer document is cut into
    consecutive pieces of ``content`` tokens (the last one shorter) with ``split``, else left out.

    Returns the pieces and the indices of the documents left out.
    """
    pieces: list[Segment] = []
    left_out: list[int] = []
    for i in indices:
        start, end = prefix_length_to_drop(documents[i], prefix), len(documents[i].ids)
        if end - start > content and not split:
            left_out.append(i)
            continue
        pieces += [(i, s, min(s + content, end)) for s in range(start, end, content)]
    return pieces, left_out


def pack_documents(
    documents: list[Encoded],
    control_classes: Sequence[int],
    sequence_len: int,
    prefix: Sequence[int],
    long_documents: Literal["split", "drop"] = "split",
    pad_id: int = 0,
) -> Packed:
    """Packs every document whole and on its own into sequences of ``sequence_len`` tokens: ``data.packing:
    documents``.

    Each document becomes ``prefix + tokens`` (leaving out its own leading prefix tokens, as ``prefix_length_to_drop``),
    exactly what the model sees of it served alone; these pieces go into sequences by best fit (``best_fit``) and
    the room left is padding (``pad_id``, no labels). Position ids restart at 0 with each piece and again for the
    padding, which is how the model's attention tells the documents apart (a restart is a boundary). The first
    token of a piece is never a target of the token before it: the prefix carries no labels, and with no prefix the
    piece's first token gets none. A document longer than ``sequence_len - len(prefix)`` tokens is cut into pieces
    of that many tokens, each packed as a document of its own (``long_documents="split"``), or left out and counted
    (``"drop"``).

    Args:
        documents: Tokenised documents, in order.
        control_classes: Control class of each document.
        sequence_len: Tokens per sequence.
        prefix: Token ids opening every document (e.g. [BOS]).
        long_documents: "split" or "drop", for documents longer than a sequence.
        pad_id: The token id of padding.
    """
    content = sequence_len - len(prefix)
    if content <= 0:
        raise ValueError(f"the sequence prefix ({len(prefix)} tokens) leaves no room in sequence_len={sequence_len}")
    pieces, left_out = document_pieces(documents, range(len(documents)), content, prefix, long_documents == "split")
    rows = [[pieces[p] for p in row] for row in best_fit([len(prefix) + e - s for _, s, e in pieces], sequence_len)]
    shape = (len(rows), sequence_len)
    ids = np.full(shape, pad_id, dtype=np.int64)
    labels = np.full(shape, IGNORE_INDEX, dtype=np.int64)
    classes = np.zeros(shape, dtype=np.int64)
    positions = np.zeros(shape, dtype=np.int64)
    prefix_ids = np.asarray(prefix, dtype=np.int64)
    for r, row in enumerate(rows):
        at = 0
        for i, start, end in row:
            doc, n = documents[i], len(prefix) + end - start
            tokens = slice(at + len(prefix), at + n)
            ids[r, at : at + len(prefix)] = prefix_ids
            ids[r, tokens] = doc.ids[start:end]
            labels[r, tokens] = np.where(doc.trained[start:end], doc.ids[start:end], IGNORE_INDEX)
            labels[r, at] = IGNORE_INDEX  # the first token of a piece follows another document's last
            classes[r, tokens] = np.where(doc.trained[start:end], control_classes[i], 0)
            positions[r, at : at + n] = np.arange(n)
            at += n
        positions[r, at:] = np.arange(sequence_len - at)
    placement = Placement(rows, [0] * len(rows))
    answers, cut = answers_without_prompt(documents, placement)
    as_text = answers_without_prompt(documents, place_concatenated(documents, range(len(documents)), content, prefix))[
        1
    ]
    placed = sum(len(prefix) + end - start for row in rows for _, start, end in row)
    split = {i for i, s, _ in pieces if s > prefix_length_to_drop(documents[i], prefix)}
    return Packed(
        input_ids=ids,
        labels=labels,
        control_classes=classes,
        position_ids=positions,
        dropped_tokens=int(sum(len(documents[i].ids) for i in left_out)),
        packed_sequences=len(rows),
        padding_tokens=int(ids.size - placed),
        chats=sum(d.chat for d in documents),
        answers=answers,
        answers_without_prompt=cut,
        answers_without_prompt_as_text=as_text,
        documents=len(documents) - len(left_out),
        split_documents=len(split),
        dropped_documents=len(left_out),
    )
