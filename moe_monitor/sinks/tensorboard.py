"""Rich TensorBoard views of each window, written through a Lightning ``TensorBoardLogger``'s SummaryWriter.

Per window (``<phase>``, ``<LL>`` as in :mod:`moe_monitor.sinks.scalars`):

- ``moe/<phase>/expert_load/<LL>`` histogram whose buckets are the experts (bucket ``e`` holds expert ``e``'s
  assignment count), so the HISTOGRAMS tab shows load drift per layer over steps.
- ``moe/<phase>/load_heatmap`` image: layers x experts (needs matplotlib).
- ``moe/events`` text: one markdown line per alert, recovery or control event.

A custom-scalars layout (CUSTOM SCALARS tab): for each phase logged to the logger, one chart per statistic showing
every layer and one chart per across-layer summary. It is written at the first window and again whenever a new
phase is logged (a ``test`` run after ``fit``, say); TensorBoard shows the last one.

Shape legend: ``L`` layers, ``E`` experts.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

from moe_monitor.sinks.base import Sink
from moe_monitor.sinks.images import heatmap_image
from moe_monitor.sinks.scalars import SUMMARY_NAMES, layer_labels, stat_key, summary_key
from moe_monitor.snapshot import STAT_NAMES, Snapshot

# Phases in each logger's layout, in the order first logged. Kept per logger, not per sink: the callback makes new
# sinks at every setup, and a test run after fit must extend the fit's layout, not replace it.
_LAYOUT_PHASES: weakref.WeakKeyDictionary[Any, list[str]] = weakref.WeakKeyDictionary()

# Chart titles of the CUSTOM SCALARS tab, most telling first: how to read each line at a glance.
CHART_TITLES: dict[str, str] = {
    "load_entropy": "load_entropy (1 = balanced, 0 = one expert)",
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


def custom_scalars_layout(phases: Sequence[str] = ("train", "val", "test")) -> dict[str, dict[str, list[Any]]]:
    """The CUSTOM SCALARS layout: per phase one multi-line chart per statistic, one line per layer.

    Args:
        phases: the phases to chart, in order (the sink passes those logged so far).

    Example:
        >>> layout = custom_scalars_layout(["train"])
        >>> layout["moe/train"]["load_entropy (1 = balanced, 0 = one expert)"]
        ['Multiline', ['moe/train/load_entropy/L\\\\d+']]
        >>> layout["moe/train (all layers)"]["min_load_entropy"]
        ['Multiline', ['moe/train/all/min_load_entropy']]
    """
    order = [stat for stat in CHART_TITLES if stat in STAT_NAMES] + [s for s in STAT_NAMES if s not in CHART_TITLES]
    layout: dict[str, dict[str, list[Any]]] = {}
    for phase in phases:
        layout[f"moe/{phase}"] = {
            CHART_TITLES.get(stat, stat): ["Multiline", [stat_key(phase, stat, r"L\d+")]] for stat in order
        }
        layout[f"moe/{phase} (all layers)"] = {
            name: ["Multiline", [summary_key(phase, name)]] for name in SUMMARY_NAMES
        }
    return layout


def event_markdown(event: Any) -> str:
    """One event as a markdown line for the TEXT tab (the fields of ``moe_monitor.detect.CollapseEvent``)."""
    experts = ", ".join(str(e) for e in getattr(event, "experts", ()) or ())
    return (
        f"**{event.severity}** {event.kind} `{event.rule}` at step {event.step} ({event.phase}), layer "
        f"`{event.layer}`: value {event.value:.4g} vs threshold {event.threshold:.4g}"
        + (f", experts [{experts}]" if experts else "")
        + f". {event.message}"
    )


class TensorBoardSink(Sink):
    """Writes histograms, heatmaps, the custom-scalars layout and event text to one TensorBoard logger.

    Args:
        logger: a ``lightning.pytorch.loggers.TensorBoardLogger``.
        log_histograms: write the per-layer expert-load histograms.
        log_heatmaps: write the layer x expert heatmap image.

    Example:
        >>> import tempfile, torch
        >>> from lightning.pytorch.loggers import TensorBoardLogger
        >>> sink = TensorBoardSink(TensorBoardLogger(tempfile.mkdtemp()), log_heatmaps=False)
        >>> snap = Snapshot(step=5, phase="train", layer_names=["r"], num_experts=[2], top_k=[1],
        ...     counts=torch.tensor([[3, 1]]), tokens=torch.tensor([4]), dropped=torch.tensor([0]),
        ...     nonfinite_tokens=torch.tensor([0]), stats={})
        >>> sink.log_window(snap, {}, [])
        >>> sink.failures
        0
    """

    name = "tensorboard"

    def __init__(self, logger: Any, log_histograms: bool = True, log_heatmaps: bool = True) -> None:
        super().__init__()
        self.logger = logger
        self.log_histograms = log_histograms
        self.log_heatmaps = log_heatmaps

    def log_window(self, snapshot: Snapshot, metrics: dict[str, float], events: Sequence[Any]) -> None:
        writer = self.guard("open the SummaryWriter", lambda: self.logger.experiment)
        if writer is None:
            return
        phases = _LAYOUT_PHASES.setdefault(self.logger, [])
        if snapshot.phase not in phases:
            phases.append(snapshot.phase)
            self.guard("write the custom-scalars layout", writer.add_custom_scalars, custom_scalars_layout(phases))
        labels = layer_labels(len(snapshot.layer_names))
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

    @staticmethod
    def _histograms(writer: Any, snapshot: Snapshot, labels: list[str]) -> None:
        for label, num_experts, counts_E in zip(labels, snapshot.num_experts, snapshot.counts.tolist()):
            counts_E = counts_E[:num_experts]
            total = sum(counts_E)
            if total == 0:
                continue
            experts = range(num_experts)
            writer.add_histogram_raw(
                f"moe/{snapshot.phase}/expert_load/{label}",
                min=0.0,
                max=float(num_experts - 1),
                num=total,
                sum=float(sum(e * c for e, c in zip(experts, counts_E))),
                sum_squares=float(sum(e * e * c for e, c in zip(experts, counts_E))),
                # Bucket e spans (e - 0.5, e + 0.5]: exactly expert e.
                bucket_limits=[e + 0.5 for e in experts],
                bucket_counts=counts_E,
                global_step=snapshot.step,
            )

    @staticmethod
    def _heatmap(writer: Any, snapshot: Snapshot, labels: list[str]) -> None:
        title = f"{snapshot.phase} expert load, step {snapshot.step}"
        image_HW3 = heatmap_image(snapshot.loads, snapshot.num_experts, labels, title)
        writer.add_image(f"moe/{snapshot.phase}/load_heatmap", image_HW3, snapshot.step, dataformats="HWC")
