"""Rich Weights & Biases views of each window, written to a Lightning ``WandbLogger``'s run.

Per window (``<phase>``, ``<LL>`` as in :mod:`moe_monitor.sinks.scalars`), all plotted against
``trainer/global_step`` like the logger's own scalars:

- ``moe/<phase>/expert_load/<LL>``: ``wandb.Histogram`` whose bins are the experts.
- ``moe/<phase>/load_heatmap``: ``wandb.Image`` of layers x experts (needs matplotlib).
- ``wandb.alert`` for each warning or critical alert (skipped in offline mode, where there is nobody to tell).

At the end of fit: ``moe/layer_frame`` and ``moe/events`` as ``wandb.Table``.

Shape legend: ``L`` layers, ``E`` experts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from moe_monitor.sinks.base import Sink
from moe_monitor.sinks.images import heatmap_image
from moe_monitor.sinks.scalars import layer_labels
from moe_monitor.snapshot import Snapshot

STEP_KEY = "trainer/global_step"


def _wandb() -> Any:
    try:
        import wandb
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError('The W&B dashboards need wandb: pip install "moe-monitor[wandb]".') from err
    return wandb


class WandbSink(Sink):
    """Writes histograms, heatmaps, alerts and end-of-fit tables to one W&B logger.

    Args:
        logger: a ``lightning.pytorch.loggers.WandbLogger``.
        log_histograms: log the per-layer expert-load histograms.
        log_heatmaps: log the layer x expert heatmap image.
    """

    name = "wandb"

    def __init__(self, logger: Any, log_histograms: bool = True, log_heatmaps: bool = True) -> None:
        super().__init__()
        self.logger = logger
        self.log_histograms = log_histograms
        self.log_heatmaps = log_heatmaps
        self._defined = False

    def _run(self) -> Any:
        run = self.guard("open the wandb run", lambda: self.logger.experiment)
        if run is not None and not self._defined:
            self._defined = True
            self.guard("define metrics", self._define_metrics, run)
        return run

    @staticmethod
    def _define_metrics(run: Any) -> None:
        run.define_metric(STEP_KEY)
        run.define_metric("moe/*", step_metric=STEP_KEY)
        run.define_metric("controller/*", step_metric=STEP_KEY)

    def log_window(self, snapshot: Snapshot, metrics: dict[str, float], events: Sequence[Any]) -> None:
        run = self._run()
        if run is None:
            return
        wandb = self.guard("import wandb", _wandb)
        if wandb is None:
            return
        labels = layer_labels(len(snapshot.layer_names))
        payload: dict[str, Any] = {}
        if self.log_histograms:
            payload.update(self.guard("build expert-load histograms", self._histograms, wandb, snapshot, labels) or {})
        if self.log_heatmaps:
            image = self.guard("draw the expert-load heatmap", self._heatmap, wandb, snapshot, labels)
            if image is not None:
                payload[f"moe/{snapshot.phase}/load_heatmap"] = image
        if payload:
            payload[STEP_KEY] = snapshot.step
            self.guard("log histograms and heatmaps", run.log, payload)
        if not getattr(run, "offline", False):
            for event in events:
                if event.kind == "alert" and event.severity in ("warning", "critical"):
                    self.guard("send an alert", self._alert, wandb, run, event)

    def finish(self, layer_frame: Any, event_frame: Any) -> None:
        run = self._run()
        wandb = self.guard("import wandb", _wandb)
        if run is None or wandb is None:
            return
        tables = {"moe/layer_frame": layer_frame, "moe/events": event_frame}
        for key, frame in tables.items():
            if frame is not None and len(frame):
                self.guard(f"log the {key} table", lambda k=key, f=frame: run.log({k: wandb.Table(dataframe=f)}))

    @staticmethod
    def _histograms(wandb: Any, snapshot: Snapshot, labels: list[str]) -> dict[str, Any]:
        histograms = {}
        for label, num_experts, counts_E in zip(labels, snapshot.num_experts, snapshot.counts.numpy()):
            edges = np.arange(num_experts + 1, dtype=np.float64) - 0.5
            histograms[f"moe/{snapshot.phase}/expert_load/{label}"] = wandb.Histogram(
                np_histogram=(counts_E[:num_experts], edges)
            )
        return histograms

    @staticmethod
    def _heatmap(wandb: Any, snapshot: Snapshot, labels: list[str]) -> Any:
        title = f"{snapshot.phase} expert load, step {snapshot.step}"
        return wandb.Image(heatmap_image(snapshot.loads, snapshot.num_experts, labels, title), caption=title)

    @staticmethod
    def _alert(wandb: Any, run: Any, event: Any) -> None:
        level = wandb.AlertLevel.ERROR if event.severity == "critical" else wandb.AlertLevel.WARN
        run.alert(
            title=f"MoE {event.rule} at layer {event.layer}"[:64],
            text=f"Step {event.step} ({event.phase}): {event.message}",
            level=level,
            wait_duration=0,
        )
