"""Shared test setup."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """One intra-op thread: on two (often shared) cores, torch's threads fight each other and the tiny models of the
    tests run several times slower. Subprocess tests set OMP_NUM_THREADS=1 for the same reason."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
