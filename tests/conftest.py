"""Shared test setup."""

import pytest
import torch

from fdfo.threads import single_thread_if_tiny


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The suite's models are tiny: one CPU thread unless OMP_NUM_THREADS is set (fdfo/threads.py; on two, often
    shared, cores torch's threads fight each other and the tests run several times slower). The OMP_NUM_THREADS=1 it
    sets is inherited by the suite's subprocesses."""
    before = torch.get_num_threads()
    single_thread_if_tiny(True)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def no_reward_curve(monkeypatch):
    """For a long in-process run whose test does not look at reward_curve.png: the run redraws that picture from
    log.jsonl at every epoch and evaluation (0.3 to 0.6 s each on the suite's CPUs, a matplotlib figure). What it
    draws is checked by tests/test_plots.py; that a run draws it, by tests/test_cli.py and tests/test_train.py; runs of
    every algorithm, with held-out records, still draw it in the other tests."""
    from fdfo import runlog

    monkeypatch.setattr(runlog.RunLogger, "draw_curve", lambda self: None)
