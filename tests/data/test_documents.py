"""``data.packing: documents``: every document whole and on its own in a sequence, positions restarting at each one,
checked against the documents themselves (a reading of the packed rows written here) and against hand layouts."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from lit_qlp.data.packing import pack_documents
from lit_qlp.data.tokenize import Encoded
from lit_qlp.kernels.fused_loss import IGNORE_INDEX
from tests.data.helpers import BOS, EOS, LEN, PAD, W, build, make_module, texts

PAD_ID = -1


def random_documents(rng: random.Random, prefix: list[int], n: int) -> list[Encoded]:
    """``n`` documents of distinct tokens (document k: ids 1000 (k + 1) + j), some opening with the prefix's tokens
    (as a chat template's BOS does), some chats."""
    documents = []
    for k in range(n):
        ids = [1000 * (k + 1) + j for j in range(rng.choice([1, 2, 5, 9, 14, 23, 40]))]
        if prefix and rng.random() < 0.4:
            ids = prefix + ids
        trained = [rng.random() < 0.7 for _ in ids]
        documents.append(Encoded(np.asarray(ids, np.int64), np.asarray(trained), chat=rng.random() < 0.3))
    return documents


def read_rows(packed, prefix: list[int]) -> tuple[dict[int, list[tuple[int, list, list, list]]], int, list]:
    """The pieces of each document in the packed rows, read by their position restarts: ``{document: [(first
    token's index in it, ids, labels, classes), ...]}``; the padding tokens; per row (its content tokens, the length
    of its first piece)."""
    pieces: dict[int, list] = {}
    padding, used = 0, []
    for ids, labels, classes, positions in zip(
        packed.input_ids.tolist(), packed.labels.tolist(), packed.control_classes.tolist(), packed.position_ids.tolist()
    ):
        starts = [j for j, p in enumerate(positions) if p == 0] + [len(ids)]
        first_length = None
        for a, b in zip(starts, starts[1:]):
            assert positions[a:b] == list(range(b - a))  # positions count from 0 within each piece
            if all(t == PAD_ID for t in ids[a:b]):  # padding: the rest of the row, no labels
                assert b == len(ids) and all(x == IGNORE_INDEX for x in labels[a:b]) and not any(classes[a:b])
                padding += b - a
                continue
            assert ids[a : a + len(prefix)] == prefix and labels[a : a + len(prefix)] == [IGNORE_INDEX] * len(prefix)
            assert labels[a] == IGNORE_INDEX  # never a target of the previous document's last token
            body = slice(a + len(prefix), b)
            k = ids[body.start] // 1000 - 1
            pieces.setdefault(k, []).append((ids[body.start] % 1000, ids[body], labels[body], classes[body]))
            first_length = b - a if first_length is None else first_length
        used.append((len(ids) - sum(t == PAD_ID for t in ids), first_length))
    return pieces, padding, used


@pytest.mark.parametrize("long_documents", ["split", "drop"])
def test_pack_documents_keeps_every_document_whole_and_apart(long_documents):
    rng = random.Random(11 + (long_documents == "drop"))
    for _ in range(300):
        prefix = [rng.randrange(1, 900) for _ in range(rng.randint(0, 2))]
        documents = random_documents(rng, prefix, rng.randint(1, 12))
        classes = [rng.choice([-1, 1]) for _ in documents]
        sequence_len = rng.randint(len(prefix) + 1, 30)
        content = sequence_len - len(prefix)
        packed = pack_documents(documents, classes, sequence_len, prefix, long_documents, pad_id=PAD_ID)
        assert packed.input_ids.shape == packed.position_ids.shape == (packed.packed_sequences, sequence_len)
        pieces, padding, used = read_rows(packed, prefix)
        dropped, split = [], []
        for k, doc in enumerate(documents):
            ids = doc.ids.tolist()
            skip = len(prefix) if prefix and ids[: len(prefix)] == prefix else 0
            if len(ids) - skip > content and long_documents == "drop":
                dropped.append(k)
                assert k not in pieces
                continue
            if skip == len(ids):
                continue  # nothing but the prefix's tokens: nothing to place
            got = sorted(pieces.pop(k))
            assert sum((p[1] for p in got), []) == ids[skip:]  # the pieces, in order, are the document
            assert all(len(p[1]) <= content for p in got) and len(got) == -(-(len(ids) - skip) // content)
            split += [k] if len(got) > 1 else []
            at = skip
            for _, piece_ids, labels, cls in got:
                trained = doc.trained[at : at + len(piece_ids)].tolist()
                first = 0 if prefix else 1  # with no prefix the piece's first token has nothing before it
                assert labels[first:] == [t if m else IGNORE_INDEX for t, m in zip(piece_ids, trained)][first:]
                assert cls == [classes[k] if m else 0 for m in trained]
                at += len(piece_ids)
        assert not pieces  # nothing else was placed
        assert packed.dropped_tokens == sum(len(documents[k].ids) for k in dropped)
        assert (packed.dropped_documents, packed.split_documents) == (len(dropped), len(split))
        assert packed.padding_tokens == padding == int((packed.input_ids == PAD_ID).sum())
        assert packed.chats == sum(d.chat for d in documents)
        for a in range(len(used)):  # best fit: the piece that opened a later row fitted into no earlier one
            for b in range(a + 1, len(used)):
                assert used[a][0] + used[b][1] > sequence_len


def text_of(words: range) -> str:
    return " ".join(f"w{i}" for i in words)


def test_hand_layout_positions_labels_and_padding_fraction(tmp_path, tiny_tok):
    """Five documents of 10 words: BOS + 10 words + EOS each, all five in one sequence of 64 with 4 padding tokens; a
    document of 70 words (71 tokens with EOS) split into 63 + 8, or dropped."""
    short = texts(tmp_path / "short.jsonl", text_of(range(10)), 5)
    document = [BOS, *[W(i) for i in range(10)], EOS]
    train, _, stats = build(tmp_path, tiny_tok, [short], packing="documents")
    assert train.input_ids.tolist() == [document * 5 + [PAD] * 4]
    assert train.labels.tolist() == [([IGNORE_INDEX] + document[1:]) * 5 + [IGNORE_INDEX] * 4]
    assert train.position_ids.tolist() == [list(range(12)) * 5 + list(range(4))]
    assert train.padding_tokens == 4 and stats[0]["padding_fraction"] == 4 / LEN

    long = texts(tmp_path / "long.jsonl", text_of(range(70)), 1)
    tokens = [W(i) for i in range(70)] + [EOS]
    train, _, stats = build(tmp_path, tiny_tok, [long], packing="documents")
    assert sorted(train.input_ids.tolist()) == sorted([[BOS, *tokens[:63]], [BOS, *tokens[63:]] + [PAD] * (LEN - 9)])
    assert stats[0]["split_documents"] == 1 and stats[0]["padding_fraction"] == (LEN - 9) / (2 * LEN)
    train, _, stats = build(tmp_path, tiny_tok, [long, short], packing="documents", long_documents="drop")
    assert stats[0]["dropped_documents"] == 1 and stats[0]["dropped_tokens"] == 71 and stats[0]["sequences"] == 0
    assert train.input_ids.tolist() == [document * 5 + [PAD] * 4]


def test_summary_and_report_give_the_padding_fraction(tmp_path, tiny_tok, capsys):
    from lit_qlp.data.build import SUMMARY_FILE, describe

    module = make_module(tmp_path, tiny_tok, [texts(tmp_path / "a.jsonl", text_of(range(10)), 5)], packing="documents")
    module.setup("fit")
    summary = json.loads((module.locate_cache() / SUMMARY_FILE).read_text())
    assert summary["packing"] == "documents" and summary["padding_fraction"] == 4 / LEN
    assert module.train_set[0]["position_ids"].tolist() == list(range(12)) * 5 + list(range(4))
    report = describe(summary, module.locate_cache(), LEN)
    assert "5 documents packed whole" in report and "4 padding tokens (6.2% of the sequences)" in report
    concatenated = make_module(tmp_path, tiny_tok, [texts(tmp_path / "a.jsonl", text_of(range(10)), 5)])
    assert concatenated.builder().cache_key() != module.builder().cache_key()


@pytest.mark.parametrize(
    "options, named",
    [({"drop_tails": True}, "data.drop_tails=true"), ({"chat_packing": "as_text"}, "data.chat_packing=as_text")],
)
def test_documents_packing_refuses_options_that_cut_documents(tmp_path, tiny_tok, options, named):
    source = texts(tmp_path / "a.jsonl", "w1 w2", 3)
    with pytest.raises(ValueError, match=f"{named} cuts documents across sequences, which data.packing=documents"):
        make_module(tmp_path, tiny_tok, [source], packing="documents", **options)
    assert not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_packed_demo_chats_train_resume_exactly_mid_epoch_with_the_padding_counted(tmp_path):
    """The demo's chats packed on their own with the demo model (its chat template): 6 steps uninterrupted, and 3 +
    3 resumed from the step-3 checkpoint, give the same losses bit for bit; the summary's padding fraction is what
    the chats' own renderings leave of the sequences."""
    from transformers import AutoTokenizer

    from lit_qlp.data.build import SUMMARY_FILE
    from tests.runs import ROOT, run_cli, scalars

    chats = ROOT / "demo" / "chat" / "train.jsonl"
    common = [
        "fit",
        "--config",
        str(ROOT / "configs" / "demo.yaml"),
        f"--data.datasets=[{{dataset_path: {chats}}}]",
        "--data.packing=documents",
        f"--data.cache_dir={tmp_path / 'cache'}",
        "--checkpoint.every_n_train_steps=3",
    ]
    run_cli([*common, f"--trainer.default_root_dir={tmp_path / 'whole'}", "--trainer.max_steps=6"], ROOT)
    resumed = tmp_path / "resumed"
    run_cli([*common, f"--trainer.default_root_dir={resumed}", "--trainer.max_steps=3"], ROOT)
    run_cli([*common, f"--trainer.default_root_dir={resumed}", "--trainer.max_steps=6", "--ckpt_path=last"], ROOT)
    whole, parts = scalars(tmp_path / "whole", "train/loss"), scalars(resumed, "train/loss")
    assert sorted(whole) == sorted(parts) == list(range(6))
    assert [parts[s] for s in range(6)] == [whole[s] for s in range(6)]

    (cache,) = (tmp_path / "cache").iterdir()
    summary = json.loads((cache / SUMMARY_FILE).read_text())
    tokenizer = AutoTokenizer.from_pretrained(ROOT / "demo" / "model")
    records = [json.loads(line)["messages"] for line in chats.read_text().splitlines()]
    # Each chat's template rendering opens with BOS, the sequence prefix, and holds its EOS: it is its own piece.
    rendered = [tokenizer.apply_chat_template(m, tokenize=True, return_dict=True)["input_ids"] for m in records]
    assert all(ids[0] == tokenizer.bos_token_id and tokenizer.eos_token_id in ids for ids in rendered)
    tokens = summary["packed_sequences"] * 128
    assert summary["packed_sequences"] == summary["train_sequences"] + summary["eval_sequences"]
    assert summary["padding_fraction"] == pytest.approx(1 - sum(map(len, rendered)) / tokens, abs=1e-12)
    assert summary["padding_tokens"] == tokens - sum(map(len, rendered))
