"""Settings of the whole test suite: seed offset and thread count from the environment, each test in its tmp_path.

See ``tests/seeds.py`` for ``MOE_MONITOR_TEST_SEED_OFFSET`` and ``MOE_MONITOR_TEST_THREADS``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from seeds import SEED_OFFSET, THREADS

# --doctest-modules would import the conftest.py files once more as test modules, all named "conftest" ("import file
# mismatch" as soon as two directories are collected in one run); they have no doctests.
collect_ignore = ["conftest.py"]
collect_ignore_glob = ["*/conftest.py"]


def pytest_configure(config: pytest.Config) -> None:
    if THREADS is not None:
        torch.set_num_threads(THREADS)


def pytest_report_header(config: pytest.Config) -> str:
    threads = THREADS if THREADS is not None else "each test's own"
    return f"moe_monitor: seed offset {SEED_OFFSET}, torch threads {threads}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    # After the fixtures' set-up, so the requested count also wins over a directory fixture that pins one thread;
    # those fixtures restore their previous count at teardown.
    if THREADS is not None:
        torch.set_num_threads(THREADS)
    return (yield)


@pytest.fixture(autouse=True)
def _run_in_tmp_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Runs every test in its own ``tmp_path``: whatever it writes to the current directory lands there.

    A trainer without a logger writes under its ``default_root_dir``, the current directory by default. W&B runs
    offline (no network, nothing to log in to) and keeps its files in the test's folder too, whatever the
    environment says; subprocesses inherit both.
    """
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))


@pytest.fixture
def seed_offset() -> int:
    """``MOE_MONITOR_TEST_SEED_OFFSET``: what every trained-outcome test adds to its seeds."""
    return SEED_OFFSET
