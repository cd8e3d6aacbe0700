"""Reading datasets: files, formats, globs, chats, and the errors that name the file and line."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lit_qlp.data import DatasetSource as ExportedDatasetSource
from lit_qlp.data import TextDataModule as ExportedTextDataModule
from lit_qlp.data.sources import DatasetSource, read_documents
from lit_qlp.data.text import TextDataModule
from tests.data.helpers import LEN, build, make_module, write_jsonl

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


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".json"])
def test_non_utf8_file_names_the_file_and_line(tmp_path, suffix):
    path = tmp_path / f"latin1{suffix}"
    lines = {".txt": ["first", "caf\xe9"], ".jsonl": ['{"text": "a"}', '{"text": "caf\xe9"}']}
    lines[".json"] = ['[{"text": "a"},', ' {"text": "caf\xe9"}]']
    path.write_bytes("\n".join(lines[suffix]).encode("latin-1"))
    with pytest.raises(ValueError) as info:
        read_documents(DatasetSource(str(path)))
    message = str(info.value)
    assert f"{path}, line 2: not UTF-8 text (byte 0xe9" in message and "convert the file to UTF-8" in message


@pytest.mark.parametrize("role", ["wizard", "bot", "Assistant", 1])
def test_unknown_chat_role_names_the_file_line_and_roles(tmp_path, role):
    good = [{"role": "user", "content": "w1"}, {"role": "assistant", "content": "w2"}]
    path = write_jsonl(
        tmp_path / "chat.jsonl", [{"messages": good}, {"messages": [good[0], {"role": role, "content": "w3"}]}]
    )
    with pytest.raises(ValueError) as info:
        read_documents(DatasetSource(str(path)))
    message = str(info.value)
    assert f"{path}, line 2: turn 1 has unknown role {role!r}" in message
    assert "'system', 'user', 'assistant'" in message and "rename or remove the turn" in message


def test_unknown_sharegpt_role_lists_the_roles(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"conversations": [{"from": "wizard", "value": "w1"}]}])
    with pytest.raises(ValueError) as info:
        read_documents(DatasetSource(str(path)))
    assert f"{path}, line 1: turn 0 has unknown ShareGPT role 'wizard'" in str(info.value)
    assert "'human', 'user', 'gpt', 'assistant', 'system'" in str(info.value)


@pytest.mark.parametrize(
    "content, found",
    [
        (
            {"data": [{"text": "a"}], "version": 1},
            "an object with keys ['data', 'version']; its key 'data' holds a list",
        ),
        ({"name": "x"}, "an object with keys ['name']"),
        ("just text", "a str"),
    ],
)
def test_json_file_not_holding_a_list_of_records(tmp_path, content, found):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(content), encoding="utf-8")
    with pytest.raises(ValueError) as info:
        read_documents(DatasetSource(str(path)))
    message = str(info.value)
    assert f"{path}: a .json dataset must hold a list of records" in message and found in message
