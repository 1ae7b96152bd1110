"""Shared fixtures of the detector, controller and scenario tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Training loops on one thread: the CI machine's cores are shared, and results stay reproducible.

    ``MOE_MONITOR_TEST_THREADS`` overrides it for the test itself (``tests/conftest.py``).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
