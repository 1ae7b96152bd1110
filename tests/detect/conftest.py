"""Shared fixtures of the detector, controller and scenario tests."""

from __future__ import annotations

import pytest
import torch

# Small enough that a 150-step scenario trains in about a second on one CPU core.
MICRO = dict(d_model=32, n_layers=2, n_heads=2, seq_len=32, d_expert=64)


@pytest.fixture(autouse=True)
def one_thread():
    """Training loops on one thread: the CI machine's cores are shared, and results stay reproducible."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
