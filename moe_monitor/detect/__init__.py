"""Collapse detection: turns a stream of window :class:`~moe_monitor.snapshot.Snapshot` objects into events.

Shape legend: ``L`` monitored router layers, ``E`` experts (columns beyond a layer's own ``num_experts`` are
padding and ignored).

The package keeps each concern in one module:

- :mod:`moe_monitor.detect.rules`: the rules as a table (:data:`~moe_monitor.detect.rules.RULE_TABLE`), each a
  pure function of one layer's window and its threshold, with its severity and message. A new rule is one entry.
- :mod:`moe_monitor.detect.detector`: :class:`CollapseDetector`, which owns patience, hysteresis, the per-layer
  state and the events.
- :mod:`moe_monitor.detect.events`: :class:`CollapseEvent`, its vocabularies, and the one conversion of events to
  records, frames and ``events.csv`` rows and back.
- :mod:`moe_monitor.detect.synthetic`: :func:`make_snapshot`, snapshots from plain counts.

Example:
    >>> from moe_monitor.detect import CollapseDetector, make_snapshot
    >>> det = CollapseDetector(patience=1)
    >>> [e.rule for e in det.update(make_snapshot([[1000, 0, 0, 0]]))]
    ['load_entropy', 'max_violation', 'dead_experts']
"""

from moe_monitor.detect.detector import CollapseDetector
from moe_monitor.detect.events import (
    EVENT_COLUMNS,
    KINDS,
    SEVERITIES,
    CollapseEvent,
    event_frame,
    event_from_record,
    event_record,
    events_from_frame,
    write_events_csv,
)
from moe_monitor.detect.rules import (
    RULE_TABLE,
    RULES,
    Rule,
    Verdict,
    achievable_range,
    dead_expert_probability,
    hot_experts,
)
from moe_monitor.detect.synthetic import make_snapshot

__all__ = [
    "EVENT_COLUMNS",
    "KINDS",
    "RULES",
    "RULE_TABLE",
    "SEVERITIES",
    "CollapseDetector",
    "CollapseEvent",
    "Rule",
    "Verdict",
    "achievable_range",
    "dead_expert_probability",
    "event_frame",
    "event_from_record",
    "event_record",
    "events_from_frame",
    "hot_experts",
    "make_snapshot",
    "write_events_csv",
]
