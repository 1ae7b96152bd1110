"""Rich Weights & Biases views of each window, written to a Lightning ``WandbLogger``'s run.

Per window (``<phase>``, ``<LL>`` as in :mod:`moe_monitor.sinks.scalars`), all plotted against
``trainer/global_step`` like the logger's own scalars:

- ``moe/<phase>/expert_load/<LL>``: ``wandb.Histogram`` whose bins are the experts (edges ``e - 0.5, e + 0.5``).
- ``moe/<phase>/load_heatmap``: ``wandb.Image`` of layers x experts (needs matplotlib).
- ``moe/events``: a table of every event so far (alerts, recoveries, control events), logged again in each window
  that raised one, so a run that crashes keeps the events up to its last window.
- ``moe/status`` (run summary): ``ok`` or ``2/4 collapsed``, the worst load entropy as ``moe/worst_load_entropy``
  and the incident count as ``moe/incidents``, updated every training window.
- ``wandb.alert``: one per incident (a layer breaking, whatever number of rules it trips), titled by layer and
  phase, with ``wait_duration`` so that a layer that breaks, recovers and breaks again within it does not send a
  second e-mail (skipped in offline mode, where there is nobody to tell).

At the end of fit: one line plot per statistic with a line per layer (``moe/charts/<phase>/<stat>``, a
``wandb.plot.line_series``), and ``moe/layer_frame`` / ``moe/events`` as ``wandb.Table``.

Shape legend: ``L`` layers, ``E`` experts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from moe_monitor.incidents import Incident, IncidentTracker, progress_status
from moe_monitor.sinks.base import Sink
from moe_monitor.sinks.images import heatmap_image
from moe_monitor.sinks.scalars import layer_labels
from moe_monitor.snapshot import Snapshot

STEP_KEY = "trainer/global_step"
EVENT_TABLE_COLUMNS: tuple[str, ...] = ("step", "phase", "layer", "label", "kind", "rule", "severity", "value",
                                        "threshold", "message")
# Statistics drawn as one line plot each at the end of fit, most telling first.
CHART_STATS: tuple[str, ...] = ("load_entropy", "max_violation", "dead_experts", "dropped_fraction",
                                "top1_confidence", "router_entropy", "aux_loss", "z_loss")


def _wandb() -> Any:
    try:
        import wandb
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError('The W&B dashboards need wandb: pip install "moe-monitor[wandb]".') from err
    return wandb


def incident_alert(incident: Incident) -> tuple[str, str, str]:
    """``(title, text, level)`` of the one ``wandb.alert`` an incident sends; ``level`` is ``ERROR`` or ``WARN``.

    The title names the layer and phase only, so W&B's ``wait_duration`` (which holds back alerts with the same
    title) also holds back a second incident of the same layer within it.

    Example:
        >>> from moe_monitor.detect import CollapseEvent
        >>> i = Incident("train", "blocks.0.moe.router", "L00", 40)
        >>> i.add(CollapseEvent(40, "train", "blocks.0.moe.router", "load_entropy", 0.3, 0.6, "critical", ""))
        >>> incident_alert(i)[0], incident_alert(i)[2]
        ('MoE incident: L00 (train)', 'ERROR')
    """
    title = f"MoE incident: {incident.label} ({incident.phase})"
    text = (
        f"Step {incident.start_step} ({incident.phase}): router layer {incident.label} ({incident.layer}) broke: "
        f"{incident.summary()}. The run's moe/events table has every alert; the incident ends when all of its "
        "rules have recovered."
    )
    return title[:64], text, "ERROR" if incident.severity == "critical" else "WARN"


class WandbSink(Sink):
    """Writes histograms, heatmaps, events, status, alerts and end-of-fit charts and tables to one W&B logger.

    Args:
        logger: a ``lightning.pytorch.loggers.WandbLogger``.
        log_histograms: log the per-layer expert-load histograms.
        log_heatmaps: log the layer x expert heatmap image.
        alert_wait_s: ``wait_duration`` of each ``wandb.alert``, in seconds: no second alert with the same
            title (the same layer and phase) within it. 600: at most one e-mail per layer per ten minutes.
        max_event_rows: rows of the per-window ``moe/events`` table (the latest events); the end-of-fit table has
            them all.

    Attributes:
        alerts: ``(title, text, level)`` of each incident alert, sent or (offline) skipped.
    """

    name = "wandb"

    def __init__(
        self,
        logger: Any,
        log_histograms: bool = True,
        log_heatmaps: bool = True,
        alert_wait_s: float = 600.0,
        max_event_rows: int = 1000,
    ) -> None:
        super().__init__()
        if not alert_wait_s >= 0:
            raise ValueError(f"alert_wait_s={alert_wait_s} must be a non-negative number of seconds.")
        self.logger = logger
        self.log_histograms = log_histograms
        self.log_heatmaps = log_heatmaps
        self.alert_wait_s = alert_wait_s
        self.max_event_rows = max_event_rows
        self.tracker = IncidentTracker()
        self.alerts: list[tuple[str, str, str]] = []
        self._rows: list[list[Any]] = []
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
        update = self.tracker.update(events, snapshot.layer_names)
        payload: dict[str, Any] = {}
        if self.log_histograms:
            payload.update(self.guard("build expert-load histograms", self._histograms, wandb, snapshot, labels) or {})
        if self.log_heatmaps:
            image = self.guard("draw the expert-load heatmap", self._heatmap, wandb, snapshot, labels)
            if image is not None:
                payload[f"moe/{snapshot.phase}/load_heatmap"] = image
        if events:
            self._rows += [self._row(event) for event in events]
            table = self.guard("build the events table", self._event_table, wandb, self._rows[-self.max_event_rows :])
            if table is not None:
                payload["moe/events"] = table
        if payload:
            payload[STEP_KEY] = snapshot.step
            self.guard("log histograms, heatmaps and events", run.log, payload)
        if snapshot.phase == "train":
            self.guard("update the run summary", self._status, run, snapshot)
        for incident in update.opened:
            alert = incident_alert(incident)
            self.alerts.append(alert)
            if not getattr(run, "offline", False):
                self.guard("send an alert", self._alert, wandb, run, *alert)

    def finish(self, layer_frame: Any, event_frame: Any) -> None:
        run = self._run()
        wandb = self.guard("import wandb", _wandb)
        if run is None or wandb is None:
            return
        if layer_frame is not None and len(layer_frame):
            charts = self.guard("build the line plots", self._charts, wandb, layer_frame) or {}
            if charts:
                self.guard("log the line plots", run.log, charts)
        tables = {"moe/layer_frame": layer_frame, "moe/events": event_frame}
        for key, frame in tables.items():
            if frame is not None and len(frame):
                self.guard(f"log the {key} table", lambda k=key, f=frame: run.log({k: wandb.Table(dataframe=f)}))

    # ------------------------------------------------------------------------------------------------- parts
    def _row(self, event: Any) -> list[Any]:
        return [int(event.step), event.phase, event.layer, self.tracker.label(event.layer), event.kind, event.rule,
                event.severity, float(event.value), float(event.threshold), event.message]

    @staticmethod
    def _event_table(wandb: Any, rows: list[list[Any]]) -> Any:
        return wandb.Table(columns=list(EVENT_TABLE_COLUMNS), data=[list(row) for row in rows])

    def _status(self, run: Any, snapshot: Snapshot) -> None:
        status = progress_status(snapshot, self.tracker)
        run.summary["moe/status"] = status["moe"]
        if "moe_entropy" in status:
            run.summary["moe/worst_load_entropy"] = status["moe_entropy"]
        run.summary["moe/incidents"] = len(self.tracker.incidents)

    @staticmethod
    def _charts(wandb: Any, layer_frame: Any) -> dict[str, Any]:
        charts = {}
        order = layer_frame.drop_duplicates("layer")
        if "layer_index" in order.columns:
            order = order.sort_values("layer_index")
        names = order["layer"].tolist()
        labels = dict(zip(names, layer_labels(len(names))))
        for phase, frame in layer_frame.groupby("phase", sort=False):
            for stat in (s for s in CHART_STATS if s in frame.columns):
                if not frame[stat].notna().any():
                    continue
                groups = [frame[frame["layer"] == name].sort_values("step") for name in names]
                groups = [(name, g) for name, g in zip(names, groups) if len(g)]
                charts[f"moe/charts/{phase}/{stat}"] = wandb.plot.line_series(
                    xs=[g["step"].tolist() for _, g in groups],
                    ys=[g[stat].astype(float).tolist() for _, g in groups],
                    keys=[labels[name] for name, _ in groups],
                    title=f"{phase} {stat}, one line per layer",
                    xname="step",
                )
        return charts

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

    def _alert(self, wandb: Any, run: Any, title: str, text: str, level: str) -> None:
        run.alert(
            title=title,
            text=text,
            level=wandb.AlertLevel.ERROR if level == "ERROR" else wandb.AlertLevel.WARN,
            wait_duration=self.alert_wait_s,
        )
