"""The data pipeline: sources, tokenisation options, packing, the cached TextDataModule and resumable sampling.

Expected token layouts are written by hand from the tiny WordLevel vocabulary (``<pad>`` = 0, ``<s>`` = 1,
``</s>`` = 2, ``<unk>`` = 3, word ``w{i}`` = i + 4), never computed by the code under test. Datasets repeat one
document (or compare rows as sets) so that the seeded shuffles cannot change what is expected. Chats and
``add_prefix_space`` use the demo model's byte-level BPE tokenizer and chat template; their expectations come from
tokenising hand-rendered pieces of the template.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DistributedSampler

from lit_qlp.data import DatasetSource as ExportedDatasetSource
from lit_qlp.data import TextDataModule as ExportedTextDataModule
from lit_qlp.data.packing import IGNORE_INDEX, Packed, pack, truncate_tokens
from lit_qlp.data.sources import DatasetSource, read_documents
from lit_qlp.data.text import ResumableSampler, TextDataModule
from lit_qlp.data.tokenize import Encoded
from tests.tiny_models import make_tiny_tokenizer

PAD, BOS, EOS, UNK = 0, 1, 2, 3
DEMO_MODEL = Path(__file__).resolve().parents[1] / "demo" / "model"
LEN = 64  # sequence_len of every test here
CONTENT = LEN - 1  # tokens after the default [BOS] sequence prefix

Row = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]


def W(i: int) -> int:
    """Id of the tiny tokenizer's word ``w{i}``."""
    return i + 4


# ----------------------------------------------------------------------------------------------------- helpers


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


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def jsonl_source(path: Path, records: list, **kwargs) -> DatasetSource:
    return DatasetSource(str(write_jsonl(path, records)), **kwargs)


def texts(path: Path, text: str, copies: int, **kwargs) -> DatasetSource:
    """A JSONL dataset of ``copies`` identical text documents: any shuffle of it is the same stream."""
    return jsonl_source(path, [{"text": text}] * copies, **kwargs)


def make_module(tmp_path: Path, tokenizer_dir: Path, datasets: list, **options) -> TextDataModule:
    options = {"sequence_len": LEN, "eval_fraction": 0.0, "seed": 0, "cache_dir": tmp_path / "cache", **options}
    return TextDataModule(datasets=datasets, tokenizer_dir=tokenizer_dir, **options)


def build(tmp_path: Path, tokenizer_dir: Path, datasets: list, **options) -> tuple[Packed, Packed, list[dict]]:
    return make_module(tmp_path, tokenizer_dir, datasets, **options).build()


def rows(packed: Packed) -> list[Row]:
    """The packed sequences as sorted (input_ids, labels, control_classes) tuples: order-independent comparison."""
    assert packed.input_ids.dtype == packed.labels.dtype == packed.control_classes.dtype == np.int64
    assert packed.input_ids.shape == packed.labels.shape == packed.control_classes.shape
    assert packed.input_ids.shape[1:] == (LEN,)
    triples = zip(packed.input_ids.tolist(), packed.labels.tolist(), packed.control_classes.tolist())
    return sorted((tuple(i), tuple(lab), tuple(c)) for i, lab, c in triples)


def row(prefix: list[int], ids: list[int], trained: list[bool] | None = None, cls: int | list[int] = 0) -> Row:
    """Expected sequence: ``prefix`` (no label, class 0) then ``ids``; untrained tokens get -100 and class 0."""
    trained = [True] * len(ids) if trained is None else trained
    classes = [cls] * len(ids) if isinstance(cls, int) else cls
    assert len(prefix) + len(ids) == LEN and len(trained) == len(ids) == len(classes)
    return (
        tuple(prefix + ids),
        tuple([IGNORE_INDEX] * len(prefix) + [i if t else IGNORE_INDEX for i, t in zip(ids, trained)]),
        tuple([0] * len(prefix) + [c if t else 0 for c, t in zip(classes, trained)]),
    )


def stream_rows(prefix: list[int], stream: list[int], trained: list[bool] | None = None, cls: int = 0) -> list[Row]:
    """Expected rows of a hand-written token stream cut into consecutive sequences (only a partial tail is lost)."""
    trained = [True] * len(stream) if trained is None else trained
    content = LEN - len(prefix)
    starts = range(0, len(stream) - content + 1, content)
    return sorted(row(prefix, stream[s : s + content], trained[s : s + content], cls) for s in starts)


# ----------------------------------------------------------------------------------------------------- sources


def test_public_imports():
    assert ExportedDatasetSource is DatasetSource and ExportedTextDataModule is TextDataModule


def test_read_txt_is_one_document_per_file(tmp_path):
    text = 'first line\nsecond line\n\nafter a blank line {"text": 1}\n'
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    assert read_documents(DatasetSource(str(tmp_path / "a.txt"))) == [text]


def test_read_jsonl(tmp_path):
    documents = ["one", "two\nlines", "", "ünïcödé"]
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": t, "other": i} for i, t in enumerate(documents)])
    path.write_text(path.read_text(encoding="utf-8") + "\n   \n", encoding="utf-8")  # trailing blank lines
    assert read_documents(DatasetSource(str(path))) == documents


def test_read_json_list_and_single_object(tmp_path):
    (tmp_path / "l.json").write_text(json.dumps([{"text": "a"}, {"text": "b", "id": 2}]), encoding="utf-8")
    (tmp_path / "o.json").write_text(json.dumps({"text": "single"}), encoding="utf-8")
    assert read_documents(DatasetSource(str(tmp_path / "l.json"))) == ["a", "b"]
    assert read_documents(DatasetSource(str(tmp_path / "o.json"))) == ["single"]


def test_read_parquet(tmp_path):
    pq.write_table(pa.table({"text": ["a", "b c"], "id": [1, 2]}), tmp_path / "d.parquet")
    assert read_documents(DatasetSource(str(tmp_path / "d.parquet"))) == ["a", "b c"]


def test_read_chats_messages_and_sharegpt(tmp_path):
    messages = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": "a"},
    ]
    sharegpt = [{"from": "system", "value": "s"}, {"from": "human", "value": "u"}, {"from": "gpt", "value": "a"}]
    other = [{"from": "user", "value": "u"}, {"from": "assistant", "value": "a"}]
    path = write_jsonl(
        tmp_path / "c.jsonl", [{"messages": messages}, {"conversations": sharegpt}, {"conversations": other}]
    )
    assert read_documents(DatasetSource(str(path))) == [messages, messages, messages[1:]]


def test_read_glob_patterns(tmp_path):
    (tmp_path / "sub" / "deep").mkdir(parents=True)
    write_jsonl(tmp_path / "b.jsonl", [{"text": "b1"}, {"text": "b2"}])
    (tmp_path / "a.txt").write_text("a", encoding="utf-8")
    (tmp_path / "sub" / "c.txt").write_text("c", encoding="utf-8")
    (tmp_path / "sub" / "deep" / "d.txt").write_text("d", encoding="utf-8")
    assert read_documents(DatasetSource(str(tmp_path / "*.txt"))) == ["a"]
    assert read_documents(DatasetSource(str(tmp_path / "*.*"))) == ["a", "b1", "b2"]  # sorted file order
    assert sorted(read_documents(DatasetSource(str(tmp_path / "**" / "*.txt")))) == ["a", "c", "d"]


@pytest.mark.parametrize("bad_line", ['{"txt": "x"}', '{"text": 5}', "[1, 2]", '"s"'])
def test_read_jsonl_record_without_text(tmp_path, bad_line):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n' + bad_line + '\n{"text": "ok"}\n', encoding="utf-8")
    with pytest.raises(ValueError) as info:
        read_documents(DatasetSource(str(path)))
    assert f"{path}, line 2:" in str(info.value) and "'text'" in str(info.value)


def test_read_jsonl_line_number_counts_blank_lines(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n\n{"no": 1}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 3: "):
        read_documents(DatasetSource(str(path)))


def test_read_json_record_without_text(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"text": "ok"}, {"text": "ok"}, {"body": "x"}]), encoding="utf-8")
    with pytest.raises(ValueError) as info:
        read_documents(DatasetSource(str(path)))
    assert f"{path}, record 3:" in str(info.value) and "'text'" in str(info.value)


def test_read_parquet_row_without_text(tmp_path):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"body": ["x"]}), path)
    with pytest.raises(ValueError) as info:
        read_documents(DatasetSource(str(path)))
    assert f"{path}, row 1:" in str(info.value) and "'text'" in str(info.value)


def test_read_jsonl_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": "unterminated\n', encoding="utf-8")
    with pytest.raises(ValueError) as info:
        read_documents(DatasetSource(str(path)))
    assert f"{path}, line 3: invalid JSON" in str(info.value)


def test_read_json_malformed_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"text": "ok"},', encoding="utf-8")
    with pytest.raises(ValueError) as info:
        read_documents(DatasetSource(str(path)))
    assert f"{path}: invalid JSON" in str(info.value)


def test_read_unknown_suffix(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("text\nhello\n", encoding="utf-8")
    with pytest.raises(ValueError) as info:
        read_documents(DatasetSource(str(path)))
    assert str(path) in str(info.value) and "'.csv'" in str(info.value)
    # A glob that picks up an unsupported file reports that file.
    (tmp_path / "ok.txt").write_text("fine", encoding="utf-8")
    with pytest.raises(ValueError, match="data.csv"):
        read_documents(DatasetSource(str(tmp_path / "*")))


@pytest.mark.parametrize("name", ["missing.jsonl", "nothing-*.jsonl", "**/none.txt"])
def test_path_matching_nothing(tmp_path, tiny_tok, name):
    pattern = str(tmp_path / name)
    with pytest.raises(FileNotFoundError) as info:
        read_documents(DatasetSource(pattern))
    assert repr(pattern) in str(info.value) and "matches no file" in str(info.value)
    # The data module fails at construction, before anything is written.
    with pytest.raises(FileNotFoundError) as info:
        make_module(tmp_path, tiny_tok, [{"dataset_path": pattern}])
    assert f"data.datasets: dataset_path={pattern!r} matches no file" in str(info.value)
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("field, value", [("control_class", 2), ("control_class", -2), ("max_tokens", 0)])
def test_dataset_source_rejects_bad_values(tmp_path, field, value):
    with pytest.raises(ValueError) as info:
        DatasetSource("x.jsonl", **{field: value})
    assert "dataset_path='x.jsonl'" in str(info.value) and f"{field}={value}" in str(info.value)
    data = write_jsonl(tmp_path / "x.jsonl", [{"text": "w1"}])
    with pytest.raises(ValueError, match=f"{field}={value}"):
        TextDataModule(datasets=[{"dataset_path": str(data), field: value}], sequence_len=LEN)


def test_unknown_sharegpt_role(tmp_path, tiny_tok):
    turns = [{"from": "human", "value": "w1"}, {"from": "bot", "value": "w2"}]
    path = write_jsonl(
        tmp_path / "chat.jsonl", [{"conversations": [{"from": "gpt", "value": "w1"}]}, {"conversations": turns}]
    )
    with pytest.raises(ValueError) as info:
        build(tmp_path, tiny_tok, [DatasetSource(str(path))])
    assert f"{path}, line 2: turn 1 has unknown ShareGPT role 'bot'" in str(info.value)


@pytest.mark.parametrize(
    "chat, message",
    [([], "non-empty list of turns"), ([{"from": "human"}], "turn 0 needs a 'from' and a string 'value'")],
)
def test_malformed_chat(tmp_path, chat, message):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"conversations": chat}])
    with pytest.raises(ValueError) as info:
        read_documents(DatasetSource(str(path)))
    assert f"{path}, line 1: " in str(info.value) and message in str(info.value)


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


# ----------------------------------------------------------------------------------------------------- token layouts

DOC = "w1 w2 w3"
DOC_IDS = [W(1), W(2), W(3), EOS]


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
    from lit_qlp.data.text import document_classes
    from lit_qlp.data.tokenize import Encoded

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


def one_row_documents(tmp_path: Path, n: int) -> tuple[DatasetSource, list[Row]]:
    """``n`` distinct documents of exactly one sequence each (62 words + EOS after BOS) and their rows."""
    source = jsonl_source(tmp_path / "d.jsonl", [{"text": " ".join([f"w{k}"] * 62)} for k in range(n)])
    return source, sorted(row([BOS], [W(k)] * 62 + [EOS]) for k in range(n))


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


# ----------------------------------------------------------------------------------------------------- chats

CHAT = [
    {"role": "system", "content": "You are a terse field guide."},
    {"role": "user", "content": "Where do thornhares live?"},
    {"role": "assistant", "content": "In misty cedar valleys."},
    {"role": "user", "content": "And what do they eat?"},
    {"role": "assistant", "content": "Clover seeds and wild honey!"},
]
SHAREGPT = [
    {"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]} for m in CHAT
]
# The demo template renders "<s>" then "{role}:\n{content}</s>\n" per turn, and "assistant:\n" as generation prompt.
# Assistant content and its end of turn "</s>\n" are trained; the template's "<s>" is dropped (sequences open with
# their own BOS). Written out by hand, not rendered by the template.
CHAT_PIECES = [
    ("system:\nYou are a terse field guide.</s>\n", False),
    ("user:\nWhere do thornhares live?</s>\n", False),
    ("assistant:\n", False),
    ("In misty cedar valleys.</s>\n", True),
    ("user:\nAnd what do they eat?</s>\n", False),
    ("assistant:\n", False),
    ("Clover seeds and wild honey!</s>\n", True),
]


def chat_document(tokenizer) -> tuple[list[int], list[bool]]:
    """The chat's token ids (without the template's BOS) and which of them are trained, from CHAT_PIECES."""
    # The hand-written pieces are what the template renders (checked with the tokenizer, not the code under test).
    assert tokenizer.apply_chat_template(CHAT, tokenize=False) == "<s>" + "".join(text for text, _ in CHAT_PIECES)
    ids, trained = [], []
    for text, is_trained in CHAT_PIECES:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        trained += [is_trained] * len(piece)
    # The pieces split where the byte-level pre-tokenizer splits anyway, so they tokenise like the whole text.
    assert ids == tokenizer("".join(text for text, _ in CHAT_PIECES), add_special_tokens=False)["input_ids"]
    assert ids.count(tokenizer.eos_token_id) == 5 and tokenizer.bos_token_id not in ids
    return ids, trained


def chat_sources(tmp_path: Path, copies: int) -> dict[str, DatasetSource]:
    pq.write_table(pa.table({"messages": [CHAT] * copies}), tmp_path / "chat.parquet")
    return {
        "messages": jsonl_source(tmp_path / "messages.jsonl", [{"messages": CHAT}] * copies),
        "conversations": jsonl_source(tmp_path / "sharegpt.jsonl", [{"conversations": SHAREGPT}] * copies),
        "parquet": DatasetSource(str(tmp_path / "chat.parquet")),
    }


@pytest.mark.parametrize("fmt", ["messages", "conversations", "parquet"])
def test_chat_trains_only_assistant_turns(tmp_path, demo_tokenizer, fmt):
    ids, trained = chat_document(demo_tokenizer)
    assert demo_tokenizer.bos_token_id == 0 and demo_tokenizer.eos_token_id == 1
    copies = 5
    source = chat_sources(tmp_path, copies)[fmt]
    train, _, stats = build(tmp_path, DEMO_MODEL, [source])
    assert rows(train) == stream_rows([0], ids * copies, trained * copies)  # no EOS added: the template ends turns
    assert stats[0]["tokens"] == len(ids) * copies and stats[0]["trained_tokens"] == sum(trained) * copies
    trained_text = demo_tokenizer.decode([i for i, t in zip(ids, trained) if t])
    assert trained_text == "In misty cedar valleys.</s>\nClover seeds and wild honey!</s>\n"


@pytest.mark.parametrize("fmt", ["messages", "conversations"])
def test_chat_labels_all(tmp_path, demo_tokenizer, fmt):
    ids, _ = chat_document(demo_tokenizer)
    train, _, _ = build(tmp_path, DEMO_MODEL, [chat_sources(tmp_path, 5)[fmt]], chat_labels="all")
    assert rows(train) == stream_rows([0], ids * 5)


def test_chat_with_string_document_prefix_drops_template_bos(tmp_path, demo_tokenizer):
    # The string prefix is tokenised together with the rendered chat, so its tokens merge with the first turn's;
    # what must hold: the template's BOS is gone from inside the stream, and the trained tokens are unchanged.
    sources = [chat_sources(tmp_path, 5)["messages"]]
    plain, _, _ = build(tmp_path / "plain", DEMO_MODEL, sources)
    train, _, _ = build(tmp_path, DEMO_MODEL, sources, document_prefix="Note: ")
    assert (train.input_ids[:, 0] == 0).all() and not (train.input_ids[:, 1:] == 0).any()
    note = demo_tokenizer("Note:", add_special_tokens=False)["input_ids"]
    assert (train.input_ids == note[0]).any() and not (train.labels == note[0]).any()  # the prefix has no labels
    assert (train.labels != -100).any() and (plain.labels != -100).any()


# ----------------------------------------------------------------------------------------------------- add_prefix_space


def gpt2_class_copy(tmp_path: Path) -> Path:
    """The demo tokenizer saved under the GPT2Tokenizer class, which applies ``add_prefix_space`` to its
    byte-level pre-tokenizer."""
    directory = tmp_path / "gpt2_tokenizer"
    directory.mkdir()
    for name in ("tokenizer.json", "chat_template.jinja"):
        shutil.copy(DEMO_MODEL / name, directory / name)
    config = json.loads((DEMO_MODEL / "tokenizer_config.json").read_text())
    (directory / "tokenizer_config.json").write_text(json.dumps(config | {"tokenizer_class": "GPT2Tokenizer"}))
    return directory


def check_add_prefix_space(tmp_path: Path, tokenizer_dir: Path, demo_tokenizer) -> None:
    text = "hello world"
    spaced = demo_tokenizer(" " + text, add_special_tokens=False)["input_ids"] + [1]
    plain = demo_tokenizer(text, add_special_tokens=False)["input_ids"] + [1]
    assert spaced != plain  # the tokenizer tells a leading word from one after a space
    source = texts(tmp_path / "d.jsonl", text, 30)
    train, _, _ = build(tmp_path, tokenizer_dir, [source])
    assert rows(train) == stream_rows([0], plain * 30)
    train, _, _ = build(tmp_path, tokenizer_dir, [source], add_prefix_space=True)
    assert rows(train) == stream_rows([0], spaced * 30)


def test_add_prefix_space(tmp_path, demo_tokenizer):
    check_add_prefix_space(tmp_path, gpt2_class_copy(tmp_path), demo_tokenizer)


def test_add_prefix_space_demo_tokenizer(tmp_path, demo_tokenizer):
    check_add_prefix_space(tmp_path, DEMO_MODEL, demo_tokenizer)


# ----------------------------------------------------------------------------------------------------- data module


@pytest.mark.parametrize("sequence_len, suggestion", [(100, 128), (32, 64), (200, 192), (0, 64), (-64, 64)])
def test_sequence_len_must_be_a_multiple_of_64(sequence_len, suggestion):
    with pytest.raises(ValueError) as info:
        TextDataModule(datasets=[DatasetSource("x.jsonl")], sequence_len=sequence_len)
    message = str(info.value)
    assert f"data.sequence_len={sequence_len}" in message and "multiple of 64" in message
    assert f"try {suggestion}" in message
    assert suggestion > 0 and suggestion % 64 == 0


def test_valid_arguments(tmp_path):
    data = tmp_path / "x.jsonl"
    data.write_text('{"text": "w1 w2"}\n')
    dm = TextDataModule(datasets=[{"dataset_path": str(data)}], sequence_len=192, eval_fraction=0.0)
    assert dm.datasets == [DatasetSource(str(data))] and dm.sequence_len == 192
    assert dm.micro_batches == 1  # no trainer attached
    for bad, match in [
        ({"eval_fraction": 1}, "data.eval_fraction=1"),
        ({"eval_fraction": -0.1}, "data.eval_fraction=-0.1"),
        ({"evals_per_epoch": 0}, "data.evals_per_epoch=0"),
        ({"eval_gradient_accumulation_steps": 0}, "data.eval_gradient_accumulation_steps=0"),
        ({"max_sequences": 0}, "data.max_sequences=0"),
    ]:
        with pytest.raises(ValueError, match=match):
            TextDataModule(datasets=[DatasetSource(str(data))], sequence_len=64, **bad)
    with pytest.raises(ValueError, match="data.datasets is empty"):
        TextDataModule(datasets=[], sequence_len=64)


@pytest.mark.parametrize(
    "records, options, message",
    [
        ([], {}, "holds no tokens"),  # an empty file
        ([{"text": ""}], {"document_suffix": ""}, "holds no tokens"),  # documents without tokens
        ([{"text": "w1 w2"}] * 5, {}, "fewer tokens than one sequence of data.sequence_len=64"),
        ([{"text": "w1 w2"}] * 50, {"sequence_prefix": list(range(64))}, "leaves no room in sequence_len=64"),
    ],
)
def test_too_little_data(tmp_path, tiny_tok, records, options, message):
    path = write_jsonl(tmp_path / "d.jsonl", records)
    with pytest.raises(ValueError) as info:
        build(tmp_path, tiny_tok, [DatasetSource(str(path))], **options)
    assert message in str(info.value)
    if "holds no tokens" in message:
        assert f"dataset_path={str(path)!r}" in str(info.value)


def test_missing_tokenizer_dir(tmp_path):
    dm = TextDataModule(datasets=[texts(tmp_path / "d.jsonl", DOC, 20)], sequence_len=LEN, cache_dir=tmp_path / "c")
    with pytest.raises(ValueError, match="data.tokenizer_dir is unset"):
        dm.setup("fit")


def count_builds(monkeypatch) -> list[TextDataModule]:
    calls = []
    original = TextDataModule.build

    def counting_build(self):
        calls.append(self)
        return original(self)

    monkeypatch.setattr(TextDataModule, "build", counting_build)
    return calls


def test_setup_items_and_cache_reuse(tmp_path, tiny_tok, monkeypatch):
    source, all_rows = one_row_documents(tmp_path, 20)
    builds = count_builds(monkeypatch)
    start = time.perf_counter()
    first = make_module(tmp_path, tiny_tok, [source], eval_fraction=0.25, drop_tails=True)
    first.setup("fit")
    build_seconds = time.perf_counter() - start
    assert len(builds) == 1 and first.cache_path.parent == tmp_path / "cache"
    assert (first.cache_path / "summary.json").is_file()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first.cache_path.name]  # no temporary left
    item = first.train_set[0]
    assert set(item) == {"input_ids", "labels", "control_classes"}
    assert all(v.dtype == torch.int64 and v.shape == (LEN,) for v in item.values())
    train, evaluation, _ = first.build()
    assert (len(first.train_set), len(first.eval_set)) == (15, 5)
    for dataset, packed in ((first.train_set, train), (first.eval_set, evaluation)):
        for i in range(len(dataset)):  # the cache holds exactly what build() returns, in order
            for name in ("input_ids", "labels", "control_classes"):
                assert dataset[i][name].tolist() == getattr(packed, name)[i].tolist()
    summary = json.loads((first.cache_path / "summary.json").read_text())
    assert summary["train_sequences"] == 15 and summary["eval_sequences"] == 5
    first.setup("validate")  # set up already: nothing happens
    assert len(builds) == 2  # the explicit build() above

    def no_build(self):
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(TextDataModule, "build", no_build)
    start = time.perf_counter()
    second = make_module(tmp_path, tiny_tok, [source], eval_fraction=0.25, drop_tails=True, evals_per_epoch=3)
    second.setup("fit")
    read_seconds = time.perf_counter() - start
    print(f"\ntiny cache: build+write {build_seconds:.3f} s, read {read_seconds:.3f} s")
    assert second.cache_path == first.cache_path
    assert [second.train_set[i]["input_ids"].tolist() for i in range(15)] == train.input_ids.tolist()
    assert read_seconds < 10


def cached_rows(dm: TextDataModule) -> list[list[int]]:
    """input_ids of every cached sequence, train and evaluation, sorted."""
    return sorted(split[i]["input_ids"].tolist() for split in (dm.train_set, dm.eval_set) for i in range(len(split)))


def test_cache_key_and_rebuild_on_changes(tmp_path, tiny_tok, monkeypatch):
    tokenizer = tmp_path / "tokenizer"
    shutil.copytree(tiny_tok, tokenizer)
    data = tmp_path / "d.jsonl"
    source = texts(data, DOC, 32)  # 128 tokens: two sequences, one of them for evaluation
    builds = count_builds(monkeypatch)

    def setup(**options) -> TextDataModule:
        dm = make_module(tmp_path, tokenizer, [source], eval_fraction=0.5, **options)
        dm.setup("fit")
        assert (len(dm.train_set), len(dm.eval_set)) == (1, 1)
        return dm

    def expected(doc: list[int], prefix: list[int]) -> list[list[int]]:
        return sorted(list(ids) for ids, _, _ in stream_rows(prefix, doc * 32))

    base = setup()
    assert len(builds) == 1 and cached_rows(base) == expected(DOC_IDS, [BOS])
    # Nothing that the data depends on changed: same key, no build.
    os.utime(data, (1, 1))
    shutil.copytree(tokenizer, tmp_path / "same_tokenizer")
    same = make_module(tmp_path, tmp_path / "same_tokenizer", [source], eval_fraction=0.5)
    assert same.cache_key() == base.cache_key()
    assert setup(num_workers=1, evals_per_epoch=2, eval_gradient_accumulation_steps=3).cache_path == base.cache_path
    assert len(builds) == 1

    changed = setup(sequence_prefix="")  # an option
    assert changed.cache_path != base.cache_path and len(builds) == 2
    assert cached_rows(changed) == expected(DOC_IDS, [])

    vocab_file = tokenizer / "tokenizer.json"  # the tokenizer: swap the ids of w1 and w2
    vocab = json.loads(vocab_file.read_text())
    vocab["model"]["vocab"]["w1"], vocab["model"]["vocab"]["w2"] = W(2), W(1)
    vocab_file.write_text(json.dumps(vocab))
    retokenized = setup()
    assert retokenized.cache_path not in (base.cache_path, changed.cache_path) and len(builds) == 3
    assert cached_rows(retokenized) == expected([W(2), W(1), W(3), EOS], [BOS])

    texts(data, "w5 w6 w7", 32)  # a source file's content
    edited = setup()
    assert edited.cache_path not in (base.cache_path, changed.cache_path, retokenized.cache_path)
    assert len(builds) == 4
    assert cached_rows(edited) == expected([W(5), W(6), W(7), EOS], [BOS])
    assert len(list((tmp_path / "cache").iterdir())) == 4


@pytest.mark.parametrize(
    "change",
    [
        {"sequence_len": 128},
        {"eval_fraction": 0.5},
        {"max_sequences": 3},
        {"drop_tails": True},
        {"mix_datasets": True},
        {"sequence_prefix": ""},
        {"document_prefix": 5},
        {"document_suffix": ""},
        {"mask_tokens": True},
        {"mask_tokens": [1]},
        {"chat_labels": "all"},
        {"add_prefix_space": True},
        {"seed": 1},
        {"source": {"max_tokens": 10}},
        {"source": {"control_class": 1}},
    ],
)
def test_cache_key_covers_every_option(tmp_path, tiny_tok, change):
    path = str(write_jsonl(tmp_path / "d.jsonl", [{"text": DOC}]))
    base = make_module(tmp_path, tiny_tok, [DatasetSource(path)]).cache_key()
    options = dict(change)
    source = DatasetSource(path, **options.pop("source", {}))
    assert make_module(tmp_path, tiny_tok, [source], **options).cache_key() != base


def test_cache_key_follows_the_files_a_glob_matches(tmp_path, tiny_tok):
    write_jsonl(tmp_path / "a.jsonl", [{"text": DOC}])
    sources = [DatasetSource(str(tmp_path / "*.jsonl"))]
    base = make_module(tmp_path, tiny_tok, sources).cache_key()
    write_jsonl(tmp_path / "b.jsonl", [{"text": DOC}])
    assert make_module(tmp_path, tiny_tok, sources).cache_key() != base
    (tmp_path / "b.jsonl").unlink()
    assert make_module(tmp_path, tiny_tok, sources).cache_key() == base


def test_cache_key_tells_mask_tokens_true_from_id_1(tmp_path, tiny_tok):
    sources = [DatasetSource(str(write_jsonl(tmp_path / "d.jsonl", [{"text": DOC}])))]
    keys = {make_module(tmp_path, tiny_tok, sources, mask_tokens=m).cache_key() for m in (True, 1, False, 0)}
    assert len(keys) == 4


@pytest.mark.parametrize("eval_fraction, copies", [(0.0, 40), (0.5, 16)])
def test_setup_without_evaluation_sequences(tmp_path, tiny_tok, eval_fraction, copies):
    dm = make_module(tmp_path, tiny_tok, [texts(tmp_path / "d.jsonl", DOC, copies)], eval_fraction=eval_fraction)
    dm.setup("fit")
    assert len(dm.train_set) == copies // 16 and len(dm.eval_set) == 0
    assert dm.val_dataloader() == []


# ----------------------------------------------------------------------------------------------------- sampler


def test_resumable_sampler_skips_every_pass_of_the_resume_epoch():
    dataset = list(range(37))
    for num_replicas, rank, shuffle in [(1, 0, True), (2, 1, True), (3, 0, True), (1, 0, False)]:
        kwargs = dict(num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=5, drop_last=shuffle)
        reference = DistributedSampler(dataset, **kwargs)
        epochs = {}
        for epoch in range(4):
            reference.set_epoch(epoch)
            epochs[epoch] = list(reference)
        if shuffle:
            assert epochs[0] != epochs[1]
        for resume_epoch in (0, 2):
            for skip in (0, 1, 5, len(epochs[resume_epoch]) - 1, len(epochs[resume_epoch])):
                sampler = ResumableSampler(dataset, **kwargs)
                sampler.resume_epoch = resume_epoch
                sampler.resume_samples = skip
                sampler.set_epoch(resume_epoch)
                assert list(sampler) == epochs[resume_epoch][skip:]
                assert list(sampler) == epochs[resume_epoch][skip:]  # Lightning may iterate an epoch twice
                for other in range(4):
                    if other != resume_epoch:
                        sampler.set_epoch(other)
                        assert list(sampler) == epochs[other]
                sampler.set_epoch(resume_epoch)
                assert list(sampler) == epochs[resume_epoch][skip:]


def test_resumable_sampler_without_resume_is_distributed_sampler():
    dataset = list(range(23))
    for epoch in range(3):
        ours = ResumableSampler(dataset, num_replicas=2, rank=0, shuffle=True, seed=1)
        theirs = DistributedSampler(dataset, num_replicas=2, rank=0, shuffle=True, seed=1)
        ours.set_epoch(epoch)
        theirs.set_epoch(epoch)
        assert list(ours) == list(theirs)


def test_train_dataloader_resumes_in_the_resume_epoch(tmp_path, tiny_tok):
    source, _ = one_row_documents(tmp_path, 11)
    dm = make_module(tmp_path, tiny_tok, [source], drop_tails=True, eval_fraction=0.1)
    assert dm.state_dict() == {}  # no trainer: nothing to save
    dm.setup("fit")
    epochs = []
    for epoch in range(2):
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        epochs.append([batch["input_ids"].tolist() for batch in loader])
    assert len(epochs[0]) == 10 and sorted(epochs[0]) == sorted(epochs[1]) and epochs[0] != epochs[1]
    assert len(dm.val_dataloader()) == 1

    def batches(loader, epoch: int) -> list:
        loader.sampler.set_epoch(epoch)
        return [batch["input_ids"].tolist() for batch in loader]

    early = dm.train_dataloader()  # Lightning may build the loader before it restores the data position
    dm.load_state_dict({"epoch": 1, "batches": 4})
    assert (early.sampler.resume_epoch, early.sampler.resume_samples) == (1, 4)
    assert batches(early, 1) == epochs[1][4:] and batches(early, 1) == epochs[1][4:]
    later = dm.train_dataloader()  # and again after it
    assert batches(later, 1) == epochs[1][4:]
    assert batches(later, 0) == epochs[0]  # other epochs are whole
    dm.load_state_dict({})
    assert batches(dm.train_dataloader(), 1) == epochs[1]


# ----------------------------------------------------------------------------------------------------- performance

WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which but have an they "
    "you were her she there been one all we their has would when if so no will more can out some who them up into "
    "do than its time only could new these two may first then other after over any most like also made such where "
    "through long river valley garden north winter summer morning evening stone forest village water light small "
    "great old young green quiet bright heavy narrow ancient silver golden bird fox hare cedar orchard meadow honey "
    "seed path wall door window bridge hill cloud rain snow wind field harvest season market letter story journey "
    "travel walked carried remembered noticed gathered followed answered listened watched opened closed returned "
    "slowly quickly carefully gently almost always never often perhaps together beneath between beyond toward"
).split()


def english_like_documents(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    documents = []
    for _ in range(n):
        paragraphs = []
        for _ in range(rng.randint(1, 4)):
            sentences = []
            for _ in range(rng.randint(3, 8)):
                words = [rng.choice(WORDS) for _ in range(rng.randint(5, 18))]
                if rng.random() < 0.3:
                    words.insert(rng.randint(1, len(words) - 1), f"{rng.randint(2, 1999)},")
                sentences.append(" ".join(words).capitalize() + rng.choice(".....?!"))
            paragraphs.append(" ".join(sentences))
        documents.append("\n\n".join(paragraphs))
    return documents


@pytest.mark.slow
def test_performance_one_million_tokens(tmp_path):
    """Build (read, tokenise, pack, write) and cache-read times for about 1,000,000 tokens of JSONL."""
    path = write_jsonl(tmp_path / "corpus.jsonl", [{"text": t} for t in english_like_documents(2850)])
    options = dict(eval_fraction=0.01, sequence_len=2048, seed=0, cache_dir=tmp_path / "cache")
    start = time.perf_counter()
    first = TextDataModule(datasets=[DatasetSource(str(path))], tokenizer_dir=DEMO_MODEL, **options)
    first.setup("fit")
    build_seconds = time.perf_counter() - start
    start = time.perf_counter()
    second = TextDataModule(datasets=[DatasetSource(str(path))], tokenizer_dir=DEMO_MODEL, **options)
    second.setup("fit")
    read_seconds = time.perf_counter() - start
    start = time.perf_counter()
    read_tokens = sum(int(second.train_set[i]["input_ids"].numel()) for i in range(len(second.train_set)))
    iterate_seconds = time.perf_counter() - start
    tokens = json.loads((first.cache_path / "summary.json").read_text())["datasets"][0]["tokens"]
    size = path.stat().st_size / 1e6
    print(
        f"\n{tokens} tokens ({size:.1f} MB JSONL, {len(first.train_set)} + {len(first.eval_set)} sequences of 2048): "
        f"setup with build {build_seconds:.2f} s ({tokens / build_seconds:,.0f} tokens/s), setup from the cache "
        f"{read_seconds:.3f} s, then every training sequence read once {iterate_seconds:.2f} s"
    )
    assert read_tokens == len(second.train_set) * 2048
    assert 900_000 <= tokens <= 1_200_000
    assert second.cache_path == first.cache_path and len(second.train_set) == len(first.train_set)
    assert build_seconds < 120 and read_seconds < 30
