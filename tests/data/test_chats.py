"""Chat records and add_prefix_space, with the demo model's byte-level BPE tokenizer and chat template; the
expectations come from tokenising hand-rendered pieces of the template. The chat here (89 tokens and the template's
BOS) is longer than a sequence (64 tokens): packed whole it keeps its first tokens; packed as text it runs on."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lit_qlp.data.sources import DatasetSource
from tests.data.helpers import CONTENT, DEMO_MODEL, build, jsonl_source, row, rows, stream_rows, texts

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
# Assistant content and its end of turn "</s>\n" are trained; the template's "<s>" (BOS, id 0) stays, but a chat
# opening a sequence leaves it to the sequence's own BOS. Written out by hand, not rendered by the template.
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
    # Whole chats (the default): each opens a sequence of its own (its BOS is the sequence's) and, longer than one,
    # keeps its first 63 tokens: the first answer whole, the second cut off with the rest.
    assert rows(train) == [row([0], ids[:CONTENT], trained[:CONTENT])] * copies  # no EOS added: the template ends turns
    assert stats[0]["tokens"] == (len(ids) + 1) * copies and stats[0]["trained_tokens"] == sum(trained) * copies
    assert stats[0]["dropped_tokens"] == (len(ids) - CONTENT) * copies
    assert (stats[0]["chats"], stats[0]["truncated_chats"], stats[0]["answers"]) == (copies, copies, 2 * copies)
    assert stats[0]["answers_without_prompt"] == 0
    trained_text = demo_tokenizer.decode([i for i, t in zip(ids, trained) if t])
    assert trained_text == "In misty cedar valleys.</s>\nClover seeds and wild honey!</s>\n"
    kept_text = demo_tokenizer.decode([i for i, t in zip(ids[:CONTENT], trained) if t])
    assert kept_text == "In misty cedar valleys.</s>\n"


@pytest.mark.parametrize("fmt", ["messages", "conversations"])
def test_chat_as_text_runs_on_keeping_each_later_chats_bos(tmp_path, demo_tokenizer, fmt):
    ids, trained = chat_document(demo_tokenizer)
    train, _, stats = build(tmp_path, DEMO_MODEL, [chat_sources(tmp_path, 5)[fmt]], chat_packing="as_text")
    # The first chat opens the stream (its BOS is the sequence's); the others start at 89 + 90k, never at a sequence's
    # start (a multiple of 63), and keep theirs.
    assert rows(train) == stream_rows([0], ids + ([0] + ids) * 4, trained + ([False] + trained) * 4)
    # Sequence r holds stream tokens 63r..63r+62; the answers are tokens 40-53 and 74-88 of the first chat and 41-54
    # and 75-89 of the others (after their BOS), which start at 89 + 90k. Only the first chat's first answer lies in
    # the sequence where its chat starts; the last chat's second answer (434-448) is partly in the kept sequence 6.
    assert (stats[0]["chats"], stats[0]["answers"], stats[0]["answers_without_prompt"]) == (5, 10, 9)
    assert stats[0]["answers_without_prompt"] == stats[0]["answers_without_prompt_as_text"]


@pytest.mark.parametrize("fmt", ["messages", "conversations"])
def test_chat_labels_all(tmp_path, demo_tokenizer, fmt):
    ids, _ = chat_document(demo_tokenizer)
    sources = [chat_sources(tmp_path, 5)[fmt]]
    train, _, _ = build(tmp_path, DEMO_MODEL, sources, chat_labels="all", chat_packing="as_text")
    assert rows(train) == stream_rows([0], ids + [0, *ids] * 4)
    train, _, _ = build(tmp_path / "whole", DEMO_MODEL, sources, chat_labels="all")
    assert rows(train) == [row([0], ids[:CONTENT])] * 5


def test_chat_with_string_document_prefix_keeps_template_bos(tmp_path, demo_tokenizer):
    # The string goes before the rendered chat, whose BOS (a special token) then follows it: the chat no longer opens
    # with the sequence prefix's token, so it keeps its BOS; the prefix has no labels, the trained tokens are the same.
    ids, trained = chat_document(demo_tokenizer)
    note = demo_tokenizer("Note: ", add_special_tokens=False)["input_ids"]
    train, _, _ = build(tmp_path, DEMO_MODEL, [chat_sources(tmp_path, 5)["messages"]], document_prefix="Note: ")
    document, labelled = note + [0] + ids, [False] * (len(note) + 1) + trained
    assert rows(train) == [row([0], document[:CONTENT], labelled[:CONTENT])] * 5


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
