"""InterruptCheckpoint's signal handling (the runs it stops and resumes are in tests/strategies/test_pipeline.py)."""

from __future__ import annotations

import signal

import pytest
import torch

from lit_qlp.callbacks.interrupt import InterruptCheckpoint, agreed_signal, exit_status


def test_exit_status_is_the_shells():
    assert exit_status(signal.SIGINT) == 130 and exit_status(signal.SIGTERM) == 143


def test_handlers_note_the_signal_a_second_ctrl_c_quits_and_the_previous_handlers_come_back():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    callback = InterruptCheckpoint()
    callback.install_handlers()
    try:
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGTERM)  # a repeated SIGTERM changes nothing
        assert callback.received == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)  # the user insists: quit without waiting for the checkpoint
        assert {s: signal.getsignal(s) for s in before} == before
    finally:
        callback.restore_handlers()
    assert {s: signal.getsignal(s) for s in before} == before
    callback = InterruptCheckpoint()
    callback.install_handlers()
    signal.raise_signal(signal.SIGINT)  # the first Ctrl-C only asks to stop after the step
    assert callback.received == signal.SIGINT
    callback.restore_handlers()
    assert {s: signal.getsignal(s) for s in before} == before


class MaxOverRanks:
    """A strategy whose other ranks hold ``others``: ``reduce(max)`` as over all processes."""

    root_device = torch.device("cpu")

    def __init__(self, *others: int) -> None:
        self.others = others

    def reduce(self, tensor: torch.Tensor, reduce_op: str) -> torch.Tensor:
        assert reduce_op == "max"
        return torch.stack([tensor, *map(torch.tensor, self.others)]).max()


def test_the_processes_agree_on_a_signal_that_reached_one_of_them():
    assert agreed_signal(MaxOverRanks(0), None) == 0
    assert agreed_signal(MaxOverRanks(0, int(signal.SIGTERM)), None) == signal.SIGTERM
    assert agreed_signal(MaxOverRanks(int(signal.SIGINT)), signal.SIGTERM) == signal.SIGTERM
