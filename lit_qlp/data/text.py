"""TextDataModule: text files to fixed-length token sequences, batched one optimizer step at a time."""

from __future__ import annotations

import glob
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from typing_extensions import override

SUFFIXES = (".txt", ".json", ".jsonl")


@dataclass
class DatasetSource:
    """One dataset of the mix.

    Attributes:
        dataset_path: A file or a glob pattern. ``.txt``: the whole file is one document; ``.jsonl``: one JSON
            object with a "text" field per line; ``.json``: a list of such objects (or one).
    """

    dataset_path: str


def dataset_files(source: DatasetSource) -> list[Path]:
    """The files that ``source.dataset_path`` names, sorted.

    Raises:
        FileNotFoundError: if the path or pattern matches no file.
    """
    paths = sorted(glob.glob(source.dataset_path, recursive=True)) or (
        [source.dataset_path] if Path(source.dataset_path).is_file() else []
    )
    if not paths:
        raise FileNotFoundError(f"data.datasets: dataset_path={source.dataset_path!r} matches no file")
    return [Path(p) for p in paths]


def _json(text: str, path: Path, line: int | None = None):
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        where = f"{path}, line {line}" if line is not None else str(path)
        raise ValueError(f"{where}: invalid JSON ({err.msg} at column {err.colno}); fix or remove it") from None


def read_documents(source: DatasetSource) -> list[str]:
    """The documents of ``source``, in file order.

    Raises:
        FileNotFoundError: if the path or pattern matches no file.
        ValueError: naming the file and line of a record without a string "text" field, or an unknown suffix.
    """
    documents: list[str] = []
    for path in dataset_files(source):
        if path.suffix not in SUFFIXES:
            raise ValueError(f"data.datasets: {path} has suffix {path.suffix!r}; supported are {', '.join(SUFFIXES)}")
        if path.suffix == ".txt":
            documents.append(path.read_text(encoding="utf-8"))
            continue
        if path.suffix == ".jsonl":
            lines = path.read_text(encoding="utf-8").splitlines()
            records = [(n, _json(line, path, n)) for n, line in enumerate(lines, 1) if line.strip()]
        else:
            data = _json(path.read_text(encoding="utf-8"), path)
            records = list(enumerate(data if isinstance(data, list) else [data], 1))
        for n, record in records:
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise ValueError(f"{path}: record {n} has no string field 'text'")
            documents.append(text)
    return documents


def pack_sequences(documents: list[list[int]], sequence_len: int) -> torch.Tensor:
    """Concatenates token lists and cuts them into ``[n, sequence_len]`` rows; the partial tail is dropped."""
    flat = [t for doc in documents for t in doc]
    n = len(flat) // sequence_len
    return torch.tensor(flat[: n * sequence_len], dtype=torch.long).view(n, sequence_len)


class SequenceDataset(Dataset):
    """Fixed-length token sequences; labels equal the inputs (the model shifts them)."""

    def __init__(self, sequences: torch.Tensor) -> None:
        self.sequences = sequences

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.sequences[index]
        return {"input_ids": ids, "labels": ids.clone(), "control_classes": torch.zeros_like(ids)}


class ResumableSampler(DistributedSampler):
    """A DistributedSampler that can start its next pass part-way through an epoch, for exact mid-epoch resume."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.resume_epoch = -1
        self.resume_samples = 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        if self.epoch == self.resume_epoch:
            indices = indices[self.resume_samples :]
        self.resume_epoch = -1
        return iter(indices)


class TextDataModule(pl.LightningDataModule):
    """Tokenises text datasets into ``sequence_len`` token sequences; one batch is one optimizer step.

    Documents are tokenised without special tokens, end with the EOS token, are shuffled (seeded), concatenated and
    cut into sequences. A fraction of the sequences is held out for evaluation. Each batch holds
    ``gradient_accumulation_steps`` sequences (taken from the PipelineStrategy), sharded by data-parallel replica
    only, so all pipeline stages of a replica see the same batch. Resuming from a checkpoint continues at the
    exact next batch of the interrupted epoch.

    Args:
        datasets: The datasets to mix.
        sequence_len: Tokens per sequence; a multiple of 64.
        eval_fraction: Fraction of the sequences held out for evaluation (0 disables evaluation).
        tokenizer_dir: Directory of the tokenizer; linked from ``model.model_dir`` by the CLI.
        seed: Seed of the document and sequence shuffles.
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        datasets: list[DatasetSource],
        sequence_len: int = 2048,
        eval_fraction: float = 0.01,
        tokenizer_dir: Path | None = None,
        seed: int = 42,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if sequence_len <= 0 or sequence_len % 64:
            suggestion = max(64, round(sequence_len / 64) * 64)
            raise ValueError(f"data.sequence_len={sequence_len} must be a multiple of 64; try {suggestion}")
        if not 0 <= eval_fraction < 1:
            raise ValueError(f"data.eval_fraction={eval_fraction} must be in [0, 1)")
        if not datasets:
            raise ValueError("data.datasets is empty; list at least one {dataset_path: ...}")
        self.datasets = [d if isinstance(d, DatasetSource) else DatasetSource(**d) for d in datasets]
        for source in self.datasets:
            dataset_files(source)  # a path that matches nothing fails now, before anything is written
        self.sequence_len = sequence_len
        self.eval_fraction = eval_fraction
        self.tokenizer_dir = tokenizer_dir
        self.seed = seed
        self.num_workers = num_workers
        self.train_set: SequenceDataset | None = None
        self.eval_set: SequenceDataset | None = None
        self._train_sampler: ResumableSampler | None = None
        self._resume: dict[str, int] | None = None

    @property
    def micro_batches(self) -> int:
        strategy = self.trainer.strategy if self.trainer is not None else None
        return getattr(strategy, "gradient_accumulation_steps", 1)

    @override
    def setup(self, stage: str) -> None:
        if self.train_set is not None:
            return
        from transformers import AutoTokenizer

        if self.tokenizer_dir is None:
            raise ValueError("data.tokenizer_dir is unset; it normally follows model.model_dir")
        tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_dir)
        if tokenizer.eos_token_id is None:
            raise ValueError(f"the tokenizer in {self.tokenizer_dir} has no EOS token to end documents with")
        documents = [doc for source in self.datasets for doc in read_documents(source)]
        random.Random(self.seed).shuffle(documents)
        tokens = tokenizer(documents, add_special_tokens=False)["input_ids"]
        eos = tokenizer.eos_token_id
        tokens = [ids + [eos] if not ids or ids[-1] != eos else ids for ids in tokens]
        sequences = pack_sequences(tokens, self.sequence_len)
        if len(sequences) == 0:
            raise ValueError(
                f"data.datasets hold {sum(map(len, tokens))} tokens, less than one sequence of "
                f"data.sequence_len={self.sequence_len}"
            )
        order = torch.randperm(len(sequences), generator=torch.Generator().manual_seed(self.seed))
        sequences = sequences[order]
        n_eval = (
            min(len(sequences) - 1, max(1, round(len(sequences) * self.eval_fraction))) if self.eval_fraction else 0
        )
        self.eval_set = SequenceDataset(sequences[:n_eval])
        self.train_set = SequenceDataset(sequences[n_eval:])

    def _sampler(self, dataset: Dataset, shuffle: bool) -> ResumableSampler:
        kwargs = self.trainer.strategy.distributed_sampler_kwargs if self.trainer is not None else None
        kwargs = kwargs or {"num_replicas": 1, "rank": 0}
        return ResumableSampler(dataset, shuffle=shuffle, seed=self.seed, drop_last=shuffle, **kwargs)

    @override
    def train_dataloader(self) -> DataLoader:
        self._train_sampler = self._sampler(self.train_set, shuffle=True)
        if len(self._train_sampler) < self.micro_batches:
            raise ValueError(
                f"{len(self._train_sampler)} training sequences per data-parallel replica are fewer than "
                f"gradient_accumulation_steps={self.micro_batches}; add data or lower it"
            )
        if self._resume is not None:
            self._train_sampler.resume_epoch = self._resume["epoch"]
            self._train_sampler.resume_samples = self._resume["batches"] * self.micro_batches
            self._resume = None
        return DataLoader(
            self.train_set,
            batch_size=self.micro_batches,
            sampler=self._train_sampler,
            drop_last=True,
            num_workers=self.num_workers,
        )

    @override
    def val_dataloader(self) -> DataLoader | list:
        if not self.eval_set:
            return []
        return DataLoader(
            self.eval_set,
            batch_size=self.micro_batches,
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
