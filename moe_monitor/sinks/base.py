"""What every sink shares: a window-sized interface, and :meth:`Sink.guard` for each call it makes to the outside.

A dashboard that fails (full disk, lost connection, missing optional package) must never stop the training run
it watches. The watcher calls each sink inside its fault-isolation layer (:class:`~moe_monitor.faults.Faults`);
a sink wraps each of its own outside calls in :meth:`Sink.guard`, so one failing view (say, the histograms) leaves
the others (the scalars) working. Both report to the watcher's one :class:`~moe_monitor.faults.Faults`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pandas as pd

from moe_monitor.faults import Faults
from moe_monitor.snapshot import Snapshot


def relabel_controller_metrics(metrics: dict[str, float], layer_names: Sequence[str]) -> dict[str, float]:
    """``metrics`` with every module path inside a ``controller/...`` key replaced by the layer's ``L00`` label.

    Controllers' ``metrics()`` name their per-layer knobs by module path (``controller/bias/<path>/range``);
    every other tag uses the ``L00`` label of :func:`~moe_monitor.sinks.scalars.layer_labels`, so dashboards
    show the two side by side only after this mapping. Other keys pass through unchanged.

    Example:
        >>> names = ["blocks.0.moe.router", "blocks.1.moe.router"]
        >>> relabel_controller_metrics({"controller/bias/blocks.1.moe.router/range": 0.2,
        ...     "controller/bias/updates": 9.0, "moe/train/cv/L01": 0.1}, names)
        {'controller/bias/L01/range': 0.2, 'controller/bias/updates': 9.0, 'moe/train/cv/L01': 0.1}
    """
    from moe_monitor.sinks.scalars import layer_labels

    labels = dict(zip(layer_names, layer_labels(len(layer_names)))) if layer_names else {}
    out = {}
    for key, value in metrics.items():
        if key.startswith("controller/"):
            key = "/".join(labels.get(part, part) for part in key.split("/"))
        out[key] = value
    return out


class Sink:
    """Base class of a sink: where closed windows go. Subclasses override the hooks they need (see docs/sinks.md).

    Attributes:
        name: a short name, used in warnings (``"the <name> sink"``).
        failures: how many of this sink's guarded calls have failed.
        faults: the fault-isolation layer :meth:`guard` reports to: the sink's own until a watcher takes the
            sink, then the watcher's (one warning per kind of failure in the whole run).

    Example:
        >>> class Broken(Sink):
        ...     name = "broken"
        ...     def log_window(self, snapshot, metrics, events):
        ...         self.guard("log", lambda: 1 / 0)
        >>> import warnings
        >>> sink = Broken()
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     sink.log_window(None, {}, []); sink.log_window(None, {}, [])
        >>> len(caught), sink.failures
        (1, 2)
    """

    name = "sink"

    def __init__(self) -> None:
        self.faults = Faults()
        self.failures = 0

    def guard(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Runs ``fn(*args, **kwargs)``; on any error warns once per ``what`` (through :attr:`faults`) and returns
        ``None``, so the rest of the sink's work goes on."""
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # a dashboard fault must never reach the training loop
            self.failures += 1
            self.faults.report(f"{what} (the {self.name} sink)", err)
            return None

    def log_window(self, snapshot: Snapshot, metrics: dict[str, float], events: Sequence[Any]) -> None:
        """Sends one closed window: its snapshot, its scalar metrics and the events it raised."""

    def finish(self, layer_frame: pd.DataFrame, event_frame: pd.DataFrame) -> None:
        """Writes end-of-run views and flushes; called once when fitting ends."""
