"""One fault-isolation layer: a sink's guarded calls and the watcher's own work report to the same record."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from moe_monitor import Watcher
from moe_monitor.reference import MoEConfig, MoETransformer
from moe_monitor.sinks.base import Sink


class HalfBroken(Sink):
    """Its upload fails every window; its other view keeps working."""

    name = "half"

    def __init__(self) -> None:
        super().__init__()
        self.kept: list[int] = []

    def log_window(self, snapshot: Any, metrics: dict[str, float], events: Any) -> None:
        self.guard("upload the table", self._upload)
        self.kept.append(snapshot.step)

    @staticmethod
    def _upload() -> None:
        raise ConnectionError("offline")


def test_guarded_failures_warn_once_per_run_and_the_rest_of_the_sink_goes_on() -> None:
    torch.manual_seed(0)
    model = MoETransformer(MoEConfig(d_model=16, n_layers=1, n_heads=2, n_experts=4, top_k=2, d_expert=16))
    sink = HalfBroken()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Watcher(model, log_every=1, sinks=[sink], console=False) as watcher:
            for step in range(1, 4):
                model(torch.randint(0, 256, (2, 8)))
                watcher.step(step)
    assert sink.faults is watcher.faults  # the watcher's one layer
    assert sink.kept == [1, 2, 3] and sink.failures == 3 and watcher.faults.failures == 3
    messages = [str(w.message) for w in caught if "offline" in str(w.message)]
    assert messages == [
        "MoEMonitor could not upload the table (the half sink) (ConnectionError: offline); training goes on. Further"
        " failures of this kind are not reported."
    ]
