"""ResumableSampler and the exact mid-epoch resume of the training loader."""

from __future__ import annotations

import warnings

import pytest
from torch.utils.data import DistributedSampler

from lit_qlp.data.text import ResumableSampler
from tests.data.helpers import make_module, one_row_documents

# ----------------------------------------------------------------------------------------------------- sampler


def test_resumable_sampler_skips_every_pass_of_the_resume_epoch():
    dataset = list(range(37))
    for num_replicas, rank, shuffle in [(1, 0, True), (2, 1, True), (3, 0, True), (1, 0, False)]:
        kwargs = dict(num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=5, drop_last=shuffle)
        reference = DistributedSampler(dataset, **kwargs)
        epochs = {}
        for epoch in range(4):
            reference.set_epoch(epoch)
            epochs[epoch] = list(reference)
        if shuffle:
            assert epochs[0] != epochs[1]
        for resume_epoch in (0, 2):
            for skip in (0, 1, 5, len(epochs[resume_epoch]) - 1, len(epochs[resume_epoch])):
                sampler = ResumableSampler(dataset, **kwargs)
                sampler.resume_epoch = resume_epoch
                sampler.resume_samples = skip
                sampler.set_epoch(resume_epoch)
                assert list(sampler) == epochs[resume_epoch][skip:]
                assert list(sampler) == epochs[resume_epoch][skip:]  # Lightning may iterate an epoch twice
                for other in range(4):
                    if other != resume_epoch:
                        sampler.set_epoch(other)
                        assert list(sampler) == epochs[other]
                sampler.set_epoch(resume_epoch)
                assert list(sampler) == epochs[resume_epoch][skip:]


def test_resumable_sampler_without_resume_is_distributed_sampler():
    dataset = list(range(23))
    for epoch in range(3):
        ours = ResumableSampler(dataset, num_replicas=2, rank=0, shuffle=True, seed=1)
        theirs = DistributedSampler(dataset, num_replicas=2, rank=0, shuffle=True, seed=1)
        ours.set_epoch(epoch)
        theirs.set_epoch(epoch)
        assert list(ours) == list(theirs)


def test_train_dataloader_resumes_in_the_resume_epoch(tmp_path, tiny_tok):
    source, _ = one_row_documents(tmp_path, 11)
    dm = make_module(tmp_path, tiny_tok, [source], drop_tails=True, eval_fraction=0.1)
    assert dm.state_dict() == {}  # no trainer: nothing to save
    dm.setup("fit")
    epochs = []
    for epoch in range(2):
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        epochs.append([batch["input_ids"].tolist() for batch in loader])
    assert len(epochs[0]) == 10 and sorted(epochs[0]) == sorted(epochs[1]) and epochs[0] != epochs[1]
    assert len(dm.val_dataloader()) == 1

    def batches(loader, epoch: int) -> list:
        loader.sampler.set_epoch(epoch)
        return [batch["input_ids"].tolist() for batch in loader]

    early = dm.train_dataloader()  # Lightning may build the loader before it restores the data position
    dm.load_state_dict({"epoch": 1, "batches": 4})
    assert (early.sampler.resume_epoch, early.sampler.resume_samples) == (1, 4)
    assert batches(early, 1) == epochs[1][4:] and batches(early, 1) == epochs[1][4:]
    later = dm.train_dataloader()  # and again after it
    assert batches(later, 1) == epochs[1][4:]
    assert batches(later, 0) == epochs[0]  # other epochs are whole
    dm.load_state_dict({})
    assert batches(dm.train_dataloader(), 1) == epochs[1]


# ----------------------------------------------------------------------------------------------------- resume


@pytest.mark.usefixtures("clean_process_state")
def test_mid_epoch_resume_has_no_not_resumable_warning(tiny_model, corpus, tmp_path, monkeypatch):
    """A run stopped mid-epoch resumes at the next batch through the data module's state, so Lightning's warning
    that the loader is "not resumable" (it checks only the loader) must not appear."""
    from lit_qlp.cli import main
    from tests.runs import ROOT, fit_args

    monkeypatch.chdir(ROOT)
    model_dir, root = tiny_model("llama"), tmp_path / "run"
    # A checkpoint saved after a batch, as the periodic ones are (one saved at an epoch's end starts a new epoch).
    common = ["--trainer.enable_progress_bar=false", "--checkpoint.every_n_train_steps=2"]
    common += ["--checkpoint.save_on_epoch_end=false", "--data.evals_per_epoch=1", f"--data.cache_dir={tmp_path}/c"]
    main(fit_args(model_dir, corpus, root, "--trainer.max_steps=2", *common))
    assert (root / "checkpoints" / "last.ckpt").resolve().name == "epoch=0-step=2.ckpt"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(fit_args(model_dir, corpus, root, "--trainer.max_steps=3", "--ckpt_path=last", *common))
    assert not [str(w.message) for w in caught if "not resumable" in str(w.message)]


def test_the_silenced_warning_is_lightnings():
    """The filter matches the text Lightning's epoch loop warns with (adjacent literals are one constant)."""
    from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop

    from lit_qlp.data.text import NOT_RESUMABLE_WARNING

    constants = _TrainingEpochLoop.reset.__code__.co_consts
    assert any(isinstance(c, str) and c.startswith(NOT_RESUMABLE_WARNING) for c in constants)
