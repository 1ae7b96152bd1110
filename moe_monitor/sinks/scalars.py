"""The scalar key scheme of a window and the sink that sends it through every Lightning logger.

Keys (``<phase>`` is ``train``, ``val`` or ``test``; ``<LL>`` a layer label such as ``L03``, the router's index in
model order, zero-padded to at least two digits; ``<EE>`` an expert label such as ``E05``):

- ``moe/<phase>/<stat>/<LL>``: each statistic of the metric reference, docs/metrics.md
  (:data:`~moe_monitor.snapshot.STAT_NAMES`) per layer, for models of at most :data:`PER_LAYER_MAX_LAYERS` routers
  (``per_layer="auto"``) or with ``per_layer=True``.
- Above that (or with ``per_layer=False``): ``moe/<phase>/<stat>/{min,p50,p95,max}``, each statistic's quantiles
  across layers, and ``moe/<phase>/<stat>/<LL>`` only for the :data:`WORST_LAYERS` worst layers of each statistic
  of :data:`WORST` (the layer with the lowest load entropy, ...), so a dashboard names the layers to look at.
  Every layer is still in the histograms, heatmaps and history files.
- ``moe/<phase>/all/min_load_entropy``, ``.../all/max_max_violation``: the worst layer.
- ``moe/<phase>/all/dropped_fraction``: dropped over routed assignments, all layers whose drops are known.
- ``moe/<phase>/all/layers_with_dead_experts``: layers with at least one expert unused in the window.
- ``moe/<phase>/load/<LL>/<EE>``: each expert's load, only with ``log_expert_loads=True``.

Non-finite values (a statistic the router cannot provide, an empty window) are left out rather than logged as NaN.
Keys per window (``S = len(STAT_NAMES) = 12`` statistics, ``L`` routers of ``E`` experts): at most
``S L + 4 = 12 L + 4`` per layer (``per_layer=True``); at most ``4 S + WORST_LAYERS * len(WORST) + 4 = 67``
bounded, whatever ``L``; plus ``L E`` with expert loads.

Shape legend: ``L`` layers, ``E`` experts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

from moe_monitor.sinks.base import Sink
from moe_monitor.snapshot import STAT_NAMES, Snapshot

PER_LAYER_MAX_LAYERS = 16
"""Largest router count for which ``per_layer="auto"`` logs every layer's statistics."""

QUANTILES: tuple[tuple[str, float], ...] = (("min", 0.0), ("p50", 0.5), ("p95", 0.95), ("max", 1.0))
"""Cross-layer quantiles of the bounded key set (linear interpolation between layers)."""

WORST: dict[str, str] = {
    "load_entropy": "lowest",
    "max_violation": "highest",
    "dead_experts": "highest",
    "dropped_fraction": "highest",
    "z_loss": "highest",
}
"""Statistics whose worst layers the bounded key set names, and which end is worst."""

WORST_LAYERS = 3
"""Worst layers per statistic of :data:`WORST` logged under their own key in the bounded key set."""

SUMMARY_NAMES: tuple[str, ...] = (
    "min_load_entropy",
    "max_max_violation",
    "dropped_fraction",
    "layers_with_dead_experts",
)


def layer_labels(num_layers: int) -> list[str]:
    """Short, sortable label of each layer.

    Example:
        >>> layer_labels(3)
        ['L00', 'L01', 'L02']
        >>> layer_labels(120)[-1]
        'L119'
    """
    width = max(2, len(str(num_layers - 1)))
    return [f"L{i:0{width}d}" for i in range(num_layers)]


def stat_key(phase: str, stat: str, label: str) -> str:
    """Key of one layer's statistic.

    Example:
        >>> stat_key("train", "load_entropy", "L03")
        'moe/train/load_entropy/L03'
    """
    return f"moe/{phase}/{stat}/{label}"


def summary_key(phase: str, name: str) -> str:
    """Key of one across-layer summary.

    Example:
        >>> summary_key("val", "min_load_entropy")
        'moe/val/all/min_load_entropy'
    """
    return f"moe/{phase}/all/{name}"


def scalar_metrics(
    snapshot: Snapshot, log_expert_loads: bool = False, per_layer: bool | Literal["auto"] = "auto"
) -> dict[str, float]:
    """The scalars of one window under the key scheme of this module.

    Keys per window, with ``S = 12`` statistics and ``L`` routers: ``per_layer=True`` gives at most ``12 L + 4``
    (every layer's statistics, then the 4 summaries); ``per_layer=False`` at most ``4 S + 3 * 5 + 4 = 67``
    (4 quantiles per statistic, the 3 worst layers of 5 statistics, the 4 summaries), whatever ``L``;
    ``log_expert_loads`` adds ``L E``. Non-finite values are left out.

    Args:
        snapshot: the closed window.
        log_expert_loads: also return each expert's load (``L * E`` more keys).
        per_layer: ``True``: every layer's statistics; ``False``: the cross-layer quantiles and the worst layers;
            ``"auto"``: ``True`` for at most :data:`PER_LAYER_MAX_LAYERS` routers.

    Raises:
        ValueError: ``per_layer`` is not ``True``, ``False`` or ``"auto"``.

    Example:
        >>> import torch
        >>> nan = float("nan")
        >>> snap = Snapshot(
        ...     step=10, phase="train", layer_names=["a.router", "b.router"], num_experts=[2, 2], top_k=[1, 1],
        ...     counts=torch.tensor([[3, 1], [4, 0]]), tokens=torch.tensor([4, 4]), dropped=torch.tensor([1, 0]),
        ...     nonfinite_tokens=torch.tensor([0, 0]),
        ...     stats={"load_entropy": torch.tensor([0.5, 0.0]), "dead_experts": torch.tensor([0.0, 1.0]),
        ...            "z_loss": torch.tensor([nan, nan]), "dropped_fraction": torch.tensor([0.25, nan])})
        >>> m = scalar_metrics(snap, log_expert_loads=True)
        >>> m["moe/train/load_entropy/L00"], m["moe/train/all/min_load_entropy"], "moe/train/z_loss/L00" in m
        (0.5, 0.0, False)
        >>> m["moe/train/all/dropped_fraction"], m["moe/train/all/layers_with_dead_experts"]  # b's drops unknown
        (0.25, 1.0)
        >>> m["moe/train/load/L00/E00"]
        0.75
        >>> bounded = scalar_metrics(snap, per_layer=False)
        >>> bounded["moe/train/load_entropy/p50"], bounded["moe/train/load_entropy/L01"]  # L01: the worst layer
        (0.25, 0.0)
    """
    if not (isinstance(per_layer, bool) or per_layer == "auto"):
        raise ValueError(f"per_layer={per_layer!r} is not valid; choose True, False or 'auto'")
    phase = snapshot.phase
    labels = layer_labels(len(snapshot.layer_names))
    if per_layer == "auto":
        per_layer = len(labels) <= PER_LAYER_MAX_LAYERS
    metrics: dict[str, float] = {}
    for stat in STAT_NAMES:
        values_L = snapshot.stats.get(stat)
        if values_L is None:
            continue
        values = values_L.double().tolist()
        if per_layer:
            chosen = range(len(values))
        else:
            finite_L = [(v, i) for i, v in enumerate(values) if math.isfinite(v)]
            if finite_L:
                ordered = sorted(v for v, _ in finite_L)
                for name, q in QUANTILES:
                    metrics[stat_key(phase, stat, name)] = _quantile(ordered, q)
            order = WORST.get(stat)
            worst = sorted(finite_L, key=lambda vi: (vi[0] if order == "lowest" else -vi[0], vi[1]))
            chosen = [i for _, i in worst[:WORST_LAYERS]] if order else []
        for i in chosen:
            if math.isfinite(values[i]):
                metrics[stat_key(phase, stat, labels[i])] = values[i]

    def finite(stat: str) -> list[float]:
        values_L = snapshot.stats.get(stat)
        return [] if values_L is None else [v for v in values_L.double().tolist() if math.isfinite(v)]

    if entropies := finite("load_entropy"):
        metrics[summary_key(phase, "min_load_entropy")] = min(entropies)
    if violations := finite("max_violation"):
        metrics[summary_key(phase, "max_max_violation")] = max(violations)
    # Over the layers whose drops are known: a capacity router that does not report its drops has a NaN
    # dropped_fraction, and counting its assignments as kept would make the total look better than it is.
    known_L = snapshot.stats["dropped_fraction"].isfinite() if "dropped_fraction" in snapshot.stats else None
    if known_L is not None:
        assignments = int(snapshot.counts[known_L].sum())
        if assignments > 0:
            metrics[summary_key(phase, "dropped_fraction")] = int(snapshot.dropped[known_L].sum()) / assignments
    if "dead_experts" in snapshot.stats:
        metrics[summary_key(phase, "layers_with_dead_experts")] = float(sum(d > 0 for d in finite("dead_experts")))

    if log_expert_loads:
        loads_LE = snapshot.loads
        width = max(2, len(str(max(snapshot.num_experts) - 1)))
        for label, num_experts, loads_E in zip(labels, snapshot.num_experts, loads_LE.tolist()):
            for expert, load in enumerate(loads_E[:num_experts]):
                if math.isfinite(load):
                    metrics[f"moe/{phase}/load/{label}/E{expert:0{width}d}"] = load
    return metrics


def _quantile(ordered: list[float], q: float) -> float:
    """The ``q`` quantile of sorted values, interpolated linearly between neighbours (numpy's default)."""
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


class ScalarSink(Sink):
    """Sends each window's scalars through every logger, each in its own guard.

    Args:
        loggers: the trainer's loggers (``trainer.loggers``).

    Example:
        >>> from lightning.pytorch.loggers import CSVLogger
        >>> import pathlib, tempfile, torch
        >>> logger = CSVLogger(tempfile.mkdtemp(), name="run")
        >>> sink = ScalarSink([logger])
        >>> snap = Snapshot(step=5, phase="train", layer_names=["r"], num_experts=[2], top_k=[1],
        ...     counts=torch.tensor([[2, 2]]), tokens=torch.tensor([4]), dropped=torch.tensor([0]),
        ...     nonfinite_tokens=torch.tensor([0]), stats={"load_entropy": torch.tensor([1.0])})
        >>> sink.log_window(snap, scalar_metrics(snap), [])
        >>> logger.save()
        >>> "moe/train/load_entropy/L00" in pathlib.Path(logger.log_dir, "metrics.csv").read_text()
        True
    """

    name = "scalars"

    def __init__(self, loggers: Sequence[Any]) -> None:
        super().__init__()
        self.loggers = list(loggers)

    def log_window(self, snapshot: Snapshot, metrics: dict[str, float], events: Sequence[Any]) -> None:
        if not metrics:
            return
        for logger in self.loggers:
            self.guard(f"log metrics to {type(logger).__name__}", logger.log_metrics, metrics, step=snapshot.step)
