"""TextDataModule: datasets to cached, fixed-length token sequences, batched one optimizer step at a time."""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from typing_extensions import override

from lit_qlp.data.build import (
    BUILD_INPUTS,
    COLUMNS,
    POSITIONS,
    SUMMARY_FILE,
    SequenceBuilder,
    check_build_options,
    describe,
)
from lit_qlp.data.sources import DatasetSource
from lit_qlp.data.tokenize import TokenSpec

NOT_RESUMABLE_WARNING = (
    "You're resuming from a checkpoint that ended before the epoch ended and your dataloader is not resumable"
)
"""How Lightning's warning about a mid-epoch resume opens (``loops/training_epoch_loop.py``, lightning 2.6)."""


def ignore_not_resumable_warning() -> None:
    """Silences Lightning's warning that a mid-epoch resume is unreliable because the training loader is "not
    resumable", for a run whose ``TextDataModule`` restored the position itself.

    Lightning looks only at the loader (``state_dict`` / ``load_state_dict`` on it); the position here is the data
    module's state, applied to the sampler (``ResumableSampler``), so the resumed epoch continues at the exact next
    batch and the warning is wrong. The filter matches that one message only, and adding it again changes nothing.
    """
    warnings.filterwarnings("ignore", message=re.escape(NOT_RESUMABLE_WARNING), category=PossibleUserWarning)


class SequenceDataset(Dataset):
    """Fixed-length sequences (a split of the cached Arrow dataset) as dicts of int64 tensors."""

    def __init__(self, table) -> None:
        self.table = table
        self.columns = [*COLUMNS, *([POSITIONS] if POSITIONS in table.column_names else [])]

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.table[int(index)]
        return {k: torch.as_tensor(np.asarray(row[k]), dtype=torch.long) for k in self.columns}


class ResumableSampler(DistributedSampler):
    """A DistributedSampler that skips the samples already trained in the epoch a run resumes in.

    The skip applies to every pass over ``resume_epoch`` (Lightning may create an iterator more than once) and to no
    other epoch.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.resume_epoch = -1
        self.resume_samples = 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        if self.epoch == self.resume_epoch:
            indices = indices[self.resume_samples :]
        return iter(indices)


class TextDataModule(pl.LightningDataModule):
    """Turns text, records and chats into token sequences, cached on disk; one batch is one optimizer step.

    Per dataset: documents are read, shuffled (seeded), tokenised and capped at ``max_tokens``. Then text documents
    are concatenated and cut into ``sequence_len`` sequences, each opening with ``sequence_prefix``, and chats are
    put whole into sequences (``chat_packing``); or, with ``packing="documents"``, every document goes whole and on
    its own into a sequence; per dataset unless ``mix_datasets``. Each chat is its template's
    rendering token for token, the text the model sees when served (``apply_chat_template(...,
    add_generation_prompt=True)`` and the answer): a leading BOS of the template, or any document that starts with
    the ``sequence_prefix`` tokens, leaves them out only where it opens a sequence, since the prefix puts them back
    there. Sequences are shuffled, capped at ``max_sequences`` and split into train and evaluation.
    Each batch holds ``gradient_accumulation_steps`` sequences (from the PipelineStrategy), sharded by
    data-parallel replica only, so all pipeline stages of a replica see the same batch; the remainder that would
    leave a global batch incomplete is dropped. Resuming continues at the exact next batch, mid-epoch included.

    The result is cached in ``cache_dir`` under a key made of the source files' contents, the tokenizer files and
    every option here, so any change rebuilds it and nothing else does. Global rank 0 builds in ``prepare_data``,
    before Lightning's loggers and callbacks write into the run directory (a dataset that cannot be read fails
    first), while the others wait; if the cache directory is not shared between nodes, local rank 0 of each other
    node then builds its own copy in ``setup``.

    Args:
        datasets: The datasets to mix (``dataset_path``, optional ``max_tokens`` and ``control_class``).
        sequence_len: Tokens per sequence; a multiple of 64.
        eval_fraction: Fraction of the sequences held out for evaluation (0 disables evaluation).
        evals_per_epoch: Evenly spaced evaluations per epoch (sets the Trainer's ``val_check_interval``).
        eval_gradient_accumulation_steps: Sequences per evaluation batch; default: ``gradient_accumulation_steps``.
        max_sequences: Keep at most this many sequences (train and evaluation together).
        drop_tails: Drop a document's tail that does not fit into a sequence, so every sequence starts with a fresh
            document (text documents, and chats packed ``as_text``).
        chat_packing: How chat records are packed. "whole" (the default): never cut; each chat goes whole into one
            sequence, best fit (the open sequence with the least room that holds it, else a new one), and the room
            left is padding (the tokenizer's pad token, else EOS; no labels); a chat longer than a sequence gets one
            of its own and keeps its first ``sequence_len - len(sequence_prefix)`` tokens (its prompt and what fits of
            its answers; the rest is dropped and counted). "as_text": like text documents, concatenated across
            sequence boundaries (or cut by ``drop_tails``): no padding, but the part of a chat that lands in the next
            sequence trains without its prompt. The data report gives both counts: how many answers packing as
            text would have trained without their prompt, and the padding that keeping chats whole costs.
        packing: How documents share a sequence. "concatenate" (the default, for raw text): as above, text
            streamed across sequences and chats by ``chat_packing``; a document attends to the documents before it in
            its sequence and its positions continue from theirs, as in pre-training. "documents" (for instruction
            and chat data of short examples): every document, text or chat, is packed whole (best fit) as
            ``sequence_prefix`` + its tokens, exactly what the model sees of it alone; positions restart at 0 for each
            document, attention never crosses a document boundary (the model tells documents apart by those
            restarts: a block-diagonal mask on the CPU, FlexAttention with a block mask on CUDA, which skips the
            blocks between documents), the first token of a document is never predicted from the one before, and
            the room left at the end of a sequence is padding (pad token, else EOS; no labels). The data report
            gives the padding fraction. Not with ``drop_tails`` or ``chat_packing="as_text"``.
        long_documents: With ``packing="documents"``, what happens to a document longer than ``sequence_len -
            len(sequence_prefix)`` tokens: "split" (the default) cuts it into consecutive pieces of that many tokens
            (the last one shorter), each packed as a document of its own (prefix, positions from 0; a piece after
            the first sees nothing of the ones before it); "drop" leaves it out (counted in the report).
        mix_datasets: Let one sequence hold documents of several datasets.
        sequence_prefix: Tokens opening every sequence (no labels): None: BOS if the tokenizer has one; "": none;
            a string: its tokens; a token id or a list of ids.
        document_prefix: None: nothing; a string: prepended to each document's text before tokenising; an id or a
            list: prepended to its tokens.
        document_suffix: None: EOS appended if missing; "": nothing; a string: appended to the text before
            tokenising; an id or a list: appended to the tokens.
        mask_tokens: Tokens that get label -100 and control class 0: None/false: none; true: every special token;
            an id or a list of ids.
        chat_labels: For chat records ("messages" or ShareGPT "conversations", rendered with the tokenizer's chat
            template): "assistant" trains only assistant turns and their end-of-turn tokens; "all" every token.
        add_prefix_space: Put a space before each text document before tokenising, for BPE tokenizers that tokenise
            a leading word differently; chats are tokenised exactly as their template renders them.
        trust_remote_code: Allow custom tokenizer code from ``tokenizer_dir``.
        split_class_zero: Give each document of a class-0 dataset class +1 or -1 from a hash of its tokens (about
            half each), as Control Adapters train; set by the CLI from ``model.method`` (true for ControlAdapters).
        tokenizer_dir: Directory of the tokenizer; linked from ``model.model_dir`` by the CLI.
        cache_dir: Where tokenised datasets are cached; default ``~/.cache/lit-qlp/data``. Put it on a shared
            filesystem for several nodes.
        seed: Seed of the document and sequence shuffles.
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        datasets: list[DatasetSource],
        sequence_len: int = 2048,
        eval_fraction: float = 0.01,
        evals_per_epoch: int = 1,
        eval_gradient_accumulation_steps: int | None = None,
        max_sequences: int | None = None,
        drop_tails: bool = False,
        chat_packing: Literal["whole", "as_text"] = "whole",
        packing: Literal["concatenate", "documents"] = "concatenate",
        long_documents: Literal["split", "drop"] = "split",
        mix_datasets: bool = False,
        sequence_prefix: TokenSpec = None,
        document_prefix: TokenSpec = None,
        document_suffix: TokenSpec = None,
        mask_tokens: bool | int | list[int] | None = None,
        chat_labels: Literal["assistant", "all"] = "assistant",
        add_prefix_space: bool = False,
        trust_remote_code: bool = False,
        split_class_zero: bool = False,
        tokenizer_dir: Path | None = None,
        cache_dir: Path | None = None,
        seed: int = 42,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if evals_per_epoch < 1:
            raise ValueError(f"data.evals_per_epoch={evals_per_epoch} must be at least 1 (eval_fraction=0 disables)")
        if eval_gradient_accumulation_steps is not None and eval_gradient_accumulation_steps < 1:
            raise ValueError(f"data.eval_gradient_accumulation_steps={eval_gradient_accumulation_steps} must be >= 1")
        self.datasets = check_build_options(
            datasets, sequence_len, eval_fraction, max_sequences, packing, drop_tails, chat_packing
        )
        self.sequence_len = sequence_len
        self.eval_fraction = eval_fraction
        self.evals_per_epoch = evals_per_epoch
        self.eval_gradient_accumulation_steps = eval_gradient_accumulation_steps
        self.max_sequences = max_sequences
        self.drop_tails = drop_tails
        self.chat_packing = chat_packing
        self.packing = packing
        self.long_documents = long_documents
        self.mix_datasets = mix_datasets
        self.sequence_prefix = sequence_prefix
        self.document_prefix = document_prefix
        self.document_suffix = document_suffix
        self.mask_tokens = mask_tokens
        self.chat_labels = chat_labels
        self.add_prefix_space = add_prefix_space
        self.trust_remote_code = trust_remote_code
        self.split_class_zero = split_class_zero
        self.tokenizer_dir = tokenizer_dir
        self.cache_dir = Path(cache_dir) if cache_dir is not None else Path.home() / ".cache" / "lit-qlp" / "data"
        self.seed = seed
        self.num_workers = num_workers
        self.train_set: SequenceDataset | None = None
        self.eval_set: SequenceDataset | None = None
        self.cache_path: Path | None = None
        self._train_sampler: ResumableSampler | None = None
        self._resume: dict[str, int] | None = None
        self.prepare_data_per_node = False  # prepare_data on global rank 0; setup builds other nodes' copies

    def builder(self) -> SequenceBuilder:
        """The build of this module's sequences: its options, frozen."""
        if self.tokenizer_dir is None:
            raise ValueError("data.tokenizer_dir is unset; it normally follows model.model_dir")
        # Every other field of the builder is the option of the same name here.
        options = {f.name: getattr(self, f.name) for f in fields(SequenceBuilder) if f.name not in BUILD_INPUTS}
        return SequenceBuilder(tuple(self.datasets), Path(self.tokenizer_dir), **options)

    def locate_cache(self) -> Path:
        """``cache_dir / <cache key>``: where this module's sequences are cached (the key is computed once)."""
        if self.cache_path is None:
            self.cache_path = self.cache_dir / self.builder().cache_key()
        return self.cache_path

    def build_cache(self) -> None:
        """Builds the cache directory of this module's sequences unless it exists."""
        path = self.locate_cache()
        if not (path / SUMMARY_FILE).is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            self.builder().write_cache(path)

    @override
    def prepare_data(self) -> None:
        self.build_cache()

    @override
    def setup(self, stage: str) -> None:
        if self.train_set is not None:
            return
        import datasets as hf_datasets

        trainer = self.trainer
        if trainer is None or trainer.world_size == 1:
            self.build_cache()
        else:
            # Global rank 0 built in prepare_data; on nodes that do not share the cache directory, local rank 0
            # builds its copy.
            for is_builder in (trainer.global_rank == 0, trainer.local_rank == 0):
                if is_builder:
                    self.build_cache()
                trainer.strategy.barrier("lit_qlp data cache")
        path = self.locate_cache()
        splits = hf_datasets.load_from_disk(str(path))
        self.train_set = SequenceDataset(splits["train"].with_format("numpy"))
        self.eval_set = SequenceDataset(splits["eval"].with_format("numpy"))
        rank_zero_info(describe(json.loads((path / SUMMARY_FILE).read_text()), path, self.sequence_len))

    # ----------------------------------------------------------------- loading
    @property
    def micro_batches(self) -> int:
        strategy = self.trainer.strategy if self.trainer is not None else None
        return getattr(strategy, "gradient_accumulation_steps", 1)

    def _sampler(self, dataset: Dataset, shuffle: bool) -> ResumableSampler:
        kwargs = self.trainer.strategy.distributed_sampler_kwargs if self.trainer is not None else None
        kwargs = kwargs or {"num_replicas": 1, "rank": 0}
        return ResumableSampler(dataset, shuffle=shuffle, seed=self.seed, drop_last=True, **kwargs)

    @override
    def train_dataloader(self) -> DataLoader:
        sampler = self._sampler(self.train_set, shuffle=True)
        if len(sampler) < self.micro_batches:
            raise ValueError(
                f"{len(sampler)} training sequences per data-parallel replica are fewer than "
                f"gradient_accumulation_steps={self.micro_batches}; add data or lower it"
            )
        self._train_sampler = sampler
        self._apply_resume()
        return DataLoader(
            self.train_set, batch_size=self.micro_batches, sampler=sampler, drop_last=True, num_workers=self.num_workers
        )

    @override
    def val_dataloader(self) -> DataLoader | list:
        if not self.eval_set:
            return []
        return DataLoader(
            self.eval_set,
            batch_size=self.eval_gradient_accumulation_steps or self.micro_batches,
            sampler=self._sampler(self.eval_set, shuffle=False),
            num_workers=self.num_workers,
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        if self.trainer is None:
            return {}
        # The epoch in progress and how many of its batches have trained; a resumed run skips exactly those.
        loop = self.trainer.fit_loop
        return {
            "epoch": loop.epoch_progress.current.started - 1,
            "batches": loop.epoch_loop.batch_progress.current.processed,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume = dict(state_dict) if state_dict else None
        if self._resume is not None:
            ignore_not_resumable_warning()
        # The loader may already exist (Lightning builds it early for estimated_stepping_batches); its sampler
        # reads the position lazily, when the epoch's iteration starts.
        self._apply_resume()

    def _apply_resume(self) -> None:
        if self._resume is not None and self._train_sampler is not None:
            self._train_sampler.resume_epoch = self._resume["epoch"]
            self._train_sampler.resume_samples = self._resume["batches"] * self.micro_batches
