"""TextDataModule: option checks, the on-disk cache and its key, setup."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest
import torch

from lit_qlp.data.build import SequenceBuilder
from lit_qlp.data.sources import DatasetSource
from lit_qlp.data.text import TextDataModule
from tests.data.helpers import (
    BOS,
    DOC,
    DOC_IDS,
    EOS,
    LEN,
    W,
    build,
    make_module,
    one_row_documents,
    stream_rows,
    texts,
    write_jsonl,
)

# ----------------------------------------------------------------------------------------------------- data module


@pytest.mark.parametrize("sequence_len, suggestion", [(100, 128), (32, 64), (200, 192), (0, 64), (-64, 64)])
def test_sequence_len_must_be_a_multiple_of_64(sequence_len, suggestion):
    with pytest.raises(ValueError) as info:
        TextDataModule(datasets=[DatasetSource("x.jsonl")], sequence_len=sequence_len)
    message = str(info.value)
    assert f"data.sequence_len={sequence_len}" in message and "multiple of 64" in message
    assert f"try {suggestion}" in message
    assert suggestion > 0 and suggestion % 64 == 0


@pytest.mark.parametrize("sequence_len", [0, -1, -64])
def test_sequence_len_must_be_positive(sequence_len):
    with pytest.raises(ValueError) as info:
        TextDataModule(datasets=[DatasetSource("x.jsonl")], sequence_len=sequence_len)
    assert f"data.sequence_len={sequence_len} must be positive" in str(info.value)


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


def count_builds(monkeypatch) -> list[SequenceBuilder]:
    calls = []
    original = SequenceBuilder.build

    def counting_build(self):
        calls.append(self)
        return original(self)

    monkeypatch.setattr(SequenceBuilder, "build", counting_build)
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
    train, evaluation, _ = first.builder().build()
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

    monkeypatch.setattr(SequenceBuilder, "build", no_build)
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
    assert same.builder().cache_key() == base.builder().cache_key()
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
        {"chat_packing": "as_text"},
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
    base = make_module(tmp_path, tiny_tok, [DatasetSource(path)]).builder().cache_key()
    options = dict(change)
    source = DatasetSource(path, **options.pop("source", {}))
    assert make_module(tmp_path, tiny_tok, [source], **options).builder().cache_key() != base


def test_cache_key_follows_the_files_a_glob_matches(tmp_path, tiny_tok):
    write_jsonl(tmp_path / "a.jsonl", [{"text": DOC}])
    sources = [DatasetSource(str(tmp_path / "*.jsonl"))]
    base = make_module(tmp_path, tiny_tok, sources).builder().cache_key()
    write_jsonl(tmp_path / "b.jsonl", [{"text": DOC}])
    assert make_module(tmp_path, tiny_tok, sources).builder().cache_key() != base
    (tmp_path / "b.jsonl").unlink()
    assert make_module(tmp_path, tiny_tok, sources).builder().cache_key() == base


def test_cache_key_tells_mask_tokens_true_from_id_1(tmp_path, tiny_tok):
    sources = [DatasetSource(str(write_jsonl(tmp_path / "d.jsonl", [{"text": DOC}])))]
    keys = {make_module(tmp_path, tiny_tok, sources, mask_tokens=m).builder().cache_key() for m in (True, 1, False, 0)}
    assert len(keys) == 4


@pytest.mark.parametrize("eval_fraction, copies", [(0.0, 40), (0.5, 16)])
def test_setup_without_evaluation_sequences(tmp_path, tiny_tok, eval_fraction, copies):
    dm = make_module(tmp_path, tiny_tok, [texts(tmp_path / "d.jsonl", DOC, copies)], eval_fraction=eval_fraction)
    dm.setup("fit")
    assert len(dm.train_set) == copies // 16 and len(dm.eval_set) == 0
    assert dm.val_dataloader() == []
