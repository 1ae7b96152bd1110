"""Sinks a user might write, for the tests of ``sinks=`` on every front end."""

from __future__ import annotations

from typing import Any

import pandas as pd

from moe_monitor.sinks.base import Sink


class Recorder(Sink):
    """Keeps what it is sent: one row per (window, layer) and one per event, and whether ``finish`` ran."""

    name = "recorder"

    def __init__(self) -> None:
        super().__init__()
        self.windows: list[tuple[int, str, str, int, int]] = []
        self.events: list[tuple[int, str, str, str]] = []
        self.finished = False

    def log_window(self, snapshot: Any, metrics: dict[str, float], events: Any) -> None:
        for index, layer in enumerate(snapshot.layer_names):
            assignments = int(snapshot.counts[index].sum())
            self.windows.append((snapshot.step, snapshot.phase, layer, int(snapshot.tokens[index]), assignments))
        self.events += [(e.step, e.layer, e.rule, e.kind) for e in events]

    def finish(self, layer_frame: pd.DataFrame, event_frame: pd.DataFrame) -> None:
        self.finished = True


class Broken(Sink):
    """A user sink whose every call raises."""

    name = "broken"

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def log_window(self, snapshot: Any, metrics: dict[str, float], events: Any) -> None:
        self.calls += 1
        raise OSError("disk full")
