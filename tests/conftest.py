"""Shared test fixtures."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """One intra-op thread: bitwise-reproducible CPU kernels (resume comparisons), and tiny ops gain
    nothing from threads (on a busy machine their spin waits made runs several times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
