"""What a person watching the terminal sees: one line per incident, recoveries, knob changes and a run summary.

Per window, at most:

- one block for the layers that broke in that window: a header line, one line per new incident (every rule
  involved, worst value against threshold) and one hint that knows which controllers are running and speaks the
  user's interface (``MoEMonitor(controllers=[ExpertBiasController()])`` from the library, ``--control bias``
  from the command line);
- one line per incident that turned critical (a critical rule joined a warning incident);
- one line per incident that ended (every rule recovered);
- one line per controller whose knob moved materially: a knob is printed the first time it moves, then only once
  its value has doubled or halved since it was last printed, or is back at its original value.

At the end of fit, a summary: windows, incidents, alerts and recoveries per layer, still-collapsed layers, the
controller knobs at the end, where the files are and the ``moe-monitor report`` command; the same as
``summary.json`` in the history directory when the sink knows it.
"""

from __future__ import annotations

import json
import math
import shlex
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TextIO

import pandas as pd

from moe_monitor.incidents import COLLAPSE_RULES, Incident, IncidentTracker, KnobChange, WindowUpdate
from moe_monitor.sinks.base import Sink, relabel_controller_metrics
from moe_monitor.snapshot import Snapshot

INTERFACES: tuple[str, ...] = ("library", "cli")

# Controllers in the order a hint proposes them: (``--control`` name, class, what it does).
_CONTROLLERS: tuple[tuple[str, str], ...] = (
    ("bias", "ExpertBiasController"),
    ("aux", "AuxLossController"),
    ("noise", "RouterNoiseController"),
)
_CONTROLLER_KEYS = {"bias": "bias", "aux": "aux", "aux_loss": "aux", "noise": "noise"}
_KNOB_TEXT = {"expert_bias": "expert_bias range", "aux_loss_coef": "aux_loss_coef", "router_noise": "router noise std"}


def controller_keys(controllers: Iterable[Any]) -> list[str]:
    """``--control`` names (``bias``, ``aux``, ``noise``) of controller instances or names.

    Example:
        >>> from moe_monitor.controllers import AuxLossController
        >>> controller_keys([AuxLossController(), "bias"])
        ['aux', 'bias']
    """
    keys = []
    for controller in controllers:
        name = controller if isinstance(controller, str) else str(getattr(controller, "name", ""))
        key = _CONTROLLER_KEYS.get(name.strip().lower())
        if key is not None and key not in keys:
            keys.append(key)
    return keys


def hint(rules: Iterable[str], running: Sequence[str], interface: str = "library", owner: str = "MoEMonitor") -> str:
    """What to try for incidents involving ``rules``, given the controllers already ``running``.

    Args:
        rules: detector rules of the incidents.
        running: ``--control`` names of the running controllers (see :func:`controller_keys`).
        interface: ``"library"`` (Python arguments) or ``"cli"`` (``moe-monitor train`` flags).
        owner: the class a library user passes controllers to (``MoEMonitor``, ``Watcher``).

    Example:
        >>> hint(["load_entropy"], [], "cli")
        'try --control bias (or --control aux).'
        >>> hint(["dead_experts"], ["bias"], "library", owner="Watcher")
        'ExpertBiasController is on and acting; if this lasts, try Watcher(controllers=[ExpertBiasController(), \
AuxLossController()]).'
    """
    rules, tips = set(rules), []
    if rules & set(COLLAPSE_RULES) or "dropped_fraction" in rules:
        missing = [key for key, _ in _CONTROLLERS if key not in running]
        on = [cls for key, cls in _CONTROLLERS if key in running]
        prefix = f"{', '.join(on)} {'is' if len(on) == 1 else 'are'} on and acting; if this lasts, " if on else ""
        if missing:
            proposed = [key for key, _ in _CONTROLLERS if key in running] + missing[:1]
            if interface == "cli":
                rest = f" (or --control {missing[1]})" if len(missing) > 1 and not on else ""
                tips.append(f"{prefix}try --control {','.join(proposed)}{rest}")
            else:
                classes = ", ".join(f"{cls}()" for key, cls in _CONTROLLERS if key in proposed)
                needs = " (it needs a router selection bias: MoEConfig(expert_bias=True))" * (missing[0] == "bias")
                tips.append(f"{prefix}try {owner}(controllers=[{classes}]){needs}")
        else:
            lr = "a lower --lr" if interface == "cli" else "a lower learning rate"
            tips.append(f"{prefix}try {lr}")
    if "dropped_fraction" in rules:
        tips.append(
            "for the dropped assignments raise the capacity factor: "
            + ("--capacity-factor 2.0 (or none: dropless)" if interface == "cli" else "MoEConfig(capacity_factor=2.0)")
        )
    if rules & {"nonfinite_logits", "z_loss_spike"}:
        tips.append(
            "the router logits are running away: "
            + (
                "lower --lr and raise --z-coef (e.g. 1e-3)"
                if interface == "cli"
                else "lower the learning rate, clip gradients (Trainer(gradient_clip_val=1.0)) and raise "
                "MoEConfig(z_loss_coef=1e-3)"
            )
        )
    return "; ".join(tips) + "." if tips else ""


class ConsoleSink(Sink):
    """Prints incidents, recoveries, knob changes and an end-of-run summary; writes ``summary.json``.

    Args:
        interface: ``"library"`` (hints name Python arguments) or ``"cli"`` (hints name ``moe-monitor train``
            flags), or a function ``(new incidents of a window, running controller names) -> hint text``.
        controllers: the running controllers (instances or ``--control`` names), so hints never propose one that
            is already on.
        out: a text stream (default ``sys.stderr`` at each write) or a function taking one line, e.g. ``tqdm.write``
            so the lines do not break a progress bar.
        history_dir: the directory of the history files (``layers.csv``, ...); ``summary.json`` goes there and
            the summary names it. May also be set later, before :meth:`finish`, as the attribute ``history_dir``.
        owner: the class library users pass controllers to, for the hints.
        prefix: start of every line.

    Attributes:
        tracker: the :class:`~moe_monitor.incidents.IncidentTracker` of the events seen.
        summary: the summary record once :meth:`finish` ran (the content of ``summary.json``).

    Example:
        >>> import io
        >>> from moe_monitor.detect import CollapseEvent, make_snapshot
        >>> out = io.StringIO()
        >>> sink = ConsoleSink(interface="cli", controllers=["bias"], out=out)
        >>> snap = make_snapshot([[100, 0, 0, 0]], step=30, layer_names=["blocks.0.moe.router"])
        >>> sink.log_window(snap, {}, [CollapseEvent(30, "train", "blocks.0.moe.router", "dead_experts", 3, 0,
        ...     "warning", "...", (1, 2, 3))])
        >>> print(out.getvalue().strip())
        MoEMonitor [train step 30] 1 new incident:
          L00 blocks.0.moe.router: dead_experts 3 (experts 1, 2, 3) [warning]
          hint: ExpertBiasController is on and acting; if this lasts, try --control bias,aux.
    """

    name = "console"

    def __init__(
        self,
        interface: str | Callable[[list[Incident], list[str]], str] = "library",
        controllers: Iterable[Any] = (),
        out: TextIO | Callable[[str], Any] | None = None,
        history_dir: str | Path | None = None,
        owner: str = "MoEMonitor",
        prefix: str = "MoEMonitor",
    ) -> None:
        super().__init__()
        if not callable(interface) and interface not in INTERFACES:
            raise ValueError(
                f"interface={interface!r} is not valid; choose one of {', '.join(INTERFACES)} or pass a function "
                "(incidents, running controllers) -> hint text."
            )
        self.interface = interface
        self.running = controller_keys(controllers)
        self.out = out
        self.history_dir = Path(history_dir) if history_dir is not None else None
        self.owner, self.prefix = owner, prefix
        self.tracker = IncidentTracker()
        self.summary: dict[str, Any] | None = None
        self._windows: dict[str, int] = {}
        self._layers: list[str] = []
        self._knob_metrics: dict[str, float] = {}
        self._printed_knob: dict[tuple[str, str], float] = {}
        self._base_knob: dict[tuple[str, str], float] = {}
        self._last_step = 0

    # ------------------------------------------------------------------------------------------------- output
    def _write(self, line: str) -> None:
        out = self.out if self.out is not None else sys.stderr
        if callable(out) and not hasattr(out, "write"):
            out(line)
        else:
            print(line, file=out, flush=True)

    def _hint(self, incidents: list[Incident]) -> str:
        if callable(self.interface):
            return self.interface(incidents, list(self.running))
        rules = [rule for incident in incidents for rule in incident.rules]
        return hint(rules, self.running, self.interface, self.owner)

    # ------------------------------------------------------------------------------------------------- windows
    def log_window(self, snapshot: Snapshot, metrics: dict[str, float], events: Sequence[Any]) -> None:
        self._windows[snapshot.phase] = self._windows.get(snapshot.phase, 0) + 1
        self._layers = list(snapshot.layer_names)
        self._last_step = max(self._last_step, int(snapshot.step))
        knobs = relabel_controller_metrics(
            {k: v for k, v in metrics.items() if k.startswith("controller/")}, snapshot.layer_names
        )
        self._knob_metrics.update(knobs)
        update = self.tracker.update(events, snapshot.layer_names)
        for line in self.lines(update):
            self.guard("print to the console", self._write, line)

    def lines(self, update: WindowUpdate) -> list[str]:
        """The console lines of one window's :class:`~moe_monitor.incidents.WindowUpdate`."""
        out: list[str] = []
        head = f"{self.prefix} [{update.phase} step {update.step}]"
        if update.opened:
            count = len(update.opened)
            out.append(f"{head} {count} new incident{'s' if count > 1 else ''}:")
            out += [f"  {_incident_line(incident)}" for incident in update.opened]
            text = self._hint(update.opened)
            if text:
                out.append(f"  hint: {text}")
        for incident in update.escalated:
            out.append(
                f"{head} {incident.label} turned critical (incident since step {incident.start_step}): "
                f"{incident.summary()}."
            )
        for incident in update.closed:
            out.append(
                f"{head} recovered: {incident.label} {incident.layer} (incident since step {incident.start_step}, "
                f"{incident.duration(update.step)} steps; worst: {incident.summary()})."
            )
        out += self._knob_lines(update.knobs, head)
        return out

    def _knob_lines(self, changes: list[KnobChange], head: str) -> list[str]:
        shown: dict[str, list[str]] = {}
        for change in changes:
            key = (change.rule, change.layer)
            base = self._base_knob.setdefault(key, change.old)
            last = self._printed_knob.get(key)
            material = (
                last is None
                or (change.new == base != last)
                or (last == 0) != (change.new == 0)
                or (last != 0 and not 0.5 < change.new / last < 2)
            )
            if not material:
                continue
            before = change.old if last is None else last
            self._printed_knob[key] = change.new
            text = _KNOB_TEXT.get(change.rule, change.rule)
            shown.setdefault(text, []).append(f"{change.label} {before:.3g} -> {change.new:.3g}")
        return [f"{head} controller: {what} {', '.join(parts)}." for what, parts in shown.items()]

    # ------------------------------------------------------------------------------------------------- summary
    def finish(self, layer_frame: pd.DataFrame, event_frame: pd.DataFrame) -> None:
        self.summary = self.guard("build the run summary", self._summarise, layer_frame)
        if self.summary is None:
            return
        for line in self.summary_lines(self.summary):
            self.guard("print to the console", self._write, line)
        if self.history_dir is not None:
            self.guard("write summary.json", self._write_json, self.summary)

    def _summarise(self, layer_frame: pd.DataFrame) -> dict[str, Any]:
        windows = dict(self._windows)
        if layer_frame is not None and len(layer_frame) and {"phase", "step"} <= set(layer_frame.columns):
            windows = {str(p): int(n) for p, n in layer_frame.groupby("phase", sort=False)["step"].nunique().items()}
        tracker, layers = self.tracker, []
        for name in self._layers:
            label = tracker.label(name)
            mine = [i for i in tracker.incidents if i.layer == name]
            layers.append({
                "label": label,
                "layer": name,
                "incidents": len(mine),
                "alerts": tracker.alerts.get(label, 0),
                "recoveries": tracker.recoveries.get(label, 0),
                "open": [i.to_dict() for i in mine if i.is_open],
            })
        history = str(self.history_dir) if self.history_dir is not None else None
        files = []
        if self.history_dir is not None and self.history_dir.is_dir():
            # Files and the Parquet datasets beside them (folders of part files, read back as one).
            files = sorted(p.name for p in self.history_dir.iterdir() if p.is_file() or p.suffix == ".parquet")
        files = sorted(set(files) | ({"summary.json"} if history else set()))
        knobs = self._knob_metrics or {
            f"controller/{c.rule}/{c.label}": c.new for c in tracker.knobs.values()
        }
        return {
            "windows": windows,
            "last_step": self._last_step,
            "layers": layers,
            "still_collapsed": sorted({i.label for i in tracker.open_incidents() if i.is_collapse}),
            "still_open": sorted({i.label for i in tracker.open_incidents()}),
            "incidents": [i.to_dict() for i in tracker.incidents],
            "controllers": list(self.running),
            "knobs": {k: float(v) for k, v in knobs.items()},
            "history_dir": history,
            "files": files,
            "report_command": f"moe-monitor report {shlex.quote(history)}" if history else None,
        }

    def summary_lines(self, summary: dict[str, Any]) -> list[str]:
        """The console lines of a :attr:`summary` record."""
        windows = ", ".join(f"{n} {phase}" for phase, n in summary["windows"].items()) or "none"
        out = [f"{self.prefix} summary: windows {windows}; last step {summary['last_step']}."]
        for layer in summary["layers"]:
            state = "healthy"
            if layer["open"]:
                first = layer["open"][0]
                state = f"STILL BROKEN since step {first['start_step']} ({', '.join(first['active'])} firing)"
            elif layer["incidents"]:
                state = "recovered"
            out.append(
                f"  {layer['label']} {layer['layer']}: {layer['incidents']} incident(s), {layer['alerts']} alert(s), "
                f"{layer['recoveries']} recovery(ies); {state}"
            )
        still, n = summary["still_open"], len(summary["layers"])
        out.append(f"  still broken at the end: {', '.join(still)} ({len(still)} of {n} layers)" if still else
                   f"  still broken at the end: none of {n} layers")
        if summary["knobs"]:
            knobs = ", ".join(f"{k.removeprefix('controller/')}={_num(v)}" for k, v in summary["knobs"].items())
            out.append(f"  controller knobs at the end: {knobs}")
        if summary["history_dir"]:
            out.append(f"  files: {summary['history_dir']} ({', '.join(summary['files'])})")
            out.append(f"  report: {summary['report_command']}")
        return out

    def _write_json(self, summary: dict[str, Any]) -> None:
        assert self.history_dir is not None
        self.history_dir.mkdir(parents=True, exist_ok=True)
        (self.history_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=float), encoding="utf-8")


def _num(value: float) -> str:
    return "nan" if not math.isfinite(value) else f"{value:.4g}"


def _incident_line(incident: Incident) -> str:
    parts = []
    for rule in incident.rules:
        value, threshold = incident.worst[rule], incident.thresholds.get(rule, math.nan)
        experts = ", ".join(str(e) for e in incident.experts.get(rule, ()))
        if rule == "dead_experts":
            parts.append(f"dead_experts {value:.0f}" + (f" (experts {experts})" if experts else ""))
        elif rule == "nonfinite_logits":
            parts.append("non-finite router logits")
        else:
            sign = "<" if rule == "load_entropy" else ">"
            parts.append(f"{rule} {value:.3g} {sign} {threshold:.3g}" + (f" (on {experts})" if experts else ""))
    return f"{incident.label} {incident.layer}: {', '.join(parts)} [{incident.severity}]"
