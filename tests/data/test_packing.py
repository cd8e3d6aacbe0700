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


def reference_pack(docs, trained, classes, prefix, sequence_len, drop_tails) -> tuple[list[Row], int]:
    """Token-by-token packing written independently of ``pack``: fill a sequence, start the next one; a document
    that opens a sequence with the prefix's tokens leaves them out there (the prefix stands for them). Returns the
    rows and how many tokens the kept rows left to the prefix."""
    content = sequence_len - len(prefix)
    skip = [len(prefix) if prefix and doc[: len(prefix)] == prefix else 0 for doc in docs]
    if drop_tails:
        chunks, current, skipped = [], [], 0
        for doc, tr, c, s in zip(docs, trained, classes, skip):
            s = s if not current else 0  # the document opens the sequence
            current += [(t, m, c) for t, m in zip(doc[s:], tr[s:])]
            skipped += s
            if len(current) >= content:  # this document fills the sequence; its tail is dropped
                chunks.append((current[:content], skipped))
                current, skipped = [], 0
    else:
        tokens, skipped_at = [], {}
        for doc, tr, c, s in zip(docs, trained, classes, skip):
            s = s if len(tokens) % content == 0 else 0
            skipped_at[len(tokens) // content] = skipped_at.get(len(tokens) // content, 0) + s
            tokens += [(t, m, c) for t, m in zip(doc[s:], tr[s:])]
        starts = range(0, len(tokens) - content + 1, content)
        chunks = [(tokens[i : i + content], skipped_at.get(i // content, 0)) for i in starts]
    return [
        (
            tuple(prefix) + tuple(t for t, _, _ in chunk),
            (IGNORE_INDEX,) * len(prefix) + tuple(t if m else IGNORE_INDEX for t, m, _ in chunk),
            (0,) * len(prefix) + tuple(c if m else 0 for _, m, c in chunk),
        )
        for chunk, _ in chunks
    ], sum(n for _, n in chunks)


@pytest.mark.parametrize("drop_tails", [False, True])
def test_pack_against_reference(drop_tails):
    rng = random.Random(int(drop_tails))
    for _ in range(300):
        n = rng.randint(0, 8)
        docs = [[rng.randrange(1000) for _ in range(rng.choice([0, 1, 3, 7, 15, 30, 40]))] for _ in range(n)]
        prefix = [rng.randrange(1000) for _ in range(rng.randint(0, 2))]
        for doc in docs:  # some open with the prefix's tokens (as a template's BOS does), some with part of them
            if rng.random() < 0.4:
                doc[: len(prefix)] = prefix[: rng.choice([len(prefix), 1])]
        trained = [[rng.random() < 0.7 for _ in d] for d in docs]
        classes = [rng.choice([-1, 0, 1]) for _ in docs]
        sequence_len = rng.randint(len(prefix) + 1, 20)
        encoded = [Encoded(np.asarray(d, dtype=np.int64), np.asarray(t, dtype=bool)) for d, t in zip(docs, trained)]
        packed = pack(encoded, classes, sequence_len, prefix, drop_tails)
        expected, left_out = reference_pack(docs, trained, classes, prefix, sequence_len, drop_tails)
        got = [
            (tuple(i), tuple(lab), tuple(c))
            for i, lab, c in zip(packed.input_ids.tolist(), packed.labels.tolist(), packed.control_classes.tolist())
        ]
        assert got == expected, (docs, classes, sequence_len, prefix)
        assert packed.input_ids.shape == (len(expected), sequence_len)
        kept = sum(len(r[0]) - len(prefix) for r in expected)
        assert packed.dropped_tokens == sum(map(len, docs)) - kept - left_out
        assert packed.padding_tokens == 0 and packed.chats == packed.answers == packed.answers_without_prompt == 0


def random_chats(rng: random.Random, prefix: list[int], n: int) -> tuple[list[list[int]], list[list[bool]]]:
    """``n`` chats of distinct tokens (chat k: ids 1000 (k + 1) + j), about half opening with the prefix's tokens
    as a template's BOS does; trained in a few runs (the answers)."""
    docs, trained = [], []
    for k in range(n):
        length = rng.choice([1, 3, 6, 10, 17, 25])
        doc = [1000 * (k + 1) + j for j in range(length)]
        if prefix and rng.random() < 0.5:
            doc = prefix + doc
        docs.append(doc)
        trained.append([rng.random() < 0.5 for _ in doc])
    return docs, trained


def answer_runs(trained: list[bool]) -> list[list[int]]:
    """The positions of each run of consecutive trained tokens."""
    runs, previous = [], False
    for j, t in enumerate(trained):
        if t and not previous:
            runs.append([])
        if t:
            runs[-1].append(j)
        previous = t
    return runs


@pytest.mark.parametrize("drop_tails", [False, True])
def test_whole_chats_are_never_cut(drop_tails):
    """Chats go whole into one sequence each (the one opening it without the prefix's tokens), padded; a chat
    longer than a sequence keeps its head alone; text documents are packed as before; any-fit: a chat opened a new
    sequence only where it fitted into no earlier one."""
    rng = random.Random(7 + drop_tails)
    for _ in range(300):
        prefix = [rng.randrange(1, 900) for _ in range(rng.randint(0, 2))]
        chats, chat_trained = random_chats(rng, prefix, rng.randint(0, 12))
        texts = [[rng.randrange(1, 900) for _ in range(rng.choice([1, 5, 12]))] for _ in range(rng.randint(0, 4))]
        sequence_len = rng.randint(len(prefix) + 1, 24)
        content = sequence_len - len(prefix)
        order = rng.sample(range(len(chats) + len(texts)), len(chats) + len(texts))
        docs = [
            Encoded(np.asarray(chats[i], np.int64), np.asarray(chat_trained[i]), chat=True)
            if i < len(chats)
            else Encoded(np.asarray(texts[i - len(chats)], np.int64), np.ones(len(texts[i - len(chats)]), bool))
            for i in order
        ]
        classes = [rng.choice([-1, 1]) for _ in docs]
        packed = pack(docs, classes, sequence_len, prefix, drop_tails, whole_chats=True, pad_id=-1)
        text_order = [i - len(chats) for i in order if i >= len(chats)]
        text_rows, text_left_out = reference_pack(
            [texts[i] for i in text_order],
            [[True] * len(texts[i]) for i in text_order],
            [c for i, c in zip(order, classes) if i >= len(chats)],
            prefix,
            sequence_len,
            drop_tails,
        )
        rows = list(zip(packed.input_ids.tolist(), packed.labels.tolist(), packed.control_classes.tolist()))
        assert [tuple(map(tuple, r)) for r in rows[: len(text_rows)]] == text_rows
        chat_class = {i: c for i, c in zip(order, classes) if i < len(chats)}
        seen, used, truncated, dropped, padding = [], [], 0, 0, 0
        for ids, labels, cls in rows[len(text_rows) :]:
            assert ids[: len(prefix)] == prefix and labels[: len(prefix)] == [-100] * len(prefix)
            position, opening, first_length = len(prefix), True, None
            while position < sequence_len and ids[position] != -1:
                k = next(t for t in ids[position:] if t not in prefix) // 1000 - 1  # the chat's own tokens say which
                skip = len(prefix) if opening and chats[k][: len(prefix)] == prefix and prefix else 0
                expected = chats[k][skip:][: sequence_len - position]
                assert ids[position : position + len(expected)] == expected
                if len(expected) < len(chats[k]) - skip:  # cut: only a chat longer than a sequence, alone in it
                    assert opening and len(chats[k]) - skip > content
                    truncated += 1
                    dropped += len(chats[k]) - skip - len(expected)
                for j, token in enumerate(expected):
                    t = chat_trained[k][skip + j]
                    assert labels[position + j] == (token if t else -100)
                    assert cls[position + j] == (chat_class[k] if t else 0)
                first_length = len(chats[k]) if first_length is None else first_length
                seen.append(k)
                position += len(expected)
                opening = False
            assert all(t == -1 for t in ids[position:]) and all(x == -100 for x in labels[position:])
            padding += sequence_len - position
            used.append((position - len(prefix), first_length))
        assert sorted(seen) == list(range(len(chats)))  # every chat once
        for a in range(len(used)):  # the chat that opened a later sequence fitted into no earlier one
            for b in range(a + 1, len(used)):
                assert used[a][0] + used[b][1] > content
        text_kept = sum(len(r[0]) - len(prefix) for r in text_rows)
        assert packed.dropped_tokens == dropped + sum(map(len, texts)) - text_kept - text_left_out
        assert (packed.padding_tokens, packed.truncated_chats, packed.chats) == (padding, truncated, len(chats))
        assert packed.answers == sum(len(answer_runs(t)) for t in chat_trained)
        assert packed.answers_without_prompt == 0


def reference_answers_without_prompt(docs, trained, is_chat, prefix, sequence_len) -> int:
    """Chats concatenated token by token (a sequence-opening chat leaving the prefix's tokens out): the answers with
    a trained token in a kept sequence other than the one holding the chat's first placed token."""
    content = sequence_len - len(prefix)
    where = []  # (document, position in it) of each stream token
    for d, doc in enumerate(docs):
        skip = len(prefix) if prefix and doc[: len(prefix)] == prefix and len(where) % content == 0 else 0
        where += [(d, j) for j in range(skip, len(doc))]
    kept = len(where) // content * content
    sequence_of = {token: n // content for n, token in enumerate(where[:kept])}
    first = {}
    for n, (d, _) in enumerate(where[:kept]):
        first.setdefault(d, n // content)
    cut = 0
    for d in range(len(docs)):
        if is_chat[d]:
            runs = answer_runs(trained[d])
            cut += sum(any(sequence_of.get((d, j), first.get(d)) != first.get(d) for j in run) for run in runs)
    return cut


def test_answers_without_prompt_are_counted():
    rng = random.Random(3)
    for _ in range(300):
        prefix = [rng.randrange(1, 900) for _ in range(rng.randint(0, 1))]
        docs, trained = random_chats(rng, prefix, rng.randint(0, 10))
        is_chat = [rng.random() < 0.8 for _ in docs]
        sequence_len = rng.randint(len(prefix) + 1, 30)
        encoded = [Encoded(np.asarray(d, np.int64), np.asarray(t), c) for d, t, c in zip(docs, trained, is_chat)]
        expected = reference_answers_without_prompt(docs, trained, is_chat, prefix, sequence_len)
        as_text = pack(encoded, [0] * len(docs), sequence_len, prefix, drop_tails=False)
        whole = pack(encoded, [0] * len(docs), sequence_len, prefix, drop_tails=False, whole_chats=True)
        answers = sum(len(answer_runs(t)) for t, c in zip(trained, is_chat) if c)
        assert (as_text.answers, as_text.answers_without_prompt) == (answers, expected)
        assert as_text.answers_without_prompt_as_text == expected
        assert (whole.answers, whole.answers_without_prompt, whole.answers_without_prompt_as_text) == (
            answers,
            0,
            expected,
        )


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
