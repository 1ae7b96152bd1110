"""Incidents: the detector's rule firings folded into "this layer broke at step S and recovered at step R".

The detector raises one alert per (layer, rule): a router that collapses onto two experts trips the load-entropy,
MaxVio and dead-expert rules in the same window, three alerts for one event. An :class:`Incident` is one
(phase, layer) breaking: it opens with the first alert on a layer that has none firing, collects every rule that
fires on that layer while it is open (with the worst value each reached) and ends when the last of its rules has
recovered. Control events (a controller turning a knob) are kept apart as :class:`KnobChange` records.

:class:`IncidentTracker` does the folding, one window's events at a time; it is pure (no output, no clock), so the
console, W&B and the progress bar can each keep one and agree. :func:`progress_status` turns it into the short
progress-bar field ``moe: ok`` / ``moe: 2/4 collapsed``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from moe_monitor.detect import SEVERITIES, CollapseDetector, CollapseEvent, achievable_range
from moe_monitor.sinks.scalars import layer_labels
from moe_monitor.snapshot import Snapshot

# Rules of a router collapse proper (load concentrating on few experts), as opposed to capacity overflow or
# numerical trouble; the progress bar calls a layer "collapsed" only for these.
COLLAPSE_RULES: tuple[str, ...] = ("load_entropy", "max_violation", "dead_experts", "saturation")

# Rules whose statistic gets worse as it falls; for every other rule a larger value is worse.
_LOWER_IS_WORSE = frozenset({"load_entropy"})


@dataclass
class Incident:
    """One (phase, layer) breaking, from its first alert until all of its rules have recovered.

    Attributes:
        phase: phase of the windows (``"train"``, ``"val"``, ...).
        layer: module path of the router.
        label: the layer's short label (``L00``), as in every logged tag.
        start_step: step of the first alert.
        rules: every rule that fired during the incident, in the order they first fired.
        severity: the worst severity of its alerts.
        worst: rule -> the worst value the statistic reached in an alert (lowest load entropy, highest MaxVio, ...).
        thresholds: rule -> the threshold it crossed.
        experts: rule -> experts its alert named (the dead ones, the busiest ones, ...).
        active: rules still firing; empty once the incident has ended.
        end_step: step of the recovery that ended it, ``None`` while it is open.

    Example:
        >>> i = Incident("train", "blocks.0.moe.router", "L00", 30)
        >>> i.is_open, i.duration(100)
        (True, 70)
    """

    phase: str
    layer: str
    label: str
    start_step: int
    rules: list[str] = field(default_factory=list)
    severity: str = "info"
    worst: dict[str, float] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)
    experts: dict[str, tuple[int, ...]] = field(default_factory=dict)
    active: set[str] = field(default_factory=set)
    end_step: int | None = None

    @property
    def is_open(self) -> bool:
        """Whether any of its rules is still firing."""
        return self.end_step is None

    @property
    def is_collapse(self) -> bool:
        """Whether a router-collapse rule (see :data:`COLLAPSE_RULES`) is among its rules."""
        return any(rule in COLLAPSE_RULES for rule in self.rules)

    def duration(self, now: int) -> int:
        """Steps from its start to its end, or to ``now`` while open."""
        return (self.end_step if self.end_step is not None else now) - self.start_step

    def add(self, event: CollapseEvent) -> None:
        """Folds one alert of this layer into the incident."""
        if event.rule not in self.rules:
            self.rules.append(event.rule)
        self.active.add(event.rule)
        if SEVERITIES.index(event.severity) > SEVERITIES.index(self.severity):
            self.severity = event.severity
        old = self.worst.get(event.rule)
        lower = event.rule in _LOWER_IS_WORSE
        if old is None or (event.value < old if lower else event.value > old):
            self.worst[event.rule] = float(event.value)
        self.thresholds[event.rule] = float(event.threshold)
        self.experts[event.rule] = tuple(event.experts)

    def summary(self) -> str:
        """Each rule with its worst value against its threshold, e.g. ``load_entropy 0.33 < 0.6``.

        Example:
            >>> i = Incident("train", "r", "L00", 5)
            >>> i.add(CollapseEvent(5, "train", "r", "load_entropy", 0.333, 0.6, "critical", "", (0, 1)))
            >>> i.add(CollapseEvent(5, "train", "r", "dead_experts", 3.0, 0.0, "warning", "", (5, 6, 7)))
            >>> i.summary()
            'load_entropy 0.333 < 0.6, dead_experts 3'
        """
        parts = []
        for rule in self.rules:
            value, threshold = self.worst[rule], self.thresholds.get(rule, math.nan)
            if rule == "dead_experts":
                parts.append(f"dead_experts {value:.0f}")
            elif rule == "nonfinite_logits":
                parts.append("non-finite logits")
            else:
                sign = "<" if rule in _LOWER_IS_WORSE else ">"
                parts.append(f"{rule} {value:.3g} {sign} {threshold:.3g}")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """Plain-type record, for ``summary.json``."""
        return {
            "phase": self.phase,
            "layer": self.layer,
            "label": self.label,
            "start_step": self.start_step,
            "end_step": self.end_step,
            "rules": list(self.rules),
            "active": sorted(self.active),
            "severity": self.severity,
            "worst": dict(self.worst),
            "experts": {rule: list(experts) for rule, experts in self.experts.items()},
        }


@dataclass
class KnobChange:
    """One controller knob turned: ``rule`` is the knob (``aux_loss_coef``, ``router_noise``, ``expert_bias``).

    Example:
        >>> KnobChange(40, "blocks.0.moe.router", "L00", "aux_loss_coef", 0.01, 0.02).new
        0.02
    """

    step: int
    layer: str
    label: str
    rule: str
    old: float
    new: float


@dataclass
class WindowUpdate:
    """What one window changed: incidents opened, grown (new rules), turned critical, ended, and knobs turned.

    Example:
        >>> update = IncidentTracker().update([CollapseEvent(5, "train", "r", "dead_experts", 2, 0, "warning", "")])
        >>> [(i.label, i.rules) for i in update.opened], update.closed
        ([('r', ['dead_experts'])], [])
    """

    step: int
    phase: str
    opened: list[Incident] = field(default_factory=list)
    grown: list[tuple[Incident, list[str]]] = field(default_factory=list)
    escalated: list[Incident] = field(default_factory=list)
    closed: list[Incident] = field(default_factory=list)
    knobs: list[KnobChange] = field(default_factory=list)


class IncidentTracker:
    """Folds a stream of :class:`~moe_monitor.detect.CollapseEvent` into incidents and knob changes.

    Call :meth:`update` once per window with that window's events (alerts, recoveries, control events, in the
    order the detector and controllers returned them) and the window's ``layer_names`` (for the ``L00`` labels).

    Attributes:
        incidents: every incident so far, in the order they opened.
        knobs: ``(rule, layer)`` -> the latest :class:`KnobChange` of that knob.
        alerts: layer label -> alerts (rule firings) so far.
        recoveries: layer label -> recoveries (rule clearings) so far.

    Example:
        >>> from moe_monitor.detect import CollapseEvent as E
        >>> t = IncidentTracker()
        >>> u = t.update([E(30, "train", "a", "dead_experts", 3, 0, "warning", ""),
        ...               E(30, "train", "a", "max_violation", 3, 2.4, "warning", "")], ["a", "b"])
        >>> [(i.label, i.rules) for i in u.opened]
        [('L00', ['dead_experts', 'max_violation'])]
        >>> t.update([E(60, "train", "a", "dead_experts", 0, 0, "info", "", (), "recovery")]).closed
        []
        >>> done = t.update([E(90, "train", "a", "max_violation", 1, 2.4, "info", "", (), "recovery")])
        >>> [i.end_step for i in done.closed]
        [90]
        >>> t.alerts, t.recoveries
        ({'L00': 2}, {'L00': 2})
    """

    def __init__(self) -> None:
        self.incidents: list[Incident] = []
        self.knobs: dict[tuple[str, str], KnobChange] = {}
        self.alerts: dict[str, int] = {}
        self.recoveries: dict[str, int] = {}
        self._open: dict[tuple[str, str], Incident] = {}
        self._labels: dict[str, str] = {}

    def label(self, layer: str) -> str:
        """The ``L00`` label of a module path (the path itself for a layer never seen, e.g. ``"all"``)."""
        return self._labels.get(layer, layer)

    def set_layers(self, layer_names: Sequence[str]) -> None:
        """Learns the labels of ``layer_names`` (model order)."""
        self._labels = dict(zip(layer_names, layer_labels(len(layer_names)))) if layer_names else {}

    def update(self, events: Iterable[CollapseEvent], layer_names: Sequence[str] | None = None) -> WindowUpdate:
        """Folds one window's events; returns what changed."""
        if layer_names is not None:
            self.set_layers(layer_names)
        events = list(events)
        first = events[0] if events else None
        update = WindowUpdate(first.step if first else -1, first.phase if first else "")
        severity_before: dict[int, tuple[Incident, str]] = {}
        for event in events:
            key, label = (event.phase, event.layer), self.label(event.layer)
            if event.kind == "control":
                change = KnobChange(event.step, event.layer, label, event.rule, float(event.threshold), event.value)
                self.knobs[(event.rule, event.layer)] = change
                update.knobs.append(change)
            elif event.kind == "alert":
                self.alerts[label] = self.alerts.get(label, 0) + 1
                incident = self._open.get(key)
                if incident is None:
                    incident = self._open[key] = Incident(event.phase, event.layer, label, event.step)
                    self.incidents.append(incident)
                    update.opened.append(incident)
                elif not any(incident is i for i in update.opened):
                    severity_before.setdefault(id(incident), (incident, incident.severity))
                if event.rule not in incident.rules and not any(incident is i for i in update.opened):
                    for known, rules in update.grown:
                        if known is incident:
                            rules.append(event.rule)
                            break
                    else:
                        update.grown.append((incident, [event.rule]))
                incident.add(event)
            elif event.kind == "recovery":
                self.recoveries[label] = self.recoveries.get(label, 0) + 1
                incident = self._open.get(key)
                if incident is None:
                    continue  # a recovery of an alert raised before this tracker existed (a resumed run)
                incident.active.discard(event.rule)
                if not incident.active:
                    incident.end_step = event.step
                    del self._open[key]
                    update.closed.append(incident)
        update.escalated = [i for i, old in severity_before.values() if i.severity == "critical" != old]
        return update

    def open_incidents(self, phase: str | None = None) -> list[Incident]:
        """Incidents still open (of ``phase`` when given), in the order they opened."""
        return [i for i in self._open.values() if phase is None or i.phase == phase]


def progress_status(
    snapshot: Snapshot | None = None, incidents: IncidentTracker | Iterable[Incident] = (), phase: str = "train"
) -> dict[str, str | float]:
    """The progress-bar fields of the monitor, like Lightning's ``LearningRateMonitor`` shows ``lr``.

    ``moe`` is ``"ok"``, ``"2/4 collapsed"`` (layers of ``phase`` with an open incident that involves a collapse
    rule, out of the snapshot's layers) or ``"1/4 alert"`` (open incidents of other rules only, e.g. capacity
    overflow). ``moe_entropy`` is the worst (lowest) load entropy of the snapshot's layers, when known.

    Args:
        snapshot: the latest window of ``phase`` (for the number of layers and the entropy), or ``None``.
        incidents: an :class:`IncidentTracker` or its incidents (closed ones are ignored).
        phase: the phase to report.

    Example:
        >>> from moe_monitor.detect import CollapseEvent, make_snapshot
        >>> snap = make_snapshot([[50, 50, 0, 0], [25, 25, 25, 25]], step=40, top_k=2,
        ...                      layer_names=["a", "b"])
        >>> progress_status(snap)
        {'moe': 'ok', 'moe_entropy': 0.5}
        >>> tracker = IncidentTracker()
        >>> _ = tracker.update([CollapseEvent(40, "train", "a", "load_entropy", 0.5, 0.6, "critical", "")])
        >>> progress_status(snap, tracker)
        {'moe': '1/2 collapsed', 'moe_entropy': 0.5}
    """
    found = incidents.open_incidents(phase) if isinstance(incidents, IncidentTracker) else list(incidents)
    open_ = [i for i in found if i.is_open and i.phase == phase]
    layers = len(snapshot.layer_names) if snapshot is not None else len({i.layer for i in open_})
    collapsed = {i.layer for i in open_ if i.is_collapse}
    if collapsed:
        status = f"{len(collapsed)}/{layers} collapsed"
    elif open_:
        status = f"{len({i.layer for i in open_})}/{layers} alert"
    else:
        status = "ok"
    out: dict[str, str | float] = {"moe": status}
    if snapshot is not None and "load_entropy" in snapshot.stats:
        finite = [v for v in snapshot.stats["load_entropy"].tolist() if math.isfinite(v)]
        if finite:
            out["moe_entropy"] = round(min(finite), 3)
    return out


def alert_thresholds(detector: CollapseDetector, num_experts: int, top_k: int) -> dict[str, float]:
    """The detector's alert thresholds in each statistic's own units, for a layer routing top-``k`` of ``E``.

    Load entropy and MaxVio thresholds are fractions of the achievable range (see
    :func:`~moe_monitor.detect.achievable_range`); this turns them into the values a chart can draw next to the
    statistic. Rules switched off (``None``) are left out; ``top1_confidence`` is the saturation rule's bound.

    Example:
        >>> {k: round(v, 3) for k, v in alert_thresholds(CollapseDetector(), 8, 2).items()}
        {'load_entropy': 0.6, 'max_violation': 2.4, 'dropped_fraction': 0.1, 'top1_confidence': 0.9}
    """
    floor, ceiling = achievable_range(num_experts, top_k)
    out = {}
    if detector.min_load_entropy is not None and floor < 1:
        out["load_entropy"] = floor + detector.min_load_entropy * (1 - floor)
    if detector.max_violation is not None and ceiling > 0:
        out["max_violation"] = detector.max_violation * ceiling
    if detector.max_dropped_fraction is not None:
        out["dropped_fraction"] = float(detector.max_dropped_fraction)
    if detector.saturation_confidence is not None:
        out["top1_confidence"] = float(detector.saturation_confidence)
    return out
