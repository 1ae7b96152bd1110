"""The collapse detector: patience, hysteresis, per-layer state and the events; the rules are in :mod:`.rules`.

Every rule (:data:`~moe_monitor.detect.rules.RULE_TABLE`) looks at one layer's statistics of one window and says
*breach*, *healthy* or *no evidence* (an empty window, a statistic the router cannot provide, a window too small
for the dead-expert test). An alert is raised after ``patience`` consecutive breaching windows and cleared after
``recovery`` consecutive healthy windows, where healthy is measured against a threshold moved ``hysteresis``
(relative) to the safe side, so a value that hovers at the threshold neither flaps nor floods the user. Windows
without evidence leave the counts unchanged. Each phase (``"train"``, ``"val"``, ...) keeps its own state.

The detector only reads the snapshot, which the monitor has already reduced across processes, and its state
evolves deterministically from it, so every process raises the same events and takes the same decisions.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from moe_monitor.detect.events import CollapseEvent, event_frame
from moe_monitor.detect.rules import BREACH, HEALTHY, RULE_TABLE, UNKNOWN, Rule, Tuning, Verdict, _finite, read_layer
from moe_monitor.snapshot import Snapshot


@dataclass
class _RuleState:
    breach_streak: int = 0
    healthy_streak: int = 0
    active: bool = False
    since_step: int = -1


class CollapseDetector:
    """Watches window statistics for router collapse and raises alerts with patience and recovery hysteresis.

    Every threshold can be set to ``None`` to switch its rule off. The defaults aim at "no false alarm on a healthy
    run, an alert within a few windows of a real collapse"; the reasons and the measurements behind them are in
    ``docs/detection.md``.

    Load entropy and MaxVio thresholds are *scale-aware*: top-``k`` routing over ``E`` experts cannot push the
    load entropy below ``ln k / ln E`` nor MaxVio above ``E / k - 1`` (see
    :func:`~moe_monitor.detect.achievable_range`), so each layer is judged on the fraction of that range it has used
    up. A fixed threshold in the statistic's own units would never fire for top-2 of 4 experts (MaxVio at most 1)
    or top-4 of 8 (entropy at least 0.67). Events report the statistic and the layer's threshold in the statistic's
    own units; the message also gives the fraction.

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
            received no assignment with probability below this (see
            :func:`~moe_monitor.detect.dead_expert_probability`); then any expert with zero assignments is dead.
            1e-6 over, say, 10 layers x 1000 windows still gives a false-alarm chance of about 1 % for a whole run,
            and it takes only 104 assignments for 8 experts.
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
        # Running baselines of the rules that keep one, by (phase, layer, statistic).
        self._baselines: dict[tuple[str, str, str], deque[float]] = {}
        self._raised: list[CollapseEvent] = []
        self._shared = False  # True once `share_events` hands it its owner's one event history

    def _enabled(self) -> list[tuple[Rule, Any]]:
        """``(rule, threshold)`` of the rules switched on, in table order (read on each call: attributes may change)."""
        out = []
        for rule in RULE_TABLE:
            threshold = getattr(self, rule.argument)
            if threshold is not None and threshold is not False:
                out.append((rule, threshold))
        return out

    @property
    def rules(self) -> tuple[str, ...]:
        """The rules switched on, in evaluation order."""
        return tuple(rule.name for rule, _ in self._enabled())

    @property
    def active(self) -> frozenset[tuple[str, str]]:
        """``(layer, rule)`` pairs with an alert raised and not yet recovered, in any phase."""
        return frozenset((layer, rule) for (_, layer, rule), s in self._states.items() if s.active)

    def active_in(self, phase: str) -> frozenset[tuple[str, str]]:
        """``(layer, rule)`` pairs currently firing in ``phase``."""
        return frozenset((layer, rule) for (p, layer, rule), s in self._states.items() if s.active and p == phase)

    @property
    def events(self) -> list[CollapseEvent]:
        """The alerts and recoveries this object raised since it was built or loaded, oldest first (a copy).

        They are not part of :meth:`state_dict`: a run's one event history is the watcher's (``MoEMonitor.events``,
        ``watch(...).events``), which its checkpoints hold together with the controllers' events. Inside a watcher
        (see :meth:`share_events`) these are the alerts and recoveries of that history, not a second copy.
        """
        if self._shared:
            return [event for event in self._raised if event.kind != "control"]
        return list(self._raised)

    def share_events(self, history: list[CollapseEvent]) -> None:
        """Reads :attr:`events` from ``history`` instead of keeping a list of its own.

        The owner of ``history`` (the watcher) appends what :meth:`update` returns to it, so each event is held
        once; a detector used on its own keeps its own list.

        Args:
            history: the owner's event list, alerts and recoveries among other events (controller changes).

        Example:
            >>> history = []
            >>> detector = CollapseDetector()
            >>> detector.share_events(history)
            >>> history.append(CollapseEvent(10, "train", "layers.0", "dead_experts", 2.0, 0.0, "warning", "..."))
            >>> [e.rule for e in detector.events]
            ['dead_experts']
        """
        self._raised = history
        self._shared = True

    def update(self, snapshot: Snapshot) -> list[CollapseEvent]:
        """Reads one window and returns the alerts and recoveries it triggers (also appended to :attr:`events`).

        Args:
            snapshot: one closed window from ``RouterMonitor.collect``.

        Returns:
            New events, in layer order then rule order; empty when nothing changed.
        """
        if self.phases is not None and snapshot.phase not in self.phases:
            return []
        enabled = self._enabled()
        tuning = Tuning(self.hysteresis, self.z_loss_history, self.z_loss_min, self.saturation_load_entropy)
        new: list[CollapseEvent] = []
        for index, layer in enumerate(snapshot.layer_names):
            baselines = {
                rule.statistic: tuple(self._baselines.get((snapshot.phase, layer, rule.statistic), ()))
                for rule, _ in enabled
                if rule.baseline
            }
            window = read_layer(snapshot, index, baselines)
            verdicts = [(rule, rule.evaluate(window, threshold, tuning)) for rule, threshold in enabled]
            for rule, verdict in verdicts:
                event = self._advance(snapshot, layer, rule, verdict)
                if event is not None:
                    new.append(event)
            for rule, verdict in verdicts:
                if rule.baseline:
                    self._record_baseline(snapshot.phase, layer, rule, window.stat.get(rule.statistic), verdict)
        if not self._shared:
            self._raised.extend(new)
        return new

    def event_frame(self):  # -> pandas.DataFrame (imported lazily)
        """:attr:`events` as a ``pandas.DataFrame``, one row per event, columns :data:`EVENT_COLUMNS`."""
        return event_frame(self.events)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: streaks, active alerts, the running baselines (z-loss history)."""
        return {
            "states": [
                [phase, layer, rule, s.breach_streak, s.healthy_streak, s.active, s.since_step]
                for (phase, layer, rule), s in self._states.items()
            ],
            # [phase, layer, values] for the z-loss, as checkpoints have always held it; other statistics add
            # their name.
            "z_history": [
                [phase, layer, list(h)] if statistic == "z_loss" else [phase, layer, list(h), statistic]
                for (phase, layer, statistic), h in self._baselines.items()
            ],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores what :meth:`state_dict` saved (thresholds come from the constructor, not the checkpoint).

        States written before the watcher kept the one event history also hold ``"events"``; they are ignored
        (the watcher restores its own), and :attr:`events` starts empty.
        """
        self._states = {
            (phase, layer, rule): _RuleState(int(b), int(h), bool(a), int(since))
            for phase, layer, rule, b, h, a, since in state["states"]
        }
        self._baselines = {
            (entry[0], entry[1], entry[3] if len(entry) > 3 else "z_loss"): deque(
                (float(v) for v in entry[2]), maxlen=self.z_loss_history
            )
            for entry in state["z_history"]
        }
        if not self._shared:
            self._raised = []

    # -- patience and hysteresis -------------------------------------------------------------------------------

    def _record_baseline(self, phase: str, layer: str, rule: Rule, value: float | None, verdict: Verdict) -> None:
        if value is None or not _finite(value):
            return
        state = self._states.get((phase, layer, rule.name))
        # The baseline is frozen while the rule breaches or fires: spiking windows appended to the median would
        # raise it until a sustained spike looked like the new normal and "recovered" by itself.
        if verdict.status == BREACH or (state is not None and state.active):
            return
        self._baselines.setdefault((phase, layer, rule.statistic), deque(maxlen=self.z_loss_history)).append(value)

    def _advance(self, snap: Snapshot, layer: str, rule: Rule, verdict: Verdict) -> CollapseEvent | None:
        state = self._states.setdefault((snap.phase, layer, rule.name), _RuleState())
        if verdict.status == UNKNOWN:
            return None
        if not state.active:
            state.breach_streak = state.breach_streak + 1 if verdict.status == BREACH else 0
            if state.breach_streak >= (1 if rule.immediate else self.patience):
                state.active, state.healthy_streak, state.since_step = True, 0, snap.step
                return self._alert(snap, layer, rule, verdict, state.breach_streak)
            return None
        state.healthy_streak = state.healthy_streak + 1 if verdict.status == HEALTHY else 0
        if state.healthy_streak >= self.recovery:
            event = self._recovered(snap, layer, rule, verdict, state)
            state.active, state.breach_streak, state.healthy_streak = False, 0, 0
            return event
        return None

    @staticmethod
    def _alert(snap: Snapshot, layer: str, rule: Rule, v: Verdict, windows: int) -> CollapseEvent:
        lasting = "" if rule.immediate else f" for {windows} consecutive windows"
        message = f"[{snap.phase} step {snap.step}] {layer}: {rule.message(v, lasting)}"
        severity = v.severity or rule.severity
        return CollapseEvent(
            snap.step, snap.phase, layer, rule.name, v.value, v.threshold, severity, message, v.experts, "alert"
        )

    def _recovered(self, snap: Snapshot, layer: str, rule: Rule, v: Verdict, state: _RuleState) -> CollapseEvent:
        value = rule.recovered if rule.recovered is not None else f"{v.value:.3g}"
        text = (
            f"[{snap.phase} step {snap.step}] {layer}: recovered from {rule.name} (alert raised at step "
            f"{state.since_step}); value {value} on the healthy side for {self.recovery} consecutive windows."
        )
        return CollapseEvent(
            snap.step, snap.phase, layer, rule.name, v.value, v.threshold, "info", text, v.experts, "recovery"
        )
