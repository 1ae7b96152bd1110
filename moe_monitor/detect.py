"""Collapse detection: turns a stream of window :class:`~moe_monitor.snapshot.Snapshot` objects into events.

Shape legend: ``L`` monitored router layers, ``E`` experts (columns beyond a layer's own ``num_experts`` are
padding and ignored).

Every rule looks at one layer's statistics of one window and says *breach*, *healthy* or *no evidence* (an
empty window, a statistic the router cannot provide, a window too small for the dead-expert test). An alert is
raised after ``patience`` consecutive breaching windows and cleared after ``recovery`` consecutive healthy windows,
where healthy is measured against a threshold moved ``hysteresis`` (relative) to the safe side, so a value that
hovers at the threshold neither flaps nor floods the user. Windows without evidence leave the counts unchanged.
Each phase (``"train"``, ``"val"``, ...) keeps its own state.

The detector only reads the snapshot, which the monitor has already reduced across processes, and its state
evolves deterministically from it, so every process raises the same events and takes the same decisions.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from moe_monitor.snapshot import STAT_NAMES, Snapshot

SEVERITIES: tuple[str, ...] = ("info", "warning", "critical")
KINDS: tuple[str, ...] = ("alert", "recovery", "control")

# Rule names, in the order the detector evaluates them.
RULES: tuple[str, ...] = (
    "nonfinite_logits",
    "load_entropy",
    "max_violation",
    "dead_experts",
    "dropped_fraction",
    "unrouted_tokens",
    "z_loss_spike",
    "saturation",
)

_SEVERITY = {
    "nonfinite_logits": "critical",
    "load_entropy": "critical",
    "max_violation": "warning",
    "dead_experts": "warning",
    "dropped_fraction": "warning",
    "unrouted_tokens": "warning",
    "z_loss_spike": "warning",
    "saturation": "warning",
}

_BREACH, _HEALTHY, _BETWEEN, _UNKNOWN = "breach", "healthy", "between", "unknown"


@dataclass(frozen=True)
class CollapseEvent:
    """One thing worth telling the user: an alert, a recovery, or a change a controller made.

    Attributes:
        step: the step of the window (or of the controller's decision).
        phase: the phase of the window (``"train"``, ``"val"``, ...).
        layer: module path of the router layer.
        rule: the detector rule (see :data:`RULES`) or, for ``kind="control"``, the knob that changed.
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


@dataclass
class _Verdict:
    """One rule's reading of one layer in one window."""

    status: str
    value: float = math.nan
    threshold: float = math.nan
    experts: tuple[int, ...] = ()
    detail: str = ""


@dataclass
class _RuleState:
    breach_streak: int = 0
    healthy_streak: int = 0
    active: bool = False
    since_step: int = -1


def dead_expert_probability(num_experts: int, assignments: int) -> float:
    """Probability that an expert with a fair share ``1 / E`` of the assignments receives none of them.

    Each assignment lands on a given fair-share expert with probability ``1 / E``, so the chance of zero hits in
    ``assignments`` independent draws is ``(1 - 1/E) ** assignments``. The dead-expert rule only judges windows
    where this is below its ``dead_expert_p``, so an expert that is merely unlucky in a small window is not called
    dead.

    Example:
        >>> round(dead_expert_probability(8, 50), 5)
        0.00126
        >>> dead_expert_probability(8, 104) < 1e-6
        True
        >>> dead_expert_probability(1, 10)
        0.0
    """
    if num_experts <= 1:
        return 0.0
    return math.exp(assignments * math.log1p(-1.0 / num_experts))


def achievable_range(num_experts: int, top_k: int) -> tuple[float, float]:
    """The worst values load entropy and MaxVio can reach for top-``k`` routing over ``E`` experts.

    Each token picks ``k`` distinct experts, so one expert takes at most ``1 / k`` of the assignments: MaxVio is
    at most ``E / k - 1``, and the normalised load entropy is at least ``ln k / ln E`` (all load on ``k`` experts
    equally). The detector judges both statistics on these ranges, so one threshold means the same concentration
    for top-2 of 8 as for top-4 of 8 or top-2 of 4.

    Returns:
        ``(entropy_floor, max_violation_ceiling)``; ``(1.0, 0.0)`` when ``k >= E`` (no imbalance is possible).

    Example:
        >>> [round(x, 3) for x in achievable_range(8, 2)]  # ln 2 / ln 8 = 1/3, 8/2 - 1 = 3
        [0.333, 3.0]
        >>> [round(x, 3) for x in achievable_range(8, 4)], achievable_range(4, 2)
        ([0.667, 1.0], (0.5, 1.0))
    """
    top_k = max(1, int(top_k))
    if num_experts <= top_k:
        return 1.0, 0.0
    return math.log(top_k) / math.log(num_experts), num_experts / top_k - 1


def _probability_text(num_experts: int, assignments: int) -> str:
    """``(1 - 1/E) ** A`` as text, also where the float underflows to 0.

    Example:
        >>> _probability_text(8, 200), _probability_text(8, 20480)
        ('2.5e-12', '1e-1188')
    """
    if num_experts <= 1:
        return "0"
    log10_p = assignments * math.log10(1 - 1 / num_experts)
    return f"{10**log10_p:.1e}" if log10_p > -300 else f"1e{round(log10_p)}"


def _finite(x: float) -> bool:
    return not (math.isnan(x) or math.isinf(x))


def _fmt_experts(experts: Sequence[int], loads: Sequence[float]) -> str:
    return ", ".join(f"{e} ({loads[e]:.0%})" for e in experts)


class CollapseDetector:
    """Watches window statistics for router collapse and raises alerts with patience and recovery hysteresis.

    Every threshold can be set to ``None`` to switch its rule off. The defaults aim at "no false alarm on a healthy
    run, an alert within a few windows of a real collapse"; the reasons and the measurements behind them are in
    ``docs/detection.md``.

    Load entropy and MaxVio thresholds are *scale-aware*: top-``k`` routing over ``E`` experts cannot push the
    load entropy below ``ln k / ln E`` nor MaxVio above ``E / k - 1`` (see :func:`achievable_range`), so each layer
    is judged on the fraction of that range it has used up. A fixed threshold in the statistic's own units would
    never fire for top-2 of 4 experts (MaxVio at most 1) or top-4 of 8 (entropy at least 0.67). Events report the
    statistic and the layer's threshold in the statistic's own units; the message also gives the fraction.

    Args:
        min_load_entropy: alert when the load entropy has fallen below this fraction of the way from its floor
            ``ln k / ln E`` (all load on ``k`` experts) to 1 (perfect balance), i.e. below
            ``floor + min_load_entropy * (1 - floor)``. 0.4 is exactly the former fixed threshold 0.6 for
            top-2 of 8; healthy runs never held below 0.73 of the range for three windows in a row, collapses
            onto two experts read below 0.2.
        max_violation: alert when MaxVio (``max(count) / mean(count) - 1``) exceeds this fraction of its largest
            possible value ``E / k - 1``. 0.8 is MaxVio 2.4 for top-2 of 8: the busiest expert takes 3.4 times its
            fair share, 43 % of the assignments. The former fixed 2.0 (2/3 of the range) was held by healthy runs
            for two windows in a row during early training (0.69 of the range); collapses sit at 0.9-1.0.
        dead_expert_p: the dead-experts rule judges a window only when an expert with a fair share would have
            received no assignment with probability below this (see :func:`dead_expert_probability`); then any
            expert with zero assignments is dead. 1e-6 over, say, 10 layers x 1000 windows still gives a
            false-alarm chance of about 1 % for a whole run, and it takes only 104 assignments for 8 experts.
        max_dropped_fraction: alert when more than this fraction of assignments is dropped for capacity. 0.1:
            beyond 10 % a sizeable part of the batch skips its MLP. This is capacity overflow, not necessarily a
            collapse: a healthy router at capacity factor 1.25 drops 25-60 % of the assignments in its first
            windows and 5-10 % later (measured on the reference model), which is worth a warning.
        max_unrouted_fraction: alert when more than this fraction of a layer's tokens was selected by no expert
            (expert choice with a small capacity; a router that marks tokens "no expert"). Those tokens skip the
            layer's MLP like dropped assignments do, and ``dropped_fraction`` does not see them. 0.1, as for drops.
        nonfinite: alert immediately (no patience) on any token with NaN/Inf router logits; a diverging router
            does not get better by waiting.
        z_loss_spike: alert when the router z-loss exceeds this multiple of its running median over the last
            ``z_loss_history`` windows of the same layer and phase. 3.0: z-loss drifts slowly as logits grow;
            tripling within a few windows means the logits are running away, the usual precursor of divergence.
            Breaching windows, and every window while the alert fires, stay out of the median, so a sustained
            spike keeps firing until the z-loss is back near its pre-spike level.
        z_loss_history: windows in the running median; the rule waits for at least ``max(4, z_loss_history//4)``.
        z_loss_min: no spike is called while the z-loss is below this. 10 means a logsumexp of about 3, the
            size of ordinary logits (zero logits over 8 experts give 4.3); small z-losses have noisy ratios and
            cannot hurt numerically.
        saturation_confidence: with ``saturation_load_entropy``, alert when the mean top-1 router probability is at
            least this *and* the load entropy is below ``saturation_load_entropy``: the softmax is nearly one-hot
            on few experts, so its gradient vanishes and the collapse locks in. 0.9: healthy top-2-of-8 routers of
            the reference model read 0.13-0.47 per window.
        saturation_load_entropy: see ``saturation_confidence``; a fraction of the achievable entropy range like
            ``min_load_entropy``. 0.7 (entropy 0.8 for top-2 of 8) so that saturation shows before the load
            entropy alert does.
        patience: consecutive breaching windows before an alert. 3: one bad window (a skewed batch, a warm-up
            spike) never alerts, and at the usual 50-step log interval the user hears within 150 steps. The
            thresholds leave margin on their own: healthy runs stay quiet with patience 2 as well.
        recovery: consecutive healthy windows before a recovery event clears the alert. 3, for the same reason.
        hysteresis: relative margin between the alert threshold and the healthy threshold, e.g. MaxVio must fall
            to ``0.8 * (1 - 0.1) = 0.72`` of its range (2.16 for top-2 of 8) and entropy rise to
            ``0.4 * (1 + 0.1) = 0.44`` of its range (0.63) to count as healthy.
        phases: phases to watch; ``None`` watches every phase (each with its own state).

    Example:
        >>> from moe_monitor.detect import make_snapshot
        >>> det = CollapseDetector(patience=2)
        >>> collapsed = [[1000, 0, 0, 0]]  # every assignment on expert 0
        >>> det.update(make_snapshot(collapsed, step=1))
        []
        >>> [e.rule for e in det.update(make_snapshot(collapsed, step=2))]
        ['load_entropy', 'max_violation', 'dead_experts']
        >>> sorted(det.active)[0]
        ('layer0', 'dead_experts')
    """

    def __init__(
        self,
        min_load_entropy: float | None = 0.4,
        max_violation: float | None = 0.8,
        dead_expert_p: float | None = 1e-6,
        max_dropped_fraction: float | None = 0.1,
        nonfinite: bool = True,
        z_loss_spike: float | None = 3.0,
        z_loss_history: int = 16,
        z_loss_min: float = 10.0,
        saturation_confidence: float | None = 0.9,
        saturation_load_entropy: float = 0.7,
        patience: int = 3,
        recovery: int = 3,
        hysteresis: float = 0.1,
        phases: Iterable[str] | None = None,
        max_unrouted_fraction: float | None = 0.1,
    ) -> None:
        if patience < 1:
            raise ValueError(f"patience={patience} must be at least 1 window.")
        if recovery < 1:
            raise ValueError(f"recovery={recovery} must be at least 1 window.")
        if not 0 <= hysteresis < 1:
            raise ValueError(f"hysteresis={hysteresis} must be in [0, 1) (a relative margin).")
        if min_load_entropy is not None and not 0 < min_load_entropy < 1:
            raise ValueError(
                f"min_load_entropy={min_load_entropy} must be in (0, 1), a fraction of the range from the entropy "
                "floor ln k / ln E to 1, or None to switch it off."
            )
        if not 0 < saturation_load_entropy <= 1:
            raise ValueError(f"saturation_load_entropy={saturation_load_entropy} must be in (0, 1].")
        if saturation_confidence is not None and not 0 < saturation_confidence < 1:
            raise ValueError(f"saturation_confidence={saturation_confidence} must be in (0, 1), or None.")
        if dead_expert_p is not None and not 0 < dead_expert_p < 1:
            raise ValueError(f"dead_expert_p={dead_expert_p} must be in (0, 1), or None to switch it off.")
        if max_violation is not None and not 0 < max_violation < 1:
            raise ValueError(
                f"max_violation={max_violation} must be in (0, 1), a fraction of the largest possible MaxVio "
                "E/k - 1, or None to switch it off."
            )
        for name, val in (
            ("max_dropped_fraction", max_dropped_fraction),
            ("z_loss_spike", z_loss_spike),
            ("max_unrouted_fraction", max_unrouted_fraction),
        ):
            if val is not None and not val > 0:
                raise ValueError(f"{name}={val} must be positive, or None to switch the rule off.")
        if z_loss_spike is not None and z_loss_spike <= 1:
            raise ValueError(f"z_loss_spike={z_loss_spike} is a ratio to the running median and must exceed 1.")
        if z_loss_history < 4:
            raise ValueError(f"z_loss_history={z_loss_history} must be at least 4 windows.")
        self.min_load_entropy = min_load_entropy
        self.max_violation = max_violation
        self.dead_expert_p = dead_expert_p
        self.max_dropped_fraction = max_dropped_fraction
        self.nonfinite = nonfinite
        self.z_loss_spike = z_loss_spike
        self.z_loss_history = z_loss_history
        self.z_loss_min = z_loss_min
        self.saturation_confidence = saturation_confidence
        self.saturation_load_entropy = saturation_load_entropy
        self.patience = patience
        self.recovery = recovery
        self.hysteresis = hysteresis
        self.phases = None if phases is None else tuple(phases)
        self.max_unrouted_fraction = max_unrouted_fraction
        self._states: dict[tuple[str, str, str], _RuleState] = {}
        self._z_history: dict[tuple[str, str], deque[float]] = {}
        self._events: list[CollapseEvent] = []

    @property
    def rules(self) -> tuple[str, ...]:
        """The rules switched on, in evaluation order."""
        enabled = {
            "nonfinite_logits": self.nonfinite,
            "load_entropy": self.min_load_entropy is not None,
            "max_violation": self.max_violation is not None,
            "dead_experts": self.dead_expert_p is not None,
            "dropped_fraction": self.max_dropped_fraction is not None,
            "unrouted_tokens": self.max_unrouted_fraction is not None,
            "z_loss_spike": self.z_loss_spike is not None,
            "saturation": self.saturation_confidence is not None,
        }
        return tuple(rule for rule in RULES if enabled[rule])

    @property
    def active(self) -> frozenset[tuple[str, str]]:
        """``(layer, rule)`` pairs with an alert raised and not yet recovered, in any phase."""
        return frozenset((layer, rule) for (_, layer, rule), s in self._states.items() if s.active)

    def active_in(self, phase: str) -> frozenset[tuple[str, str]]:
        """``(layer, rule)`` pairs currently firing in ``phase``."""
        return frozenset((layer, rule) for (p, layer, rule), s in self._states.items() if s.active and p == phase)

    @property
    def events(self) -> list[CollapseEvent]:
        """Every alert and recovery raised so far, oldest first (a copy)."""
        return list(self._events)

    def update(self, snapshot: Snapshot) -> list[CollapseEvent]:
        """Reads one window and returns the alerts and recoveries it triggers (also kept in the history).

        Args:
            snapshot: one closed window from ``RouterMonitor.collect``.

        Returns:
            New events, in layer order then rule order; empty when nothing changed.
        """
        if self.phases is not None and snapshot.phase not in self.phases:
            return []
        new: list[CollapseEvent] = []
        for index, layer in enumerate(snapshot.layer_names):
            verdicts = self._evaluate(snapshot, index)
            for rule in self.rules:
                event = self._advance(snapshot, layer, rule, verdicts[rule])
                if event is not None:
                    new.append(event)
            self._record_z_loss(snapshot, index, verdicts.get("z_loss_spike"))
        self._events.extend(new)
        return new

    def event_frame(self):  # -> pandas.DataFrame (imported lazily)
        """Event history as a ``pandas.DataFrame``, one row per event, columns :data:`EVENT_COLUMNS`."""
        import pandas as pd

        return pd.DataFrame([asdict(e) for e in self._events], columns=list(EVENT_COLUMNS))

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: streaks, active alerts, z-loss history, event history."""
        return {
            "states": [
                [phase, layer, rule, s.breach_streak, s.healthy_streak, s.active, s.since_step]
                for (phase, layer, rule), s in self._states.items()
            ],
            "z_history": [[phase, layer, list(h)] for (phase, layer), h in self._z_history.items()],
            "events": [asdict(e) for e in self._events],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores what :meth:`state_dict` saved (thresholds come from the constructor, not the checkpoint)."""
        self._states = {
            (phase, layer, rule): _RuleState(int(b), int(h), bool(a), int(since))
            for phase, layer, rule, b, h, a, since in state["states"]
        }
        self._z_history = {
            (phase, layer): deque((float(v) for v in values), maxlen=self.z_loss_history)
            for phase, layer, values in state["z_history"]
        }
        self._events = [CollapseEvent(**{**e, "experts": tuple(e["experts"])}) for e in state["events"]]

    # -- rule evaluation ---------------------------------------------------------------------------------------

    def _evaluate(self, snap: Snapshot, index: int) -> dict[str, _Verdict]:
        num_experts = int(snap.num_experts[index])
        counts_E = snap.counts[index, :num_experts].double()
        assignments = float(counts_E.sum())
        loads = (counts_E / assignments).tolist() if assignments > 0 else [math.nan] * num_experts
        stat = {name: float(values[index]) for name, values in snap.stats.items()}
        if assignments <= 0:  # an empty window says nothing about the load, whatever a statistic reads
            for name in ("load_entropy", "max_violation", "dropped_fraction"):
                stat[name] = math.nan
        hot = self._hot_experts(loads, num_experts)
        verdicts: dict[str, _Verdict] = {}
        h = self.hysteresis

        nonfinite = int(snap.nonfinite_tokens[index]) if snap.nonfinite_tokens.numel() else 0
        verdicts["nonfinite_logits"] = _Verdict(
            _BREACH if nonfinite > 0 else _HEALTHY, float(nonfinite), 0.0, (), f"{nonfinite} tokens"
        )

        # Load entropy and MaxVio are judged as a fraction of the range top-k routing over E experts can reach
        # (see achievable_range); events keep the statistic's own units, the message shows both.
        top_k = int(snap.top_k[index]) if len(snap.top_k) > index else 1
        floor, ceiling = achievable_range(num_experts, top_k)
        routing = f"top-{max(1, top_k)} of {num_experts}"
        entropy = stat.get("load_entropy", math.nan)
        entropy_n = (entropy - floor) / (1 - floor) if floor < 1 else math.nan
        if self.min_load_entropy is not None:
            verdict = self._lower_bound(entropy_n, self.min_load_entropy, hot)
            starved = sum(1 for x in loads if _finite(x) and x < 0.1 / num_experts)
            verdict.value, verdict.threshold = entropy, floor + self.min_load_entropy * (1 - floor)
            verdict.detail = (
                f"{entropy_n:.2f} of the way from the floor {floor:.2f} ({routing}) to perfect balance; "
                f"experts {_fmt_experts(hot, loads)} take {sum(loads[e] for e in hot):.0%} of the assignments "
                f"and {starved} of {num_experts} experts get less than a tenth of a fair share"
            )
            verdicts["load_entropy"] = verdict

        if self.max_violation is not None:
            vio = stat.get("max_violation", math.nan)
            verdict = self._upper_bound(vio / ceiling if ceiling > 0 else math.nan, self.max_violation, hot)
            verdict.value, verdict.threshold = vio, self.max_violation * ceiling
            if hot and ceiling > 0:
                verdict.detail = (
                    f"{vio / ceiling:.0%} of the largest possible {ceiling:.3g} ({routing}); expert {hot[0]} takes "
                    f"{loads[hot[0]] * num_experts:.1f}x its fair share (busiest: {_fmt_experts(hot, loads)})"
                )
            verdicts["max_violation"] = verdict

        if self.dead_expert_p is not None:
            p_fair = dead_expert_probability(num_experts, int(assignments))
            if assignments <= 0 or p_fair >= self.dead_expert_p:
                verdicts["dead_experts"] = _Verdict(_UNKNOWN)
            else:
                dead = tuple(e for e in range(num_experts) if counts_E[e] == 0)
                verdicts["dead_experts"] = _Verdict(
                    _BREACH if dead else _HEALTHY,
                    float(len(dead)),
                    0.0,
                    dead,
                    f"{len(dead)} of {num_experts} experts (ids {list(dead)}) got no assignment out of "
                    f"{int(assignments)} (a fair-share expert would get none with probability "
                    f"{_probability_text(num_experts, int(assignments))})",
                )

        if self.max_dropped_fraction is not None:
            verdicts["dropped_fraction"] = self._upper_bound(
                stat.get("dropped_fraction", math.nan), self.max_dropped_fraction, hot
            )
            verdicts["dropped_fraction"].detail = f"overloaded experts {_fmt_experts(hot, loads)}"

        if self.max_unrouted_fraction is not None:
            unrouted = stat.get("unrouted_fraction", math.nan)
            verdicts["unrouted_tokens"] = self._upper_bound(unrouted, self.max_unrouted_fraction, ())
            tokens = int(snap.tokens[index]) if snap.tokens.numel() else 0
            if _finite(unrouted):
                verdicts["unrouted_tokens"].detail = f"{round(unrouted * tokens)} of {tokens} tokens"

        if self.z_loss_spike is not None:
            z = stat.get("z_loss", math.nan)
            history = self._z_history.get((snap.phase, snap.layer_names[index]), ())
            if not _finite(z) or len(history) < max(4, self.z_loss_history // 4):
                verdicts["z_loss_spike"] = _Verdict(_UNKNOWN)
            else:
                median = statistics.median(history)
                ratio = z / median if median > 0 else math.inf
                verdicts["z_loss_spike"] = self._upper_bound(ratio, self.z_loss_spike, ())
                if verdicts["z_loss_spike"].status == _BREACH and z < self.z_loss_min:
                    verdicts["z_loss_spike"].status = _BETWEEN
                verdicts["z_loss_spike"].detail = f"z-loss {z:.3g} against a running median of {median:.3g}"

        if self.saturation_confidence is not None:
            conf = stat.get("top1_confidence", math.nan)
            if not (_finite(conf) and _finite(entropy_n)):
                status = _UNKNOWN
            elif conf >= self.saturation_confidence and entropy_n < self.saturation_load_entropy:
                status = _BREACH
            elif conf < self.saturation_confidence * (1 - h) or entropy_n >= self.saturation_load_entropy * (1 + h):
                status = _HEALTHY
            else:
                status = _BETWEEN
            verdicts["saturation"] = _Verdict(
                status,
                conf,
                self.saturation_confidence,
                hot,
                f"top-1 router probability {conf:.3f} with load entropy {entropy:.2f} "
                f"(< {floor + self.saturation_load_entropy * (1 - floor):.2f} for {routing}) on experts "
                f"{_fmt_experts(hot, loads)}",
            )
        return verdicts

    def _lower_bound(self, value: float, threshold: float, experts: tuple[int, ...]) -> _Verdict:
        if not _finite(value):
            return _Verdict(_UNKNOWN)
        if value < threshold:
            status = _BREACH
        elif value >= threshold * (1 + self.hysteresis):
            status = _HEALTHY
        else:
            status = _BETWEEN
        return _Verdict(status, value, threshold, experts)

    def _upper_bound(self, value: float, threshold: float, experts: tuple[int, ...]) -> _Verdict:
        if math.isnan(value):
            return _Verdict(_UNKNOWN)
        if value > threshold:
            status = _BREACH
        elif value <= threshold * (1 - self.hysteresis):
            status = _HEALTHY
        else:
            status = _BETWEEN
        return _Verdict(status, value, threshold, experts)

    @staticmethod
    def _hot_experts(loads: list[float], num_experts: int, limit: int = 4) -> tuple[int, ...]:
        """Experts above 1.5x a fair share, busiest first (at least the busiest one), at most ``limit``."""
        if not loads or not all(_finite(x) for x in loads):
            return ()
        order = sorted(range(num_experts), key=lambda e: -loads[e])
        hot = [e for e in order if loads[e] > 1.5 / num_experts][:limit]
        return tuple(hot or order[:1])

    def _record_z_loss(self, snap: Snapshot, index: int, verdict: _Verdict | None) -> None:
        z = float(snap.stats["z_loss"][index]) if "z_loss" in snap.stats else math.nan
        if self.z_loss_spike is None or not _finite(z):
            return
        layer = snap.layer_names[index]
        state = self._states.get((snap.phase, layer, "z_loss_spike"))
        # The baseline is frozen while the rule breaches or fires: spiking windows appended to the median would
        # raise it until a sustained spike looked like the new normal and "recovered" by itself.
        if (verdict is not None and verdict.status == _BREACH) or (state is not None and state.active):
            return
        self._z_history.setdefault((snap.phase, layer), deque(maxlen=self.z_loss_history)).append(z)

    # -- patience and hysteresis -------------------------------------------------------------------------------

    def _advance(self, snap: Snapshot, layer: str, rule: str, verdict: _Verdict) -> CollapseEvent | None:
        state = self._states.setdefault((snap.phase, layer, rule), _RuleState())
        if verdict.status == _UNKNOWN:
            return None
        if not state.active:
            state.breach_streak = state.breach_streak + 1 if verdict.status == _BREACH else 0
            patience = 1 if rule == "nonfinite_logits" else self.patience
            if state.breach_streak >= patience:
                state.active, state.healthy_streak, state.since_step = True, 0, snap.step
                return self._alert(snap, layer, rule, verdict, state.breach_streak)
            return None
        state.healthy_streak = state.healthy_streak + 1 if verdict.status == _HEALTHY else 0
        if state.healthy_streak >= self.recovery:
            event = self._recovered(snap, layer, rule, verdict, state)
            state.active, state.breach_streak, state.healthy_streak = False, 0, 0
            return event
        return None

    def _alert(self, snap: Snapshot, layer: str, rule: str, v: _Verdict, windows: int) -> CollapseEvent:
        where = f"[{snap.phase} step {snap.step}] {layer}:"
        lasting = "" if rule == "nonfinite_logits" else f" for {windows} consecutive windows"
        severity = _SEVERITY[rule]
        if rule == "load_entropy":
            text = (
                f"router collapse, load entropy {v.value:.2f} < {v.threshold:.2f}{lasting}; {v.detail}. "
                "Try: raise aux_loss_coef (e.g. x10) or let AuxLossController / ExpertBiasController balance it, "
                "add router noise (RouterNoiseController), or lower the learning rate."
            )
        elif rule == "max_violation":
            text = (
                f"load imbalance, MaxVio {v.value:.2f} > {v.threshold:.2f}{lasting}; {v.detail}. "
                "With a capacity limit its overflow is dropped. Try: auxiliary-loss-free expert bias "
                "(ExpertBiasController) or a larger aux_loss_coef (AuxLossController)."
            )
        elif rule == "dead_experts":
            if v.value >= self._num_experts(snap, layer) / 2:
                severity = "critical"
            text = (
                f"dead experts, {v.detail}{lasting}; their weights no longer train. Try: router noise "
                "(RouterNoiseController), expert bias (ExpertBiasController), re-initialising those experts' gate "
                "rows, or checking the router initialisation."
            )
        elif rule == "dropped_fraction":
            text = (
                f"capacity overflow, {v.value:.1%} of assignments dropped > {v.threshold:.1%}{lasting}; "
                f"{v.detail}. Those assignments skip their expert. This is not a router collapse by itself: each "
                "batch routes less evenly than the window, and healthy routers at capacity factor 1.25 drop "
                "25-60 % early in training. Try: raise capacity_factor (e.g. 1.25 -> 2.0) or go dropless, or "
                "rebalance the router (ExpertBiasController or AuxLossController)."
            )
        elif rule == "unrouted_tokens":
            text = (
                f"tokens routed nowhere, {v.detail} ({v.value:.1%} > {v.threshold:.1%}) were selected by no "
                f"expert{lasting}; they skip this layer's experts (only the residual carries them), which the "
                "dropped fraction does not show. Expert choice picks capacity x tokens / experts tokens per "
                "expert: raise capacity_factor, or use token choice."
            )
        elif rule == "nonfinite_logits":
            text = (
                f"non-finite router logits, {v.detail} had NaN/Inf logits in this window (alerted at once). The "
                "router or its input diverged. Try: lower the learning rate, clip gradients, raise z_loss_coef "
                "(e.g. 1e-3), keep the router in fp32, and resume from the last good checkpoint."
            )
        elif rule == "z_loss_spike":
            text = (
                f"router z-loss spike, {v.detail} = {v.value:.1f}x > {v.threshold:.1f}x{lasting}; the router "
                "logits are growing fast, a usual precursor of divergence. Try: raise z_loss_coef (e.g. x10), "
                "lower the learning rate or clip gradients."
            )
        else:
            text = (
                f"router saturated, {v.detail}, top-1 >= {v.threshold:.2f}{lasting}: a nearly one-hot softmax "
                "passes almost no gradient, so the collapse locks in. Try: router noise (RouterNoiseController), "
                "z-loss, expert bias (ExpertBiasController) or a lower learning rate."
            )
        return CollapseEvent(
            snap.step, snap.phase, layer, rule, v.value, v.threshold, severity, f"{where} {text}", v.experts, "alert"
        )

    def _recovered(self, snap: Snapshot, layer: str, rule: str, v: _Verdict, state: _RuleState) -> CollapseEvent:
        value = "none" if rule == "nonfinite_logits" else f"{v.value:.3g}"
        text = (
            f"[{snap.phase} step {snap.step}] {layer}: recovered from {rule} (alert raised at step "
            f"{state.since_step}); value {value} on the healthy side for {self.recovery} consecutive windows."
        )
        return CollapseEvent(
            snap.step, snap.phase, layer, rule, v.value, v.threshold, "info", text, v.experts, "recovery"
        )

    @staticmethod
    def _num_experts(snap: Snapshot, layer: str) -> int:
        return int(snap.num_experts[snap.layer_names.index(layer)])


def make_snapshot(
    counts: Sequence[Sequence[int]] | torch.Tensor,
    step: int = 0,
    phase: str = "train",
    top_k: int = 1,
    dropped: Sequence[int] | None = None,
    nonfinite_tokens: Sequence[int] | None = None,
    layer_names: Sequence[str] | None = None,
    **stats: Sequence[float],
) -> Snapshot:
    """Builds a :class:`Snapshot` from per-expert counts, computing the count-based statistics (docs/metrics.md).

    The statistics come from :func:`moe_monitor.stats.compute`, as the monitor's do (so a single expert's load
    entropy is NaN, 0/0, and an empty window's statistics are NaN). Meant for tests, examples and replaying logged
    counts through a detector. Router-probability statistics
    (``aux_loss``, ``z_loss``, ``router_entropy``, ``top1_confidence``) are NaN unless given as keyword arguments,
    one value per layer.

    Example:
        >>> s = make_snapshot([[3, 1, 0, 0]], top_k=1)
        >>> round(float(s.stats["max_violation"][0]), 3), int(s.stats["dead_experts"][0])
        (2.0, 2)
        >>> round(float(make_snapshot([[5, 5, 5, 5]]).stats["load_entropy"][0]), 6)
        1.0
    """
    from moe_monitor import stats as moe_stats

    counts_LE = torch.as_tensor(counts, dtype=torch.int64)
    num_layers, num_experts = counts_LE.shape
    tokens_L = counts_LE.sum(dim=1) // top_k
    dropped_L = torch.as_tensor(dropped if dropped is not None else [0] * num_layers, dtype=torch.int64)
    zeros_L = torch.zeros(num_layers, dtype=torch.float64)
    # No router probabilities or logits: zero known tokens make their statistics NaN (stats.compute's 0/0).
    computed = moe_stats.compute(
        counts_LE.double(),
        torch.zeros(num_layers, num_experts, dtype=torch.float64),
        torch.full((num_layers,), num_experts),
        tokens_L.double(),
        prob_tokens_L=zeros_L,
        logit_tokens_L=zeros_L,
        z_sum_L=zeros_L,
        entropy_sum_L=zeros_L,
        top1_sum_L=zeros_L,
        dropped_L=dropped_L.double(),
    )
    all_stats = {
        name: torch.as_tensor(stats[name], dtype=torch.float64) if name in stats else computed[name]
        for name in STAT_NAMES
    }
    return Snapshot(
        step=step,
        phase=phase,
        layer_names=list(layer_names) if layer_names is not None else [f"layer{i}" for i in range(num_layers)],
        num_experts=[num_experts] * num_layers,
        top_k=[top_k] * num_layers,
        counts=counts_LE,
        tokens=tokens_L,
        dropped=dropped_L,
        nonfinite_tokens=torch.as_tensor(
            nonfinite_tokens if nonfinite_tokens is not None else [0] * num_layers, dtype=torch.int64
        ),
        stats=all_stats,
    )
