"""Helpers of the data tests.

Expected token layouts are written by hand from the tiny WordLevel vocabulary (``<pad>`` = 0, ``<s>`` = 1,
``</s>`` = 2, ``<unk>`` = 3, word ``w{i}`` = i + 4), never computed by the code under test. Datasets repeat one
document (or compare rows as sets) so that the seeded shuffles cannot change what is expected.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lit_qlp.data.packing import Packed
from lit_qlp.data.sources import DatasetSource
from lit_qlp.data.text import TextDataModule
from lit_qlp.kernels.fused_loss import IGNORE_INDEX

PAD, BOS, EOS, UNK = 0, 1, 2, 3


DEMO_MODEL = Path(__file__).resolve().parents[2] / "demo" / "model"


LEN = 64  # sequence_len of every test here


CONTENT = LEN - 1  # tokens after the default [BOS] sequence prefix


Row = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]


def W(i: int) -> int:
    """Id of the tiny tokenizer's word ``w{i}``."""
    return i + 4


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
    return make_module(tmp_path, tokenizer_dir, datasets, **options).builder().build()


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


DOC = "w1 w2 w3"


DOC_IDS = [W(1), W(2), W(3), EOS]


def one_row_documents(tmp_path: Path, n: int) -> tuple[DatasetSource, list[Row]]:
    """``n`` distinct documents of exactly one sequence each (62 words + EOS after BOS) and their rows."""
    source = jsonl_source(tmp_path / "d.jsonl", [{"text": " ".join([f"w{k}"] * 62)} for k in range(n)])
    return source, sorted(row([BOS], [W(k)] * 62 + [EOS]) for k in range(n))
