"""The events the detector and the controllers raise: :class:`CollapseEvent`, its vocabularies, and its records.

Every place events become plain records (checkpoints), frames (``event_frame()``) or ``events.csv`` rows, and
every place they are read back (a resume, the report), goes through the functions here.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

SEVERITIES: tuple[str, ...] = ("info", "warning", "critical")
KINDS: tuple[str, ...] = ("alert", "recovery", "control")


@dataclass(frozen=True)
class CollapseEvent:
    """One thing worth telling the user: an alert, a recovery, or a change a controller made.

    Attributes:
        step: the step of the window (or of the controller's decision).
        phase: the phase of the window (``"train"``, ``"val"``, ...).
        layer: module path of the router layer.
        rule: the detector rule (see :data:`~moe_monitor.detect.RULES`) or, for ``kind="control"``, the knob
            that changed.
        value: the statistic that crossed the threshold (for control events, the knob's new value).
        threshold: the threshold it crossed (for control events, the knob's previous value).
        severity: ``"info"``, ``"warning"`` or ``"critical"``.
        message: one line for a human: layer, experts involved, value against threshold, what to try.
        experts: experts involved (the overloaded ones, the dead ones, ...), possibly empty.
        kind: ``"alert"``, ``"recovery"`` or ``"control"``.

    Example:
        >>> e = CollapseEvent(10, "train", "blocks.0.moe.router", "load_entropy", 0.2, 0.5, "critical", "...")
        >>> e.kind, e.experts
        ('alert', ())
    """

    step: int
    phase: str
    layer: str
    rule: str
    value: float
    threshold: float
    severity: str
    message: str
    experts: tuple[int, ...] = ()
    kind: str = "alert"

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity={self.severity!r} is not valid; choose one of {', '.join(SEVERITIES)}.")
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r} is not valid; choose one of {', '.join(KINDS)}.")


EVENT_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(CollapseEvent))


# ------------------------------------------------------------------------------------------------- records
# The one place events become plain records, frames and CSV rows, and are read back from them: checkpoints (the
# watcher's state), the history files (`events.csv`), the report and the audit all go through these functions.


def event_record(event: CollapseEvent) -> dict[str, Any]:
    """``event`` as a dict of plain types (``experts`` a list), so a checkpoint holding it loads with
    ``torch.load(weights_only=True)``; :func:`event_from_record` reads it back.

    Example:
        >>> record = event_record(CollapseEvent(10, "train", "r", "dead_experts", 2.0, 0.0, "warning", "", (1, 3)))
        >>> record["experts"], record["kind"], event_from_record(record).experts
        ([1, 3], 'alert', (1, 3))
    """
    return {**asdict(event), "experts": list(event.experts)}


def event_from_record(record: Mapping[str, Any]) -> CollapseEvent:
    """The event of one record: a :func:`event_record` dict, a checkpoint's, or a row of a saved ``events`` frame.

    A row read back from ``events.csv`` holds ``experts`` as text (``"[1, 3]"``) and, in a file written by hand
    or by an older release, may lack a column or hold a severity or kind this release does not know: a missing
    ``phase`` reads as ``"train"``, a missing value or threshold as NaN, an unknown severity as ``"warning"`` and
    an unknown kind as ``"alert"``, so one odd row does not hide a run's other events.

    Example:
        >>> event_from_record({"step": "40", "layer": "r", "rule": "load_entropy", "experts": "[0, 2]",
        ...                    "severity": "severe"})
        CollapseEvent(step=40, phase='train', layer='r', rule='load_entropy', value=nan, threshold=nan, \
severity='warning', message='', experts=(0, 2), kind='alert')
    """
    experts = record.get("experts", ())
    if isinstance(experts, str):
        experts = experts.strip("[]() ").replace(",", " ").split()
    elif experts is None or (isinstance(experts, float) and math.isnan(experts)):
        experts = ()
    severity, kind = record.get("severity"), record.get("kind")
    message = record.get("message")
    return CollapseEvent(
        step=int(record["step"]),
        phase=str(record.get("phase", "train")),
        layer=str(record["layer"]),
        rule=str(record["rule"]),
        value=float(record.get("value", math.nan)),
        threshold=float(record.get("threshold", math.nan)),
        severity=severity if severity in SEVERITIES else "warning",
        message="" if message is None or (isinstance(message, float) and math.isnan(message)) else str(message),
        experts=tuple(int(e) for e in experts),
        kind=kind if kind in KINDS else "alert",
    )


def event_frame(events: Iterable[CollapseEvent]) -> pd.DataFrame:
    """One row per event, columns :data:`EVENT_COLUMNS` (an empty frame has them too).

    Example:
        >>> frame = event_frame([CollapseEvent(10, "train", "r", "load_entropy", 0.2, 0.5, "critical", "")])
        >>> list(frame.columns) == list(EVENT_COLUMNS), frame.step.tolist(), len(event_frame([]).columns)
        (True, [10], 10)
    """
    import pandas as pd

    return pd.DataFrame([event_record(e) for e in events], columns=list(EVENT_COLUMNS))


def events_from_frame(frame: pd.DataFrame | None) -> list[CollapseEvent]:
    """The events of a saved ``events`` frame (``events.csv`` / parquet read back), oldest step first.

    ``None`` or an empty frame has none; rows are read with :func:`event_from_record`.

    Example:
        >>> import io, pandas as pd
        >>> events = [CollapseEvent(20, "train", "r", "cv", 1.5, 1.0, "warning", "x", (3,), "recovery"),
        ...           CollapseEvent(10, "train", "r", "cv", 1.5, 1.0, "warning", "y", (0, 3))]
        >>> buffer = io.StringIO()
        >>> write_events_csv(buffer, events)
        >>> [(e.step, e.kind, e.experts) for e in events_from_frame(pd.read_csv(io.StringIO(buffer.getvalue())))]
        [(10, 'alert', (0, 3)), (20, 'recovery', (3,))]
    """
    if frame is None or frame.empty:
        return []
    return sorted((event_from_record(row) for row in frame.to_dict("records")), key=lambda e: e.step)


def write_events_csv(path: str | os.PathLike | IO[str], events: Iterable[CollapseEvent], append: bool = False) -> None:
    """Writes ``events`` as ``events.csv`` rows: the whole file with its header, or (``append=True``) only the
    rows, added to the end of a file this function wrote before.

    Example:
        >>> import os, tempfile, pandas as pd
        >>> path = os.path.join(tempfile.mkdtemp(), "events.csv")
        >>> write_events_csv(path, [])
        >>> write_events_csv(path, [CollapseEvent(10, "train", "r", "cv", 1.5, 1.0, "warning", "")], append=True)
        >>> pd.read_csv(path).step.tolist()
        [10]
    """
    event_frame(events).to_csv(path, mode="a" if append else "w", header=not append, index=False)
