"""Rich TensorBoard views of each window, written beside a Lightning ``TensorBoardLogger``'s run.

Per window (``<phase>``, ``<LL>`` as in :mod:`moe_monitor.sinks.scalars`):

- ``moe/<phase>/expert_load/<LL>`` histogram with one bucket per expert, ``[e - 0.5, e + 0.5]`` with expert
  ``e``'s assignment count, so the HISTOGRAMS tab reads expert ids on its axis and shows load drift over steps.
- ``moe/<phase>/load_heatmap`` image: layers x experts (needs matplotlib).
- ``moe/events`` text: one markdown line per alert, recovery or control event.
- One colour per layer: TensorBoard colours a chart's lines by *run*, never by tag (its custom-scalars charts
  name a line ``tag (run)`` and take the colour from the run), so each layer's statistics are also written to its
  own run ``<log_dir>/layers/<LL>`` under the tag ``moe/<phase>/<stat>``, with the detector's alert threshold
  for that layer as ``moe/<phase>/threshold/<stat>`` and its controller knobs as ``controller/<name>/<knob>``.
  In the SCALARS tab ``moe/train/load_entropy`` then shows one line per layer, each in the layer's colour, and the
  run selector toggles layers.

A custom-scalars layout (CUSTOM SCALARS tab), written at the first window and whenever a new phase or controller
metric appears: first ``moe/<phase>: at a glance`` (the across-layer summaries with the thresholds), then
``moe/<phase>: per layer`` (one chart per statistic, a line per layer and its threshold), then ``controllers``.

Shape legend: ``L`` layers, ``E`` experts.
"""

from __future__ import annotations

import os
import re
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np

from moe_monitor.incidents import alert_thresholds
from moe_monitor.sinks.base import Sink, relabel_controller_metrics
from moe_monitor.sinks.images import heatmap_image
from moe_monitor.sinks.scalars import SUMMARY_NAMES, layer_labels, summary_key
from moe_monitor.snapshot import STAT_NAMES, Snapshot

# Layout state of each logger: phases and controller charts, in the order first logged. Kept per logger, not per
# sink: the callback makes new sinks at every setup, and a test run after fit must extend the fit's layout.
_LAYOUTS: weakref.WeakKeyDictionary[Any, dict[str, list[str]]] = weakref.WeakKeyDictionary()

LAYER_RUNS = "layers"

# Chart titles of the CUSTOM SCALARS tab, most telling first: how to read each line at a glance.
CHART_TITLES: dict[str, str] = {
    "load_entropy": "load_entropy (1 = balanced, 0 = one expert; flat line: alert threshold)",
    "max_violation": "max_violation (busiest expert / mean - 1)",
    "dead_experts": "dead_experts (unused in the window)",
    "top1_confidence": "top1_confidence (mean top-1 router probability)",
    "router_entropy": "router_entropy (1 = uniform router)",
    "aux_loss": "aux_loss (= top_k when balanced)",
    "z_loss": "z_loss (router logit size)",
    "dropped_fraction": "dropped_fraction (over capacity)",
    "cv": "cv (std / mean of counts)",
    "gini": "gini (0 = equal counts)",
}
# The statistic whose threshold each across-layer summary is judged against.
_SUMMARY_STAT = {"min_load_entropy": "load_entropy", "max_max_violation": "max_violation",
                 "dropped_fraction": "dropped_fraction"}


def layer_tag(phase: str, stat: str) -> str:
    """Tag of a statistic in each layer's own run (``<log_dir>/layers/<LL>``).

    Example:
        >>> layer_tag("train", "load_entropy")
        'moe/train/load_entropy'
    """
    return f"moe/{phase}/{stat}"


def threshold_tag(phase: str, stat: str) -> str:
    """Tag of a statistic's alert threshold in each layer's own run.

    Example:
        >>> threshold_tag("train", "max_violation")
        'moe/train/threshold/max_violation'
    """
    return f"moe/{phase}/threshold/{stat}"


def _exact(tag: str) -> str:
    return f"^{re.escape(tag)}$"


def custom_scalars_layout(
    phases: Sequence[str] = ("train", "val", "test"), controller_tags: Sequence[str] = ()
) -> dict[str, dict[str, list[Any]]]:
    """The CUSTOM SCALARS layout: summaries first, then one chart per statistic (a line per layer), controllers.

    Args:
        phases: the phases to chart, in order (the sink passes those logged so far).
        controller_tags: controller tags to chart, e.g. ``controller/bias/range`` (per layer, in the layer runs)
            or ``controller/aux_loss/max_coef``.

    Example:
        >>> layout = custom_scalars_layout(["train"], ["controller/bias/range"])
        >>> list(layout)
        ['moe/train: at a glance (all layers)', 'moe/train: per layer (one colour per layer)', 'controllers']
        >>> layout["moe/train: at a glance (all layers)"]["min_load_entropy"]
        ['Multiline', ['^moe/train/all/min_load_entropy$', '^moe/train/threshold/load_entropy$']]
        >>> layout["controllers"]["controller/bias/range"]
        ['Multiline', ['^controller/bias/range$']]
    """
    order = [stat for stat in CHART_TITLES if stat in STAT_NAMES] + [s for s in STAT_NAMES if s not in CHART_TITLES]
    layout: dict[str, dict[str, list[Any]]] = {}
    for phase in phases:
        glance = {}
        for name in SUMMARY_NAMES:
            tags = [_exact(summary_key(phase, name))]
            if name in _SUMMARY_STAT:
                tags.append(_exact(threshold_tag(phase, _SUMMARY_STAT[name])))
            glance[name] = ["Multiline", tags]
        layout[f"moe/{phase}: at a glance (all layers)"] = glance
    for phase in phases:
        layout[f"moe/{phase}: per layer (one colour per layer)"] = {
            CHART_TITLES.get(stat, stat): [
                "Multiline", [_exact(layer_tag(phase, stat)), _exact(threshold_tag(phase, stat))]
            ]
            for stat in order
        }
    if controller_tags:
        layout["controllers"] = {tag: ["Multiline", [_exact(tag)]] for tag in controller_tags}
    return layout


def event_markdown(event: Any) -> str:
    """One event as a markdown line for the TEXT tab (the fields of ``moe_monitor.detect.CollapseEvent``).

    Example:
        >>> from moe_monitor.detect import CollapseEvent
        >>> event = CollapseEvent(30, "train", "L00", "load_entropy", 0.35, 0.6, "critical", "router collapse.")
        >>> print(event_markdown(event))
        **critical** alert `load_entropy` at step 30 (train), layer `L00`: value 0.35 vs threshold 0.6. router collapse.
    """
    experts = ", ".join(str(e) for e in getattr(event, "experts", ()) or ())
    return (
        f"**{event.severity}** {event.kind} `{event.rule}` at step {event.step} ({event.phase}), layer "
        f"`{event.layer}`: value {event.value:.4g} vs threshold {event.threshold:.4g}"
        + (f", experts [{experts}]" if experts else "")
        + f". {event.message}"
    )


def expert_histogram_summary(tag: str, counts_E: Sequence[int]) -> Any:
    """A TensorBoard histogram summary with bucket ``[e - 0.5, e + 0.5]`` holding ``counts_E[e]``.

    Written in the histogram plugin's own ``[k, 3]`` (left edge, right edge, count) format, so every expert keeps
    its bucket, the empty ones at either end included (the legacy format loses those and their axis positions).

    Example:
        >>> value = expert_histogram_summary("h", [3, 0, 1]).value[0]
        >>> from tensorboard.util import tensor_util
        >>> tensor_util.make_ndarray(value.tensor).tolist()
        [[-0.5, 0.5, 3.0], [0.5, 1.5, 0.0], [1.5, 2.5, 1.0]]
    """
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.histogram import metadata
    from tensorboard.util import tensor_util

    experts_E = np.arange(len(counts_E), dtype=np.float64)
    buckets_E3 = np.stack([experts_E - 0.5, experts_E + 0.5, np.asarray(counts_E, dtype=np.float64)], axis=1)
    description = "assignments per expert in the window; bucket e is expert e"
    summary_metadata = metadata.create_summary_metadata(display_name=tag, description=description)
    return Summary(
        value=[Summary.Value(tag=tag, metadata=summary_metadata, tensor=tensor_util.make_tensor_proto(buckets_E3))]
    )


class TensorBoardSink(Sink):
    """Writes histograms, heatmaps, per-layer runs, thresholds, the custom-scalars layout and event text.

    Args:
        logger: a ``lightning.pytorch.loggers.TensorBoardLogger``.
        log_histograms: write the per-layer expert-load histograms.
        log_heatmaps: write the layer x expert heatmap image.
        detector: the ``CollapseDetector`` whose alert thresholds are drawn next to the statistics (training
            windows only, the ones it judges); ``None`` draws none.

    Example:
        >>> import tempfile, torch
        >>> from lightning.pytorch.loggers import TensorBoardLogger
        >>> sink = TensorBoardSink(TensorBoardLogger(tempfile.mkdtemp()), log_heatmaps=False)
        >>> snap = Snapshot(step=5, phase="train", layer_names=["r"], num_experts=[2], top_k=[1],
        ...     counts=torch.tensor([[3, 1]]), tokens=torch.tensor([4]), dropped=torch.tensor([0]),
        ...     nonfinite_tokens=torch.tensor([0]), stats={})
        >>> sink.log_window(snap, {}, [])
        >>> sink.finish(None, None)
        >>> sink.failures
        0
    """

    name = "tensorboard"

    def __init__(
        self, logger: Any, log_histograms: bool = True, log_heatmaps: bool = True, detector: Any = None
    ) -> None:
        super().__init__()
        self.logger = logger
        self.log_histograms = log_histograms
        self.log_heatmaps = log_heatmaps
        self.detector = detector
        self._layer_writers: dict[str, Any] = {}

    def log_window(self, snapshot: Snapshot, metrics: dict[str, float], events: Sequence[Any]) -> None:
        writer = self.guard("open the SummaryWriter", lambda: self.logger.experiment)
        if writer is None:
            return
        labels = layer_labels(len(snapshot.layer_names))
        controller = relabel_controller_metrics(
            {k: v for k, v in metrics.items() if k.startswith("controller/")}, snapshot.layer_names
        )
        self.guard("write the per-layer runs", self._layer_runs, writer, snapshot, labels, controller)
        self.guard("write the custom-scalars layout", self._layout, writer, snapshot.phase, controller, labels)
        if self.log_histograms:
            self.guard("write expert-load histograms", self._histograms, writer, snapshot, labels)
        if self.log_heatmaps:
            self.guard("draw the expert-load heatmap", self._heatmap, writer, snapshot, labels)
        if events:
            text = "\n\n".join(event_markdown(event) for event in events)
            self.guard("write event text", writer.add_text, "moe/events", text, global_step=snapshot.step)

    def finish(self, layer_frame: Any, event_frame: Any) -> None:
        writer = self.guard("open the SummaryWriter", lambda: self.logger.experiment)
        if writer is not None:
            self.guard("flush", writer.flush)
        for layer_writer in self._layer_writers.values():
            self.guard("close the per-layer runs", layer_writer.close)
        self._layer_writers = {}

    # ------------------------------------------------------------------------------------------------- parts
    def _layer_writer(self, writer: Any, label: str) -> Any:
        if label not in self._layer_writers:
            from torch.utils.tensorboard import SummaryWriter

            self._layer_writers[label] = SummaryWriter(os.path.join(writer.log_dir, LAYER_RUNS, label))
        return self._layer_writers[label]

    def _layer_runs(
        self, writer: Any, snapshot: Snapshot, labels: list[str], controller: dict[str, float]
    ) -> None:
        values = {stat: values_L.double().tolist() for stat, values_L in snapshot.stats.items()}
        for index, label in enumerate(labels):
            out = self._layer_writer(writer, label)
            for stat, values_L in values.items():
                if np.isfinite(values_L[index]):
                    out.add_scalar(layer_tag(snapshot.phase, stat), values_L[index], snapshot.step)
            if self.detector is not None and snapshot.phase == "train":
                limits = alert_thresholds(self.detector, int(snapshot.num_experts[index]), int(snapshot.top_k[index]))
                for stat, limit in limits.items():
                    out.add_scalar(threshold_tag(snapshot.phase, stat), limit, snapshot.step)
            for key, value in controller.items():
                parts = key.split("/")
                if len(parts) == 4 and parts[2] == label:
                    out.add_scalar(f"controller/{parts[1]}/{parts[3]}", value, snapshot.step)
            out.flush()

    @staticmethod
    def _controller_tags(controller: dict[str, float], labels: list[str]) -> list[str]:
        tags = []
        for key in controller:
            parts = key.split("/")
            tag = f"controller/{parts[1]}/{parts[3]}" if len(parts) == 4 and parts[2] in labels else key
            if tag not in tags:
                tags.append(tag)
        return tags

    def _layout(self, writer: Any, phase: str, controller: dict[str, float], labels: list[str]) -> None:
        state = _LAYOUTS.setdefault(self.logger, {"phases": [], "controllers": []})
        new_tags = [t for t in self._controller_tags(controller, labels) if t not in state["controllers"]]
        if phase in state["phases"] and not new_tags:
            return
        if phase not in state["phases"]:
            state["phases"].append(phase)
        state["controllers"] += new_tags
        writer.add_custom_scalars(custom_scalars_layout(state["phases"], state["controllers"]))

    @staticmethod
    def _histograms(writer: Any, snapshot: Snapshot, labels: list[str]) -> None:
        file_writer = writer._get_file_writer()
        for label, num_experts, counts_E in zip(labels, snapshot.num_experts, snapshot.counts.tolist()):
            if sum(counts_E[:num_experts]) == 0:
                continue
            summary = expert_histogram_summary(f"moe/{snapshot.phase}/expert_load/{label}", counts_E[:num_experts])
            file_writer.add_summary(summary, snapshot.step)

    @staticmethod
    def _heatmap(writer: Any, snapshot: Snapshot, labels: list[str]) -> None:
        title = f"{snapshot.phase} expert load, step {snapshot.step}"
        image_HW3 = heatmap_image(snapshot.loads, snapshot.num_experts, labels, title)
        writer.add_image(f"moe/{snapshot.phase}/load_heatmap", image_HW3, snapshot.step, dataformats="HWC")
