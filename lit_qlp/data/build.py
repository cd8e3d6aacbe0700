"""How cached token sequences are built: datasets read, tokenised, packed, shuffled, split and written to disk.

``SequenceBuilder`` holds every option the result depends on; its ``cache_key`` hashes them with the contents of
the source and tokenizer files, so any change rebuilds the cache and nothing else does. ``TextDataModule`` makes
one from its options and loads what it writes.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from lit_qlp.data.packing import Packed, pack, pack_documents, truncate_tokens
from lit_qlp.data.sources import DatasetSource, dataset_files, read_documents
from lit_qlp.data.tokenize import DocumentEncoder, TokenSpec, resolve_mask_tokens, resolve_sequence_prefix
from lit_qlp.formats.hf import TOKENIZER_FILES
from lit_qlp.kernels.fused_loss import IGNORE_INDEX

CACHE_FORMAT = "lit-qlp-data-3"  # 2: chats keep their template BOS and are kept whole; 3: packing=documents
COLUMNS = ("input_ids", "labels", "control_classes")
POSITIONS = "position_ids"  # a fourth column where documents are packed on their own
SUMMARY_FILE = "summary.json"
BUILD_INPUTS = ("datasets", "tokenizer_dir")  # what a build reads; every other field is an option


def check_build_options(
    datasets: list,
    sequence_len: int,
    eval_fraction: float,
    max_sequences: int | None,
    packing: str = "concatenate",
    drop_tails: bool = False,
    chat_packing: str = "whole",
) -> list[DatasetSource]:
    """Raises ValueError naming the ``data.*`` option and what to change for an option no build can use, and
    FileNotFoundError for a dataset path that matches no file; returns ``datasets`` as ``DatasetSource``s."""
    if packing == "documents" and (drop_tails or chat_packing != "whole"):
        option = "data.drop_tails=true" if drop_tails else f"data.chat_packing={chat_packing}"
        raise ValueError(
            f"{option} cuts documents across sequences, which data.packing=documents never does (every document goes "
            f"whole into one sequence); remove {option.split('=')[0]} or use data.packing=concatenate"
        )
    if sequence_len <= 0:
        raise ValueError(
            f"data.sequence_len={sequence_len} must be positive, a multiple of 64; try 64 or more (the default is 2048)"
        )
    if sequence_len % 64:
        suggestion = max(64, round(sequence_len / 64) * 64)
        raise ValueError(f"data.sequence_len={sequence_len} must be a multiple of 64; try {suggestion}")
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"data.eval_fraction={eval_fraction} must be in [0, 1)")
    if max_sequences is not None and max_sequences < 1:
        raise ValueError(f"data.max_sequences={max_sequences} must be positive or unset")
    if not datasets:
        raise ValueError("data.datasets is empty; list at least one {dataset_path: ...}")
    sources = [d if isinstance(d, DatasetSource) else DatasetSource(**d) for d in datasets]
    for source in sources:
        dataset_files(source)  # a path that matches nothing fails now, before anything is written
    return sources


def document_classes(documents: list, control_class: int) -> list[int]:
    """Control class of each document: the dataset's, or for class 0 +1 or -1 from a hash of the document's tokens.

    Control Adapters train both directions from unlabelled data this way; about half the documents get each sign,
    and a document keeps its sign whatever else is in the dataset.
    """
    if control_class:
        return [control_class] * len(documents)
    return [1 if hashlib.blake2b(d.ids.tobytes(), digest_size=8).digest()[0] & 1 else -1 for d in documents]


def pad_token_id(tokenizer) -> int:
    """The token id that fills the room whole chats leave in a sequence: the tokenizer's pad token, else its EOS,
    else 0. Padding has no label and follows every real token of its sequence, so no real token attends to it."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


CHAT_COUNTS = (
    "chats",
    "truncated_chats",
    "answers",
    "answers_without_prompt",
    "answers_without_prompt_as_text",
    "padding_tokens",
    "packed_sequences",
)


def chat_counts(packed: Packed) -> dict[str, int]:
    """What packing did to chats (``Packed``'s counts of the same names), for the summary."""
    return {name: int(getattr(packed, name)) for name in CHAT_COUNTS}


def document_counts(packed: Packed, sequence_len: int) -> dict[str, int | float]:
    """What ``data.packing=documents`` did (``Packed``'s counts), for the summary: documents packed, cut and left out,
    padding tokens, and ``padding_fraction``, the share of the packed sequences' tokens that is padding."""
    tokens = packed.packed_sequences * sequence_len
    return {
        "packed_documents": int(packed.documents),
        "split_documents": int(packed.split_documents),
        "dropped_documents": int(packed.dropped_documents),
        "padding_tokens": int(packed.padding_tokens),
        "packed_sequences": int(packed.packed_sequences),
        "padding_fraction": packed.padding_tokens / max(1, tokens),
    }


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file's contents, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class SequenceBuilder:
    """The options the cached sequences depend on (``TextDataModule``'s, documented there), and the build.

    Attributes:
        datasets: The dataset sources.
        tokenizer_dir: Directory of the tokenizer.
        sequence_len: Tokens per sequence.
        The others: as the ``TextDataModule`` arguments of the same names.
    """

    datasets: tuple[DatasetSource, ...]
    tokenizer_dir: Path
    sequence_len: int
    eval_fraction: float
    max_sequences: int | None
    drop_tails: bool
    chat_packing: Literal["whole", "as_text"]
    packing: Literal["concatenate", "documents"]
    long_documents: Literal["split", "drop"]
    mix_datasets: bool
    sequence_prefix: TokenSpec
    document_prefix: TokenSpec
    document_suffix: TokenSpec
    mask_tokens: bool | int | list[int] | None
    chat_labels: Literal["assistant", "all"]
    add_prefix_space: bool
    trust_remote_code: bool
    split_class_zero: bool
    seed: int

    def load_tokenizer(self):
        """The tokenizer of ``tokenizer_dir``."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.tokenizer_dir, trust_remote_code=self.trust_remote_code)

    def cache_key(self) -> str:
        """Hash of everything the cached result depends on: source contents, tokenizer files and options."""
        sources = [
            {
                "files": [[str(p), sha256_file(p)] for p in dataset_files(s)],
                "max_tokens": s.max_tokens,
                "control_class": s.control_class,
            }
            for s in self.datasets
        ]
        tokenizer = {
            name: sha256_file(Path(self.tokenizer_dir) / name)
            for name in TOKENIZER_FILES
            if (Path(self.tokenizer_dir) / name).is_file()
        }
        options = {k: v for k, v in asdict(self).items() if k not in BUILD_INPUTS}
        blob = json.dumps([CACHE_FORMAT, sources, tokenizer, options], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    def build(self) -> tuple[Packed, Packed, list[dict[str, Any]]]:
        """Reads, tokenises, packs, shuffles and splits every dataset; returns train, eval and per-dataset stats."""
        from tqdm.auto import tqdm

        tokenizer = self.load_tokenizer()
        encoder = DocumentEncoder(
            tokenizer,
            self.document_prefix,
            self.document_suffix,
            frozenset(resolve_mask_tokens(tokenizer, self.mask_tokens)),
            self.chat_labels,
            self.add_prefix_space,
        )
        prefix = resolve_sequence_prefix(tokenizer, self.sequence_prefix)
        stats, per_dataset = [], []
        for index, source in enumerate(self.datasets):
            documents = read_documents(source)
            random.Random(self.seed + index).shuffle(documents)
            encoded = []
            with tqdm(total=len(documents), desc=f"tokenising {source.dataset_path}", unit="doc") as progress:
                for start in range(0, len(documents), 1000):
                    encoded += encoder.encode_batch(documents[start : start + 1000])
                    progress.update(len(documents[start : start + 1000]))
            encoded, cut = truncate_tokens(encoded, source.max_tokens)
            if not encoded or not sum(len(d.ids) for d in encoded):
                raise ValueError(f"data.datasets: dataset_path={source.dataset_path!r} holds no tokens")
            per_dataset.append((encoded, source.control_class))
            stats.append(
                {
                    "dataset": source.dataset_path,
                    "documents": len(encoded),
                    "tokens": int(sum(len(d.ids) for d in encoded)),
                    "trained_tokens": int(sum(d.trained.sum() for d in encoded)),
                    "dropped_tokens": int(cut),
                }
            )
        per_dataset = [
            (docs, document_classes(docs, cls) if self.split_class_zero else [cls] * len(docs))
            for docs, cls in per_dataset
        ]
        if self.mix_datasets:
            pairs = [(doc, c) for docs, classes in per_dataset for doc, c in zip(docs, classes)]
            random.Random(self.seed).shuffle(pairs)
            groups = [([d for d, _ in pairs], [c for _, c in pairs])]
        else:
            groups = per_dataset
        whole_chats = self.chat_packing == "whole"
        pad_id = pad_token_id(tokenizer)

        def pack_group(docs: list, classes: list[int]) -> Packed:
            if self.packing == "documents":
                return pack_documents(docs, classes, self.sequence_len, prefix, self.long_documents, pad_id)
            return pack(docs, classes, self.sequence_len, prefix, self.drop_tails, whole_chats, pad_id)

        packed_groups = [pack_group(docs, classes) for docs, classes in groups]
        if not self.mix_datasets:
            for stat, packed in zip(stats, packed_groups):
                stat["sequences"] = len(packed.input_ids)
                stat["dropped_tokens"] += packed.dropped_tokens
                if packed.chats:
                    stat |= chat_counts(packed)
                if self.packing == "documents":
                    stat |= document_counts(packed, self.sequence_len)
        packed = Packed.concatenate(packed_groups, self.sequence_len)
        if len(packed.input_ids) == 0:
            raise ValueError(
                f"data.datasets hold fewer tokens than one sequence of data.sequence_len={self.sequence_len}"
            )
        order = np.random.default_rng(self.seed).permutation(len(packed.input_ids))
        if self.max_sequences is not None:
            order = order[: self.max_sequences]
        n = len(order)
        n_eval = min(n - 1, max(1, round(n * self.eval_fraction))) if self.eval_fraction else 0
        return packed.take(order[n_eval:]), packed.take(order[:n_eval]), stats

    def write_cache(self, path: Path) -> None:
        """Builds and writes the cache directory ``path`` (published by a rename only when complete)."""
        import datasets as hf_datasets
        import pyarrow as pa

        train, evaluation, stats = self.build()

        def table(part: Packed):
            names = COLUMNS if part.position_ids is None else (*COLUMNS, POSITIONS)
            columns = {
                name: pa.FixedSizeListArray.from_arrays(
                    pa.array(getattr(part, name).astype(np.int32).ravel()), self.sequence_len
                )
                for name in names
            }
            return hf_datasets.Dataset(pa.table(columns))

        summary = {
            "datasets": stats,
            "train_sequences": len(train.input_ids),
            "eval_sequences": len(evaluation.input_ids),
            "masked_label_fraction": float((train.labels == IGNORE_INDEX).mean()) if len(train.labels) else 0.0,
            "packing_dropped_tokens": int(train.dropped_tokens),
            "chat_packing": self.chat_packing,
            "packing": self.packing,
            **chat_counts(train),  # counted over every packed sequence, before the split
        }
        if self.packing == "documents":
            summary |= {"long_documents": self.long_documents, **document_counts(train, self.sequence_len)}
        # Write next to the final place, then rename: a crash never leaves a half-written cache behind.
        tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
        splits = hf_datasets.DatasetDict({"train": table(train), "eval": table(evaluation)})
        # One shard each: an empty evaluation split would otherwise be saved with no shard and fail to load.
        splits.save_to_disk(str(tmp), num_shards={"train": 1, "eval": 1})
        (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
        try:
            os.replace(tmp, path)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # another node published the same cache first


def describe(summary: dict[str, Any], cache_path: Path, sequence_len: int) -> str:
    """The data report printed at setup: per dataset and for the whole, from a cache's ``summary.json``."""
    lines = [f"data cache {cache_path}"]
    for s in summary["datasets"]:
        masked = 1 - s["trained_tokens"] / max(1, s["tokens"])
        sequences = f", {s['sequences']} sequences" if "sequences" in s else ""
        lines.append(
            f"  {s['dataset']}: {s['documents']} documents, {s['tokens']} tokens{sequences}, "
            f"{masked:.1%} of document tokens without labels, {s['dropped_tokens']} tokens dropped"
        )
    lines.append(
        f"  {summary['train_sequences']} training and {summary['eval_sequences']} evaluation sequences of "
        f"{sequence_len} tokens; {summary['masked_label_fraction']:.1%} of training labels masked"
    )
    if summary.get("packing") == "documents":
        lines.append("  " + describe_documents(summary, sequence_len))
    elif summary.get("chats"):
        tokens = summary["packed_sequences"] * sequence_len
        lines.append("  " + describe_chats(summary, summary["padding_tokens"] / max(1, tokens)))
    return "\n".join(lines)


def describe_documents(summary: dict[str, Any], sequence_len: int) -> str:
    """The report's line on ``data.packing=documents``: documents packed on their own, those longer than a sequence,
    and the padding."""
    s = summary
    if s["long_documents"] == "split":
        longer = f"{s['split_documents']} longer than a sequence split into pieces of at most {sequence_len} tokens"
    else:
        longer = f"{s['dropped_documents']} longer than a sequence dropped"
    return (
        f"{s['packed_documents']} documents packed whole, each attending only to itself with positions from 0 "
        f"(data.packing=documents); {longer}; {s['padding_tokens']} padding tokens ({s['padding_fraction']:.1%} of "
        "the sequences)"
    )


def describe_chats(summary: dict[str, Any], padding_fraction: float) -> str:
    """The report's line on chats: how they were packed (``padding_fraction``: the share of the packed sequences'
    tokens that is padding) and how many answers lost (or would have lost) their prompt to a sequence boundary."""
    s = summary
    answers = f"{s['answers']} answers"
    if s["chat_packing"] == "whole":
        longer = (
            f", {s['truncated_chats']} longer than a sequence cut to its first tokens" if s["truncated_chats"] else ""
        )
        return (
            f"{s['chats']} chats, each whole in one sequence{longer}; {s['padding_tokens']} padding tokens "
            f"({padding_fraction:.1%} of the sequences); packed "
            f"like text (data.chat_packing=as_text) {s['answers_without_prompt_as_text']} of the {answers} would have "
            "trained without their prompt"
        )
    return (
        f"{s['chats']} chats packed like text: {s['answers_without_prompt']} of the {answers} train in a sequence "
        "without their prompt (data.chat_packing=whole keeps each chat in one sequence)"
    )


__all__ = ["CACHE_FORMAT", "COLUMNS", "POSITIONS", "SUMMARY_FILE", "SequenceBuilder", "describe", "document_classes"]
