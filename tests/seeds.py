"""Seeds and thread count of the tests that judge trained outcomes, taken from the environment.

Floating-point results of training differ from CPU to CPU (vector width, BLAS kernels, thread count), so a test
that judges how a run trained must hold on other seeds and thread counts too. Two variables check that here:

- ``MOE_MONITOR_TEST_SEED_OFFSET`` (int, default 0) shifts every seed of those tests: ``seed(n)`` is
  ``n + offset``.
- ``MOE_MONITOR_TEST_THREADS`` (int, unset by default) is the intra-op thread count of every test, including those
  whose directory fixtures pin one thread (``tests/conftest.py`` applies it).

CI runs the suite once as the README says, then the trained-outcome tests again with
``MOE_MONITOR_TEST_THREADS=2 MOE_MONITOR_TEST_SEED_OFFSET=1``.
"""

from __future__ import annotations

import os


def _int_from_env(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} must be an integer; unset it to use the default.") from None


SEED_OFFSET: int = _int_from_env("MOE_MONITOR_TEST_SEED_OFFSET") or 0
THREADS: int | None = _int_from_env("MOE_MONITOR_TEST_THREADS")
if THREADS is not None and THREADS < 1:
    raise ValueError(f"MOE_MONITOR_TEST_THREADS={THREADS} must be at least 1; unset it to keep each test's own.")


def seed(n: int) -> int:
    """The ``n``-th seed of a trained-outcome test, shifted by ``MOE_MONITOR_TEST_SEED_OFFSET``."""
    return n + SEED_OFFSET


def seeds(count: int) -> list[int]:
    """The first ``count`` seeds, shifted: ``[seed(0), ..., seed(count - 1)]``."""
    return [seed(n) for n in range(count)]
