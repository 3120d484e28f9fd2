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
