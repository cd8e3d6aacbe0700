"""Chat records and add_prefix_space, with the demo model's byte-level BPE tokenizer and chat template; the
expectations come from tokenising hand-rendered pieces of the template."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lit_qlp.data.sources import DatasetSource
from tests.data.helpers import DEMO_MODEL, build, jsonl_source, rows, stream_rows, texts

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
