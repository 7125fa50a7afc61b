"""pytest: the repository root holds the modules (flat layout); this file puts it on sys.path for bare `pytest`.

Fixtures
    one_thread    torch.set_num_threads(1) for the test, the previous count restored after it
"""
import pytest
import torch


@pytest.fixture
def one_thread():
    """One intra-op thread: on a shared 2-core machine two threads per process slow these steps down ~5x."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
