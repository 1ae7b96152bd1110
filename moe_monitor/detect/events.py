"""The events the detector and the controllers raise: :class:`CollapseEvent` and its vocabularies."""

from __future__ import annotations

from dataclasses import dataclass, fields

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
