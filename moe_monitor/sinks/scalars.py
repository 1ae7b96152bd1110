"""The scalar key scheme of a window and the sink that sends it through every Lightning logger.

Keys (``<phase>`` is ``train``, ``val`` or ``test``; ``<LL>`` a layer label such as ``L03``, the router's index in
model order, zero-padded to at least two digits; ``<EE>`` an expert label such as ``E05``):

- ``moe/<phase>/<stat>/<LL>``: each statistic of SPEC §3 (:data:`~moe_monitor.snapshot.STAT_NAMES`) per layer.
- ``moe/<phase>/all/min_load_entropy``, ``.../all/max_max_violation``: the worst layer.
- ``moe/<phase>/all/dropped_fraction``: dropped over routed assignments, all layers whose drops are known.
- ``moe/<phase>/all/layers_with_dead_experts``: layers with at least one expert unused in the window.
- ``moe/<phase>/load/<LL>/<EE>``: each expert's load, only with ``log_expert_loads=True``.

Non-finite values (a statistic the router cannot provide, an empty window) are left out rather than logged as NaN.
A model with ``L`` routers of ``E`` experts logs at most ``10 L + 4`` keys per window (``+ L E`` with expert loads).

Shape legend: ``L`` layers, ``E`` experts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from moe_monitor.sinks.base import Sink
from moe_monitor.snapshot import STAT_NAMES, Snapshot

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


def scalar_metrics(snapshot: Snapshot, log_expert_loads: bool = False) -> dict[str, float]:
    """The scalars of one window under the key scheme of this module.

    Args:
        snapshot: the closed window.
        log_expert_loads: also return each expert's load (``L * E`` more keys).

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
    """
    phase = snapshot.phase
    labels = layer_labels(len(snapshot.layer_names))
    metrics: dict[str, float] = {}
    for stat in STAT_NAMES:
        values_L = snapshot.stats.get(stat)
        if values_L is None:
            continue
        for label, value in zip(labels, values_L.double().tolist()):
            if math.isfinite(value):
                metrics[stat_key(phase, stat, label)] = value

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
