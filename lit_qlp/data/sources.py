"""Datasets on disk: which files a source names and the records they hold."""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUFFIXES = (".txt", ".json", ".jsonl", ".parquet")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class DatasetSource:
    """One dataset of the mix.

    Attributes:
        dataset_path: A file or a glob pattern. ``.txt``: the whole file is one document. ``.jsonl`` (one object per
            line), ``.json`` (a list of objects, or one) and ``.parquet`` (rows): each record has a "text" field, or
            is a chat: "messages" (``[{role, content}]``) or ShareGPT "conversations" (``[{from, value}]``).
        max_tokens: Keep at most this many tokens of the dataset (after shuffling its documents, before packing).
        control_class: Control Adapter class of the dataset's tokens: -1, 0 or 1.
    """

    dataset_path: str
    max_tokens: int | None = None
    control_class: int = 0

    def __post_init__(self) -> None:
        if self.control_class not in (-1, 0, 1):
            raise ValueError(
                f"data.datasets: dataset_path={self.dataset_path!r} has control_class={self.control_class!r}; "
                "it must be -1, 0 or 1"
            )
        if self.max_tokens is not None and self.max_tokens <= 0:
            raise ValueError(
                f"data.datasets: dataset_path={self.dataset_path!r} has max_tokens={self.max_tokens}; "
                "use a positive number or leave it unset"
            )


def dataset_files(source: DatasetSource) -> list[Path]:
    """The files that ``source.dataset_path`` names, sorted.

    Raises:
        FileNotFoundError: if the path or pattern matches no file.
        ValueError: for a file with an unsupported suffix.
    """
    paths = sorted(glob.glob(source.dataset_path, recursive=True)) or (
        [source.dataset_path] if Path(source.dataset_path).is_file() else []
    )
    paths = [Path(p) for p in paths if Path(p).is_file()]
    if not paths:
        raise FileNotFoundError(f"data.datasets: dataset_path={source.dataset_path!r} matches no file")
    for path in paths:
        if path.suffix not in SUFFIXES:
            raise ValueError(f"data.datasets: {path} has suffix {path.suffix!r}; supported are {', '.join(SUFFIXES)}")
    return paths


def _json(text: str, path: Path, line: int | None = None) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        where = f"{path}, line {line}" if line is not None else str(path)
        raise ValueError(f"{where}: invalid JSON ({err.msg} at column {err.colno}); fix or remove it") from None


def _records(path: Path) -> Iterator[tuple[str, Any]]:
    """``(where, record)`` pairs of one file; ``where`` names the file and the line or record for errors."""
    if path.suffix == ".txt":
        yield str(path), {"text": path.read_text(encoding="utf-8")}
    elif path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    yield f"{path}, line {n}", _json(line, path, n)
    elif path.suffix == ".json":
        data = _json(path.read_text(encoding="utf-8"), path)
        for n, record in enumerate(data if isinstance(data, list) else [data], 1):
            yield f"{path}, record {n}", record
    else:
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        for n, record in enumerate(table.to_pylist(), 1):
            yield f"{path}, row {n}", record


def chat_messages(record: dict, where: str) -> list[dict[str, str]] | None:
    """The record's chat as ``[{role, content}]`` (ShareGPT roles mapped), or None if it is not a chat."""
    if "messages" in record:
        turns, role_key, content_key = record["messages"], "role", "content"
    elif "conversations" in record:
        turns, role_key, content_key = record["conversations"], "from", "value"
    else:
        return None
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"{where}: the chat must be a non-empty list of turns")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get(content_key), str) or role_key not in turn:
            raise ValueError(f"{where}: turn {i} needs a {role_key!r} and a string {content_key!r}")
        role = turn[role_key] if role_key == "role" else SHAREGPT_ROLES.get(turn[role_key])
        if role is None:
            raise ValueError(f"{where}: turn {i} has unknown ShareGPT role {turn[role_key]!r}")
        messages.append({"role": role, "content": turn[content_key]})
    return messages


def read_documents(source: DatasetSource) -> list[str | list[dict[str, str]]]:
    """The documents of ``source`` in file order: a string, or a chat as a list of messages.

    Raises:
        ValueError: naming the file and line (or record) of invalid JSON or of a record with neither a string
            "text" nor a chat.
    """
    documents: list[str | list[dict[str, str]]] = []
    for path in dataset_files(source):
        for where, record in _records(path):
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected an object with a 'text' field or a chat, got {type(record)}")
            messages = chat_messages(record, where)
            if messages is not None:
                documents.append(messages)
            elif isinstance(record.get("text"), str):
                documents.append(record["text"])
            else:
                raise ValueError(f"{where}: the record has no string field 'text' (nor 'messages'/'conversations')")
    return documents
