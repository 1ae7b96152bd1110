"""The monitor's one fault-isolation layer: its own trouble warns once per kind and the watched run goes on.

A :class:`~moe_monitor.watcher.Watcher` runs each piece of its own work (closing a window, the detector, a
controller, a sink, saving the history) through :meth:`Faults.run`; a sink isolates each of its outside calls with
:meth:`~moe_monitor.sinks.base.Sink.guard`, which reports to the same :class:`Faults` once the watcher has taken the
sink. So one run has one record of what failed, and each kind of failure warns once, on the main process.

An error raised inside ``torch.distributed`` (a collective on a broken process group) is re-raised: a process that
carried on would leave the others waiting in their next collective.
"""

from __future__ import annotations

import os
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["Faults", "raised_in_distributed"]

_DISTRIBUTED_DIR = os.path.dirname(torch.distributed.__file__) + os.sep


def raised_in_distributed(err: BaseException) -> bool:
    """Whether ``err`` comes from ``torch.distributed`` (a broken process group), which must not be swallowed.

    Example:
        >>> raised_in_distributed(ValueError("a bug of the monitor's own"))
        False
    """
    if isinstance(err, getattr(torch.distributed, "DistError", ())):
        return True
    # Gloo reports a lost peer as a plain RuntimeError: look for a torch.distributed frame where it was raised.
    return any(f.f_code.co_filename.startswith(_DISTRIBUTED_DIR) for f, _ in traceback.walk_tb(err.__traceback__))


class Faults:
    """Runs the monitor's own work; an error warns once per kind of work (``what``) and returns ``None``.

    Args:
        loud: whether this process shows the warnings (the main process does; the others stay quiet), or a
            function that says so when asked.

    Attributes:
        failures: how many calls have failed so far.

    Example:
        >>> import warnings
        >>> faults = Faults()
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     results = [faults.run("divide", lambda: 1 / 0) for _ in range(3)]
        >>> results, faults.failures, len(caught)
        ([None, None, None], 3, 1)
        >>> str(caught[0].message)  # doctest: +ELLIPSIS
        'MoEMonitor could not divide (ZeroDivisionError: division by zero); training goes on. Further failures ...'
    """

    def __init__(self, loud: bool | Callable[[], bool] = True) -> None:
        self._loud = loud
        self._warned: set[str] = set()
        self.failures = 0

    def run(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``, or ``None`` after reporting its error (see :meth:`report`)."""
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # the monitor must never kill the run it watches
            self.report(what, err)
            return None

    def report(self, what: str, err: Exception) -> None:
        """Counts a failure of ``what``; warns the first time ``what`` fails. Re-raises a ``torch.distributed``
        error (see the module doc)."""
        if raised_in_distributed(err):
            raise err
        self.failures += 1
        if what in self._warned:
            return
        self._warned.add(what)
        if self._loud() if callable(self._loud) else self._loud:
            warnings.warn(
                f"MoEMonitor could not {what} ({type(err).__name__}: {err}); training goes on. Further failures of"
                " this kind are not reported.",
                RuntimeWarning,
                stacklevel=4,
            )
