"""Token layouts of the options (prefixes, suffix, masks, control classes, drop_tails, mixing, caps, splits),
written by hand from the tiny WordLevel vocabulary (see tests/data/helpers.py)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lit_qlp.data.sources import DatasetSource
from lit_qlp.data.tokenize import Encoded
from lit_qlp.kernels.fused_loss import IGNORE_INDEX
from tests.data.helpers import (
    BOS,
    CONTENT,
    DOC,
    DOC_IDS,
    EOS,
    LEN,
    PAD,
    UNK,
    W,
    build,
    jsonl_source,
    one_row_documents,
    row,
    rows,
    stream_rows,
    texts,
    write_jsonl,
)

# ----------------------------------------------------------------------------------------------------- token layouts


@pytest.mark.parametrize(
    "sequence_prefix, prefix",
    [(None, [BOS]), ("", []), ("w60 w61", [W(60), W(61)]), (7, [7]), ([7, 8], [7, 8])],
)
def test_sequence_prefix(tmp_path, tiny_tok, sequence_prefix, prefix):
    train, evaluation, stats = build(
        tmp_path, tiny_tok, [texts(tmp_path / "d.jsonl", DOC, 16)], sequence_prefix=sequence_prefix
    )
    content = LEN - len(prefix)
    assert rows(train) == [row(prefix, (DOC_IDS * 16)[:content])]  # 64 document tokens: one sequence
    assert len(evaluation.input_ids) == 0
    assert stats[0] | {"dataset": None} == {
        "dataset": None,
        "documents": 16,
        "tokens": 64,
        "trained_tokens": 64,
        "dropped_tokens": 64 - content,
        "sequences": 1,
    }


def test_sequence_prefix_default_without_bos(tmp_path, tiny_tok):
    tokenizer = tmp_path / "tokenizer"
    shutil.copytree(tiny_tok, tokenizer)
    config = json.loads((tokenizer / "tokenizer_config.json").read_text())
    del config["bos_token"]
    (tokenizer / "tokenizer_config.json").write_text(json.dumps(config))
    train, _, _ = build(tmp_path, tokenizer, [texts(tmp_path / "d.jsonl", DOC, 16)])
    assert rows(train) == [row([], DOC_IDS * 16)]


@pytest.mark.parametrize(
    "document_prefix, doc",
    [
        (None, DOC_IDS),
        ("w50 ", [W(50), *DOC_IDS]),
        ("w50", [UNK, W(2), W(3), EOS]),  # prepended to the text, then tokenised: "w50w1" is one unknown word
        (50, [50, *DOC_IDS]),
        ([50, 51], [50, 51, *DOC_IDS]),
    ],
)
def test_document_prefix(tmp_path, tiny_tok, document_prefix, doc):
    train, _, _ = build(tmp_path, tiny_tok, [texts(tmp_path / "d.jsonl", DOC, 30)], document_prefix=document_prefix)
    assert rows(train) == stream_rows([BOS], doc * 30)


@pytest.mark.parametrize(
    "document_suffix, text, doc",
    [
        (None, DOC, DOC_IDS),
        (None, "w1 w2 w3 </s>", DOC_IDS),  # already ends with EOS: not doubled
        (None, "w1 w2 w3</s>", DOC_IDS),
        (None, "</s> w1", [EOS, W(1), EOS]),  # an EOS elsewhere does not count
        (None, "", [EOS]),
        ("", DOC, DOC_IDS[:-1]),
        ("", "w1 w2 w3 </s>", DOC_IDS),
        (" w9", DOC, [W(1), W(2), W(3), W(9)]),
        ("w9", DOC, [W(1), W(2), UNK]),  # appended to the text, then tokenised: "w3w9" is one unknown word
        (13, DOC, [W(1), W(2), W(3), 13]),
        ([13, EOS], DOC, [W(1), W(2), W(3), 13, EOS]),
    ],
)
def test_document_suffix(tmp_path, tiny_tok, document_suffix, text, doc):
    train, _, _ = build(tmp_path, tiny_tok, [texts(tmp_path / "d.jsonl", text, 70)], document_suffix=document_suffix)
    assert rows(train) == stream_rows([BOS], doc * 70)


MASK_DOC = "w1 <s> w2 w99 <pad>"  # w99 is outside the vocabulary: <unk>
MASK_IDS = [W(1), BOS, W(2), UNK, PAD, EOS]


@pytest.mark.parametrize(
    "mask_tokens, trained",
    [
        (None, [True] * 6),
        (False, [True] * 6),
        (True, [True, False, True, False, False, False]),  # every special token: <s>, <unk>, <pad>, </s>
        (W(2), [True, True, False, True, True, True]),
        (PAD, [True, True, True, True, False, True]),  # id 0 is an id, not False
        ([W(1), EOS], [False, True, True, True, True, False]),
    ],
)
def test_mask_tokens(tmp_path, tiny_tok, mask_tokens, trained):
    source = texts(tmp_path / "d.jsonl", MASK_DOC, 12, control_class=1)
    train, _, stats = build(tmp_path, tiny_tok, [source], mask_tokens=mask_tokens)
    assert rows(train) == stream_rows([BOS], MASK_IDS * 12, trained * 12, cls=1)  # masked: -100 and class 0
    assert stats[0]["tokens"] == 72 and stats[0]["trained_tokens"] == 12 * sum(trained)


@pytest.mark.parametrize("control_class", [-1, 0, 1])
def test_control_class(tmp_path, tiny_tok, control_class):
    import hashlib

    source = texts(tmp_path / "d.jsonl", DOC, 16, control_class=control_class)
    train, _, _ = build(tmp_path, tiny_tok, [source], mask_tokens=EOS, split_class_zero=True)
    ids = (DOC_IDS * 16)[:CONTENT]
    if control_class == 0:  # class 0: the sign from a hash of the document's tokens (identical documents here)
        digest = hashlib.blake2b(np.asarray(DOC_IDS, dtype=np.int64).tobytes(), digest_size=8).digest()
        control_class = 1 if digest[0] & 1 else -1
    expected = row([BOS], ids, [t != EOS for t in ids], control_class)
    assert rows(train) == [expected]
    assert expected[2][:5] == (0, control_class, control_class, control_class, 0)  # BOS, w1 w2 w3, masked EOS


def test_class_zero_documents_get_both_signs_about_half_each_deterministically():
    from lit_qlp.data.build import document_classes

    rng = np.random.default_rng(0)
    documents = [Encoded(rng.integers(0, 1000, 20), np.ones(20, bool)) for _ in range(400)]
    classes = document_classes(documents, 0)
    assert set(classes) == {-1, 1} and 160 < classes.count(1) < 240
    assert document_classes(documents[::-1], 0) == classes[::-1]  # a document's sign is its own
    assert document_classes(documents, -1) == [-1] * 400


def test_drop_tails_short_documents(tmp_path, tiny_tok):
    doc = [W(i) for i in range(1, 10)] + [EOS]  # 10 tokens
    source = texts(tmp_path / "d.jsonl", " ".join(f"w{i}" for i in range(1, 10)), 14)
    train, _, stats = build(tmp_path, tiny_tok, [source], drop_tails=False)
    stream = doc * 14
    assert rows(train) == sorted([row([BOS], stream[:63]), row([BOS], stream[63:126])])
    assert stats[0]["dropped_tokens"] == 14
    # With drop_tails every sequence opens with a document: the seventh fills the first one, its tail is lost.
    train, _, stats = build(tmp_path, tiny_tok, [source], drop_tails=True)
    assert rows(train) == [row([BOS], (doc * 7)[:63])] * 2
    assert stats[0]["dropped_tokens"] == 2 * 7


def test_drop_tails_document_longer_than_a_sequence(tmp_path, tiny_tok):
    words = [i % 92 for i in range(100)]
    doc = [W(i) for i in words] + [EOS]  # 101 tokens
    source = texts(tmp_path / "d.jsonl", " ".join(f"w{i}" for i in words), 2)
    train, _, stats = build(tmp_path, tiny_tok, [source], drop_tails=False)
    stream = doc * 2
    assert rows(train) == sorted(row([BOS], stream[s : s + 63]) for s in (0, 63, 126))
    assert stats[0]["dropped_tokens"] == 202 - 189
    train, _, stats = build(tmp_path, tiny_tok, [source], drop_tails=True)
    assert rows(train) == [row([BOS], doc[:63])] * 2
    assert stats[0]["dropped_tokens"] == 202 - 126


def test_drop_tails_every_sequence_starts_a_document(tmp_path, tiny_tok):
    """Distinct documents (marker word w{k}, then k % 23 filler words): each sequence is whole documents from one
    document's start, the last one cut; no document is used twice."""
    docs = {W(k): [W(k)] + [W(90)] * (k % 23) + [EOS] for k in range(40)}
    records = [{"text": " ".join([f"w{k}"] + ["w90"] * (k % 23))} for k in range(40)]
    source = jsonl_source(tmp_path / "d.jsonl", records)
    train, _, stats = build(tmp_path, tiny_tok, [source], drop_tails=True)
    used = []
    for ids, labels, classes in rows(train):
        assert ids[0] == BOS and labels == (IGNORE_INDEX, *ids[1:]) and set(classes) == {0}
        position = 1
        while position < LEN:
            doc = docs[ids[position]]  # a KeyError here means the position is not a document's start
            used.append(ids[position])
            assert list(ids[position : position + len(doc)]) == doc[: LEN - position]
            position += len(doc)
    assert len(used) == len(set(used))
    assert len(train.input_ids) * CONTENT + stats[0]["dropped_tokens"] == sum(map(len, docs.values()))


def test_mix_datasets(tmp_path, tiny_tok):
    a = texts(tmp_path / "a.jsonl", "w1 w1 w1", 30, control_class=1)  # 4 tokens each: 120
    b = texts(tmp_path / "b.jsonl", "w2 w2", 30, control_class=-1)  # 3 tokens each: 90
    train, _, stats = build(tmp_path, tiny_tok, [a, b], mix_datasets=False)
    stream_a, stream_b = [W(1), W(1), W(1), EOS] * 30, [W(2), W(2), EOS] * 30
    assert rows(train) == sorted([row([BOS], stream_a[:63], cls=1), row([BOS], stream_b[:63], cls=-1)])
    assert [s["sequences"] for s in stats] == [1, 1] and [s["dropped_tokens"] for s in stats] == [57, 27]

    train, _, stats = build(tmp_path, tiny_tok, [a, b], mix_datasets=True)
    assert len(train.input_ids) == 210 // 63 and all("sequences" not in s for s in stats)
    mixed = 0
    for ids, labels, classes in rows(train):
        assert ids[0] == BOS and labels == (IGNORE_INDEX, *ids[1:]) and classes[0] == 0
        owner = {W(1): 1, W(2): -1}
        for i in range(1, LEN):
            if ids[i] in owner:
                assert classes[i] == owner[ids[i]]
            else:  # an EOS ends the document of the token before it
                assert ids[i] == EOS and (i == 1 or classes[i] == owner[ids[i - 1]])
        mixed += {1, -1} <= set(classes)
    assert mixed > 0  # some sequence holds documents of both datasets


def test_max_tokens_cuts_before_packing(tmp_path, tiny_tok):
    source = texts(tmp_path / "d.jsonl", DOC, 40, max_tokens=130)  # 160 tokens, cut to 130 in document 33
    train, _, stats = build(tmp_path, tiny_tok, [source])
    stream = (DOC_IDS * 40)[:130]
    assert rows(train) == sorted([row([BOS], stream[:63]), row([BOS], stream[63:126])])
    assert stats[0] | {"dataset": None} == {
        "dataset": None,
        "documents": 33,
        "tokens": 130,
        "trained_tokens": 130,
        "dropped_tokens": 30 + 4,  # cut by max_tokens, then the partial last sequence
        "sequences": 2,
    }


def test_max_tokens_cuts_after_shuffling(tmp_path, tiny_tok):
    records = [{"text": f"w{k} w{k} w{k}"} for k in range(60)]  # document k: [w_k w_k w_k </s>]
    source = jsonl_source(tmp_path / "d.jsonl", records, max_tokens=64)
    train, _, stats = build(tmp_path, tiny_tok, [source])
    assert stats[0]["documents"] == 16 and stats[0]["tokens"] == 64
    [(ids, _, _)] = rows(train)
    kept = [ids[i] - 4 for i in range(1, LEN, 4)]
    for n, k in enumerate(kept):
        assert list(ids[1 + 4 * n : 5 + 4 * n]) == [W(k)] * 3 + [EOS] * (n < 15)
    assert len(set(kept)) == 16 and kept != list(range(16))  # not the first documents of the file


def test_max_tokens_per_dataset(tmp_path, tiny_tok):
    a = texts(tmp_path / "a.jsonl", "w1 w1 w1", 50, max_tokens=63)
    b = texts(tmp_path / "b.jsonl", "w2 w2", 50)
    train, _, stats = build(tmp_path, tiny_tok, [a, b])
    assert [s["tokens"] for s in stats] == [63, 150]
    stream_b = [W(2), W(2), EOS] * 50
    expected = [row([BOS], ([W(1), W(1), W(1), EOS] * 16)[:63])] + stream_rows([BOS], stream_b)
    assert rows(train) == sorted(expected)


@pytest.mark.parametrize(
    "eval_fraction, max_sequences, n_train, n_eval",
    [
        (0.0, None, 20, 0),
        (0.25, None, 15, 5),
        (0.3, None, 14, 6),
        (0.01, None, 19, 1),  # at least one evaluation sequence
        (0.0, 7, 7, 0),
        (0.25, 8, 6, 2),
        (0.5, 1, 1, 0),  # one sequence: nothing can be held out
    ],
)
def test_eval_fraction_and_max_sequences(tmp_path, tiny_tok, eval_fraction, max_sequences, n_train, n_eval):
    source, all_rows = one_row_documents(tmp_path, 20)
    train, evaluation, _ = build(
        tmp_path, tiny_tok, [source], drop_tails=True, eval_fraction=eval_fraction, max_sequences=max_sequences
    )
    train_rows, eval_rows = rows(train), rows(evaluation)
    assert (len(train_rows), len(eval_rows)) == (n_train, n_eval)
    assert len(set(train_rows + eval_rows)) == n_train + n_eval  # disjoint, no duplicates
    assert set(train_rows + eval_rows) <= set(all_rows)
    if max_sequences is None:
        assert sorted(train_rows + eval_rows) == all_rows


def test_formats_give_the_same_sequences(tmp_path, tiny_tok):
    first = [k % 92 for k in range(62)]
    second = [(k * 7) % 92 for k in range(62)]
    text_a = " ".join(f"w{k}" for k in first[:30]) + "\n" + " ".join(f"w{k}" for k in first[30:]) + "\n"
    text_b = " ".join(f"w{k}" for k in second)
    expected = sorted([row([BOS], [W(k) for k in first] + [EOS]), row([BOS], [W(k) for k in second] + [EOS])])
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "a.txt").write_text(text_a, encoding="utf-8")
    (tmp_path / "txt" / "b.txt").write_text(text_b, encoding="utf-8")
    (tmp_path / "d.json").write_text(json.dumps([{"text": text_a}, {"text": text_b}]), encoding="utf-8")
    write_jsonl(tmp_path / "d.jsonl", [{"text": text_a}, {"text": text_b}])
    pq.write_table(pa.table({"text": [text_a, text_b]}), tmp_path / "d.parquet")
    for pattern in ["txt/*.txt", "d.json", "d.jsonl", "d.parquet"]:
        train, _, _ = build(tmp_path, tiny_tok, [DatasetSource(str(tmp_path / pattern))], drop_tails=True)
        assert rows(train) == expected, pattern
