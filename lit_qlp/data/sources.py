"""Datasets on disk: which files a source names and the records they hold."""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUFFIXES = (".txt", ".json", ".jsonl", ".parquet")
CHAT_ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
RECORD_FIELDS = ("text", "messages", "conversations")


@dataclass
class DatasetSource:
    """One dataset of the mix.

    Attributes:
        dataset_path: A file or a glob pattern; text files are UTF-8. ``.txt``: the whole file is one document.
            ``.jsonl`` (one object per line), ``.json`` (a list of objects, or a single one) and ``.parquet`` (rows):
            each record has a "text" field, or is a chat: "messages" (``[{role, content}]``, roles "system", "user"
            and "assistant") or ShareGPT "conversations" (``[{from, value}]``, from "system", "human" or "gpt").
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


def _not_utf8(path: Path) -> ValueError:
    """The error for a text file that is not UTF-8: the first line that is not, and its first bad byte."""
    with path.open("rb") as f:
        # Lines split at b"\n", which is never part of a multi-byte UTF-8 character: each decodes on its own.
        for n, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as err:
                return ValueError(
                    f"{path}, line {n}: not UTF-8 text (byte {raw[err.start]:#04x} at byte {err.start + 1} of the "
                    "line); convert the file to UTF-8, e.g. iconv -f latin1 -t utf-8"
                )
    return ValueError(f"{path}: not UTF-8 text; convert the file to UTF-8, e.g. iconv -f latin1 -t utf-8")


def _json_records(data: Any, path: Path) -> list:
    """The records of a ``.json`` file's content: a list, or an object that is itself one record."""
    if isinstance(data, list):
        return data
    if isinstance(data, dict) and any(field in data for field in RECORD_FIELDS):
        return [data]
    found = f"an object with keys {sorted(data)[:5]}" if isinstance(data, dict) else f"a {type(data).__name__}"
    lists = [key for key, value in data.items() if isinstance(value, list)] if isinstance(data, dict) else []
    hint = f"; its key {lists[0]!r} holds a list: make that list the file's content" if lists else ""
    raise ValueError(
        f'{path}: a .json dataset must hold a list of records ([{{"text": ...}}, ...]), not {found}{hint}; or write '
        "one record per line in a .jsonl file"
    )


def _records(path: Path) -> Iterator[tuple[str, Any]]:
    """``(where, record)`` pairs of one file; ``where`` names the file and the line or record for errors."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        for n, record in enumerate(table.to_pylist(), 1):
            yield f"{path}, row {n}", record
        return
    try:
        if path.suffix == ".txt":
            yield str(path), {"text": path.read_text(encoding="utf-8")}
        elif path.suffix == ".jsonl":
            with path.open(encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        yield f"{path}, line {n}", _json(line, path, n)
        elif path.suffix == ".json":
            records = _json_records(_json(path.read_text(encoding="utf-8"), path), path)
            for n, record in enumerate(records, 1):
                yield f"{path}, record {n}", record
    except UnicodeDecodeError:
        raise _not_utf8(path) from None


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
        given = turn[role_key]
        if role_key == "role" and given not in CHAT_ROLES:
            raise ValueError(
                f"{where}: turn {i} has unknown role {given!r}; the roles are {', '.join(map(repr, CHAT_ROLES))} "
                "(only 'assistant' turns train by default): rename or remove the turn"
            )
        role = given if role_key == "role" else SHAREGPT_ROLES.get(given) if isinstance(given, str) else None
        if role is None:
            raise ValueError(
                f"{where}: turn {i} has unknown ShareGPT role {given!r}; the roles are "
                f"{', '.join(map(repr, SHAREGPT_ROLES))}: rename or remove the turn"
            )
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
