"""Documents to tokens: prefixes, suffixes, chat templates and label masks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

TokenSpec = str | int | list[int] | None
"""A token option: None (the default behaviour), a string (text, or "" for nothing), a token id, or ids."""


@dataclass(frozen=True)
class Encoded:
    """One tokenised document: ``ids``, ``trained`` (whether each token carries a label) and whether it is a chat
    (rendered with the chat template, kept whole by the default packing)."""

    ids: np.ndarray
    trained: np.ndarray
    chat: bool = False


def _ids(value: int | Sequence[int]) -> list[int]:
    return [int(value)] if isinstance(value, int) else [int(v) for v in value]


def resolve_sequence_prefix(tokenizer, sequence_prefix: TokenSpec) -> list[int]:
    """Token ids put at the start of every sequence: None -> [BOS] if the tokenizer has one; "" -> none;
    a string -> its tokens; an id or a list -> those ids."""
    if sequence_prefix is None:
        return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    if isinstance(sequence_prefix, str):
        return tokenizer(sequence_prefix, add_special_tokens=False)["input_ids"] if sequence_prefix else []
    return _ids(sequence_prefix)


def resolve_mask_tokens(tokenizer, mask_tokens: bool | int | list[int] | None) -> set[int]:
    """The ids whose tokens get no label: None/False -> none; True -> every special token; an id or a list."""
    if mask_tokens is None or mask_tokens is False:
        return set()
    if mask_tokens is True:
        return set(tokenizer.all_special_ids)
    return set(_ids(mask_tokens))


@dataclass(frozen=True)
class DocumentEncoder:
    """Tokenises documents with the data module's options.

    Attributes:
        tokenizer: A fast Hugging Face tokenizer.
        document_prefix: None: nothing; a string: prepended to the text before tokenising; an id or ids: prepended
            to the tokens.
        document_suffix: None: EOS appended unless the document already ends with it (a chat: unless its rendering
            holds an EOS anywhere, since templates end turns themselves); "": nothing; a string: appended to the
            text before tokenising; an id or ids: appended to the tokens.
        mask_ids: Token ids that carry no label.
        chat_labels: "assistant": in chats only assistant turns (with their end-of-turn tokens) carry labels;
            "all": every token does.
        add_prefix_space: Put a space before each text document (unless it starts with one); chats are tokenised
            exactly as the template renders them.
    """

    tokenizer: object
    document_prefix: TokenSpec
    document_suffix: TokenSpec
    mask_ids: frozenset[int]
    chat_labels: Literal["assistant", "all"]
    add_prefix_space: bool = False

    def encode_batch(self, documents: Sequence[str | list[dict[str, str]]]) -> list[Encoded]:
        texts = [d for d in documents if isinstance(d, str)]
        text_ids = iter(self._tokenize([self._wrap_text(t) for t in texts]) if texts else [])
        out = []
        for doc in documents:
            if isinstance(doc, str):
                ids = next(text_ids)
                out.append(self._finish(ids, [True] * len(ids)))
            else:
                out.append(self._encode_chat(doc))
        return out

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def _wrap_text(self, text: str, chat: bool = False) -> str:
        prefix = self.document_prefix if isinstance(self.document_prefix, str) else ""
        suffix = self.document_suffix if isinstance(self.document_suffix, str) else ""
        text = prefix + text + suffix
        return " " + text if self.add_prefix_space and not chat and not text.startswith(" ") else text

    def _finish(self, ids: list[int], trained: list[bool], chat: bool = False) -> Encoded:
        if self.document_prefix is not None and not isinstance(self.document_prefix, str):
            extra = _ids(self.document_prefix)
            ids, trained = extra + ids, [True] * len(extra) + trained
        if self.document_suffix is None:
            eos = self.tokenizer.eos_token_id
            # A chat template ends turns itself (often "EOS\n"): add EOS only if the rendered chat has none.
            missing = eos not in ids if chat else (not ids or ids[-1] != eos)
            if eos is not None and missing:
                ids, trained = ids + [eos], trained + [True]
        elif not isinstance(self.document_suffix, str):
            extra = _ids(self.document_suffix)
            ids, trained = ids + extra, trained + [True] * len(extra)
        ids_array = np.asarray(ids, dtype=np.int64)
        trained_array = np.asarray(trained, dtype=bool)
        if self.mask_ids:
            trained_array &= ~np.isin(ids_array, list(self.mask_ids))
        return Encoded(ids_array, trained_array, chat)

    def _encode_chat(self, messages: list[dict[str, str]]) -> Encoded:
        """Renders the chat with the tokenizer's template; labels on assistant turns and their end-of-turn tokens.

        Each assistant turn's text is found by rendering the conversation up to the turn (with the generation
        prompt) and up to its end: the template must render earlier turns identically in both, which chat
        templates do. The rendering is kept whole, the template's own leading BOS included: the packer drops that
        token only where the sequence prefix puts it back (a chat opening a sequence), so every chat reads as the
        model sees it when served.
        """
        tok = self.tokenizer
        render = tok.apply_chat_template
        text = render(messages, tokenize=False)
        spans = []
        if self.chat_labels == "assistant":
            for i, message in enumerate(messages):
                if message["role"] != "assistant":
                    continue
                before = render(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
                through = render(messages[: i + 1], tokenize=False)
                if not (text.startswith(through) and through.startswith(before)):
                    raise ValueError(
                        "the tokenizer's chat template does not render earlier turns identically when later turns "
                        "are added, so assistant turns cannot be located; use chat_labels='all'"
                    )
                spans.append((len(before), len(through)))
        wrapped = self._wrap_text(text, chat=True)
        shift = len(wrapped) - len(text) - (len(self.document_suffix) if isinstance(self.document_suffix, str) else 0)
        spans = [(start + shift, end + shift) for start, end in spans]
        text = wrapped
        encoding = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
        if self.chat_labels == "all":
            trained = [True] * len(ids)
        else:
            trained = [any(start <= a < end for start, end in spans) for a, _ in offsets]
        return self._finish(ids, trained, chat=True)
