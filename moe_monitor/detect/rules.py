"""The detector's rules as a table: one :class:`Rule` per rule, each a pure reading of one layer's window.

Shape legend: ``E`` experts of one layer (columns beyond the layer's own ``num_experts`` are padding, ignored).

A rule reads a :class:`LayerWindow` (one layer's statistics of one window, plus the running baseline of its
statistic where it keeps one) and its threshold, and returns a :class:`Verdict`: *breach*, *healthy*, *between*
(inside the hysteresis band) or *unknown* (no evidence). It keeps no state: patience, hysteresis streaks, the
baselines and the events belong to :class:`~moe_monitor.detect.CollapseDetector`. A new rule is one entry of
:data:`RULE_TABLE` (its threshold one argument of the detector).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

from moe_monitor.snapshot import Snapshot

BREACH, HEALTHY, BETWEEN, UNKNOWN = "breach", "healthy", "between", "unknown"


@dataclass
class Verdict:
    """One rule's reading of one layer in one window.

    Attributes:
        status: ``"breach"``, ``"healthy"``, ``"between"`` (neither; streaks reset) or ``"unknown"`` (no evidence:
            streaks unchanged).
        value: the statistic, in its own units (what an event reports).
        threshold: the threshold, in the statistic's own units.
        experts: experts involved.
        detail: the rule's findings, for the message.
        severity: this window's severity when it differs from the rule's (half the experts dead is critical).

    Example:
        >>> v = upper_bound(0.9, 0.8, hysteresis=0.1)
        >>> v.status, v.value, v.threshold, v.severity
        ('breach', 0.9, 0.8, None)
    """

    status: str
    value: float = math.nan
    threshold: float = math.nan
    experts: tuple[int, ...] = ()
    detail: str = ""
    severity: str | None = None


@dataclass(frozen=True)
class Tuning:
    """The detector's settings that rules read besides their own threshold.

    Example:
        >>> tunings = Tuning(0.1, 16, 10.0, 0.7), Tuning(0.0, 16, 10.0, 0.7)
        >>> [lower_bound(0.42, 0.4, t.hysteresis).status for t in tunings]
        ['between', 'healthy']
    """

    hysteresis: float
    z_loss_history: int
    z_loss_min: float
    saturation_load_entropy: float


@dataclass(frozen=True)
class LayerWindow:
    """One layer's window, as every rule reads it.

    Attributes:
        num_experts: the layer's ``E``.
        top_k: experts per token (1 when the snapshot does not say).
        counts_E: assignments per expert.
        loads: share of the assignments per expert (NaN for an empty window).
        stat: the snapshot's statistics of this layer; the load statistics are NaN for an empty window, whatever
            the snapshot reads.
        tokens: tokens of the window.
        nonfinite: tokens with NaN/Inf router logits.
        baselines: running history of a statistic (by name) over earlier windows, for rules that keep one.

    Example:
        >>> from moe_monitor.detect import make_snapshot
        >>> w = read_layer(make_snapshot([[30, 10, 0, 0]], top_k=2), 0, {})
        >>> w.assignments, w.routing, w.range, round(w.entropy_n, 3)  # entropy 0.41 is below top-2 of 4's floor 0.5
        (40.0, 'top-2 of 4', (0.5, 1.0), -0.189)
    """

    num_experts: int
    top_k: int
    counts_E: tuple[float, ...]
    loads: tuple[float, ...]
    stat: Mapping[str, float]
    tokens: int
    nonfinite: int
    baselines: Mapping[str, tuple[float, ...]]

    @property
    def assignments(self) -> float:
        return sum(self.counts_E)

    @cached_property
    def hot(self) -> tuple[int, ...]:
        return hot_experts(self.loads, self.num_experts)

    @cached_property
    def range(self) -> tuple[float, float]:
        """``(entropy_floor, max_violation_ceiling)`` of :func:`achievable_range`."""
        return achievable_range(self.num_experts, self.top_k)

    @property
    def routing(self) -> str:
        return f"top-{max(1, self.top_k)} of {self.num_experts}"

    @property
    def entropy(self) -> float:
        return self.stat.get("load_entropy", math.nan)

    @cached_property
    def entropy_n(self) -> float:
        """Load entropy as a fraction of its achievable range (0 at the floor, 1 at perfect balance)."""
        floor = self.range[0]
        return (self.entropy - floor) / (1 - floor) if floor < 1 else math.nan


def read_layer(snap: Snapshot, index: int, baselines: Mapping[str, tuple[float, ...]]) -> LayerWindow:
    """The :class:`LayerWindow` of layer ``index`` of ``snap``.

    Example:
        >>> from moe_monitor.detect import make_snapshot
        >>> w = read_layer(make_snapshot([[6, 2, 0, 0]]), 0, {})
        >>> w.loads, w.hot, w.routing
        ((0.75, 0.25, 0.0, 0.0), (0,), 'top-1 of 4')
    """
    num_experts = int(snap.num_experts[index])
    counts_E = tuple(snap.counts[index, :num_experts].double().tolist())
    assignments = sum(counts_E)
    loads = tuple(c / assignments for c in counts_E) if assignments > 0 else (math.nan,) * num_experts
    stat = {name: float(values[index]) for name, values in snap.stats.items()}
    if assignments <= 0:  # an empty window says nothing about the load, whatever a statistic reads
        for name in ("load_entropy", "max_violation", "dropped_fraction"):
            stat[name] = math.nan
    return LayerWindow(
        num_experts=num_experts,
        top_k=int(snap.top_k[index]) if len(snap.top_k) > index else 1,
        counts_E=counts_E,
        loads=loads,
        stat=stat,
        tokens=int(snap.tokens[index]) if snap.tokens.numel() else 0,
        nonfinite=int(snap.nonfinite_tokens[index]) if snap.nonfinite_tokens.numel() else 0,
        baselines=baselines,
    )


@dataclass(frozen=True)
class Rule:
    """One detector rule: what it reads, how it judges, what it says.

    Attributes:
        name: the rule's name in events (:data:`RULES`).
        severity: the severity of its alerts (a :class:`Verdict` may raise it for one window).
        argument: the :class:`~moe_monitor.detect.CollapseDetector` argument holding its threshold; ``None``
            (or ``False``) there switches the rule off.
        statistic: the statistic it judges (a :data:`~moe_monitor.snapshot.STAT_NAMES` entry, or the snapshot
            field it counts).
        evaluate: ``evaluate(window, threshold, tuning) -> Verdict``, pure. ``threshold`` is the argument's value,
            in the units the detector documents for it (a fraction of the achievable range for the load entropy
            and MaxVio rules); the verdict reports value and threshold in the statistic's own units.
        message: ``message(verdict, lasting) -> str``, the alert text after ``"[phase step N] layer:"``;
            ``lasting`` is ``" for N consecutive windows"`` (empty for immediate rules).
        immediate: alert on the first breaching window (no patience).
        baseline: the detector keeps a running history of ``statistic`` per layer for it (``z_loss_history``
            windows, frozen while the rule breaches or fires), read as ``window.baselines[statistic]``.
        recovered: the text for the value in its recovery message (default: the value).

    Example:
        >>> from moe_monitor.detect import make_snapshot
        >>> rule = RULE_TABLE[1]
        >>> window = read_layer(make_snapshot([[1000, 0, 0, 0]]), 0, {})
        >>> verdict = rule.evaluate(window, 0.4, Tuning(0.1, 16, 10.0, 0.7))
        >>> rule.name, rule.argument, verdict.status, verdict.value, round(verdict.threshold, 3)
        ('load_entropy', 'min_load_entropy', 'breach', 0.0, 0.4)
        >>> rule.message(verdict, "")[:34]
        'router collapse, load entropy 0.00'
    """

    name: str
    severity: str
    argument: str
    statistic: str
    evaluate: Callable[[LayerWindow, float, Tuning], Verdict]
    message: Callable[[Verdict, str], str]
    immediate: bool = False
    baseline: bool = False
    recovered: str | None = None


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


def hot_experts(loads: Sequence[float], num_experts: int, limit: int = 4) -> tuple[int, ...]:
    """Experts above 1.5x a fair share, busiest first (at least the busiest one), at most ``limit``.

    Example:
        >>> hot_experts([0.5, 0.3, 0.1, 0.1], 4), hot_experts([0.25] * 4, 4), hot_experts([math.nan] * 2, 2)
        ((0,), (0,), ())
    """
    if not loads or not all(_finite(x) for x in loads):
        return ()
    order = sorted(range(num_experts), key=lambda e: -loads[e])
    hot = [e for e in order if loads[e] > 1.5 / num_experts][:limit]
    return tuple(hot or order[:1])


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


def lower_bound(value: float, threshold: float, hysteresis: float, experts: tuple[int, ...] = ()) -> Verdict:
    """Breach below ``threshold``, healthy from ``threshold * (1 + hysteresis)``; unknown when not finite.

    Example:
        >>> [lower_bound(v, 0.4, 0.1).status for v in (0.3, 0.42, 0.5, math.nan)]
        ['breach', 'between', 'healthy', 'unknown']
    """
    if not _finite(value):
        return Verdict(UNKNOWN)
    if value < threshold:
        status = BREACH
    elif value >= threshold * (1 + hysteresis):
        status = HEALTHY
    else:
        status = BETWEEN
    return Verdict(status, value, threshold, experts)


def upper_bound(value: float, threshold: float, hysteresis: float, experts: tuple[int, ...] = ()) -> Verdict:
    """Breach above ``threshold``, healthy up to ``threshold * (1 - hysteresis)``; unknown when NaN.

    Example:
        >>> [upper_bound(v, 0.8, 0.1).status for v in (0.9, 0.75, 0.7, math.inf, math.nan)]
        ['breach', 'between', 'healthy', 'breach', 'unknown']
    """
    if math.isnan(value):
        return Verdict(UNKNOWN)
    if value > threshold:
        status = BREACH
    elif value <= threshold * (1 - hysteresis):
        status = HEALTHY
    else:
        status = BETWEEN
    return Verdict(status, value, threshold, experts)


# -- the rules -------------------------------------------------------------------------------------------------


def _nonfinite_logits(w: LayerWindow, threshold: float, tuning: Tuning) -> Verdict:
    return Verdict(BREACH if w.nonfinite > 0 else HEALTHY, float(w.nonfinite), 0.0, (), f"{w.nonfinite} tokens")


def _load_entropy(w: LayerWindow, threshold: float, tuning: Tuning) -> Verdict:
    floor, hot = w.range[0], w.hot
    verdict = lower_bound(w.entropy_n, threshold, tuning.hysteresis, hot)
    starved = sum(1 for x in w.loads if _finite(x) and x < 0.1 / w.num_experts)
    verdict.value, verdict.threshold = w.entropy, floor + threshold * (1 - floor)
    verdict.detail = (
        f"{w.entropy_n:.2f} of the way from the floor {floor:.2f} ({w.routing}) to perfect balance; "
        f"experts {_fmt_experts(hot, w.loads)} take {sum(w.loads[e] for e in hot):.0%} of the assignments "
        f"and {starved} of {w.num_experts} experts get less than a tenth of a fair share"
    )
    return verdict


def _max_violation(w: LayerWindow, threshold: float, tuning: Tuning) -> Verdict:
    ceiling, hot = w.range[1], w.hot
    vio = w.stat.get("max_violation", math.nan)
    verdict = upper_bound(vio / ceiling if ceiling > 0 else math.nan, threshold, tuning.hysteresis, hot)
    verdict.value, verdict.threshold = vio, threshold * ceiling
    if hot and ceiling > 0:
        verdict.detail = (
            f"{vio / ceiling:.0%} of the largest possible {ceiling:.3g} ({w.routing}); expert {hot[0]} takes "
            f"{w.loads[hot[0]] * w.num_experts:.1f}x its fair share (busiest: {_fmt_experts(hot, w.loads)})"
        )
    return verdict


def _dead_experts(w: LayerWindow, threshold: float, tuning: Tuning) -> Verdict:
    assignments = int(w.assignments)
    if assignments <= 0 or dead_expert_probability(w.num_experts, assignments) >= threshold:
        return Verdict(UNKNOWN)
    dead = tuple(e for e in range(w.num_experts) if w.counts_E[e] == 0)
    return Verdict(
        BREACH if dead else HEALTHY,
        float(len(dead)),
        0.0,
        dead,
        f"{len(dead)} of {w.num_experts} experts (ids {list(dead)}) got no assignment out of {assignments} (a "
        f"fair-share expert would get none with probability {_probability_text(w.num_experts, assignments)})",
        "critical" if len(dead) >= w.num_experts / 2 else None,
    )


def _dropped_fraction(w: LayerWindow, threshold: float, tuning: Tuning) -> Verdict:
    hot = w.hot
    verdict = upper_bound(w.stat.get("dropped_fraction", math.nan), threshold, tuning.hysteresis, hot)
    verdict.detail = f"overloaded experts {_fmt_experts(hot, w.loads)}"
    return verdict


def _unrouted_tokens(w: LayerWindow, threshold: float, tuning: Tuning) -> Verdict:
    unrouted = w.stat.get("unrouted_fraction", math.nan)
    verdict = upper_bound(unrouted, threshold, tuning.hysteresis)
    if _finite(unrouted):
        verdict.detail = f"{round(unrouted * w.tokens)} of {w.tokens} tokens"
    return verdict


def _z_loss_spike(w: LayerWindow, threshold: float, tuning: Tuning) -> Verdict:
    z = w.stat.get("z_loss", math.nan)
    history = w.baselines.get("z_loss", ())
    if not _finite(z) or len(history) < max(4, tuning.z_loss_history // 4):
        return Verdict(UNKNOWN)
    median = statistics.median(history)
    verdict = upper_bound(z / median if median > 0 else math.inf, threshold, tuning.hysteresis)
    if verdict.status == BREACH and z < tuning.z_loss_min:
        verdict.status = BETWEEN
    verdict.detail = f"z-loss {z:.3g} against a running median of {median:.3g}"
    return verdict


def _saturation(w: LayerWindow, threshold: float, tuning: Tuning) -> Verdict:
    conf, entropy_n, h = w.stat.get("top1_confidence", math.nan), w.entropy_n, tuning.hysteresis
    if not (_finite(conf) and _finite(entropy_n)):
        status = UNKNOWN
    elif conf >= threshold and entropy_n < tuning.saturation_load_entropy:
        status = BREACH
    elif conf < threshold * (1 - h) or entropy_n >= tuning.saturation_load_entropy * (1 + h):
        status = HEALTHY
    else:
        status = BETWEEN
    floor, hot = w.range[0], w.hot
    return Verdict(
        status,
        conf,
        threshold,
        hot,
        f"top-1 router probability {conf:.3f} with load entropy {w.entropy:.2f} "
        f"(< {floor + tuning.saturation_load_entropy * (1 - floor):.2f} for {w.routing}) on experts "
        f"{_fmt_experts(hot, w.loads)}",
    )


RULE_TABLE: tuple[Rule, ...] = (
    Rule(
        "nonfinite_logits", "critical", "nonfinite", "nonfinite_tokens", _nonfinite_logits,
        lambda v, lasting: (
            f"non-finite router logits, {v.detail} had NaN/Inf logits in this window (alerted at once). The "
            "router or its input diverged. Try: lower the learning rate, clip gradients, raise z_loss_coef "
            "(e.g. 1e-3), keep the router in fp32, and resume from the last good checkpoint."
        ),
        immediate=True,
        recovered="none",
    ),
    Rule(
        "load_entropy", "critical", "min_load_entropy", "load_entropy", _load_entropy,
        lambda v, lasting: (
            f"router collapse, load entropy {v.value:.2f} < {v.threshold:.2f}{lasting}; {v.detail}. "
            "Try: raise aux_loss_coef (e.g. x10) or let AuxLossController / ExpertBiasController balance it, "
            "add router noise (RouterNoiseController), or lower the learning rate."
        ),
    ),
    Rule(
        "max_violation", "warning", "max_violation", "max_violation", _max_violation,
        lambda v, lasting: (
            f"load imbalance, MaxVio {v.value:.2f} > {v.threshold:.2f}{lasting}; {v.detail}. "
            "With a capacity limit its overflow is dropped. Try: auxiliary-loss-free expert bias "
            "(ExpertBiasController) or a larger aux_loss_coef (AuxLossController)."
        ),
    ),
    Rule(
        "dead_experts", "warning", "dead_expert_p", "dead_experts", _dead_experts,
        lambda v, lasting: (
            f"dead experts, {v.detail}{lasting}; their weights no longer train. Try: router noise "
            "(RouterNoiseController), expert bias (ExpertBiasController), re-initialising those experts' gate "
            "rows, or checking the router initialisation."
        ),
    ),
    Rule(
        "dropped_fraction", "warning", "max_dropped_fraction", "dropped_fraction", _dropped_fraction,
        lambda v, lasting: (
            f"capacity overflow, {v.value:.1%} of assignments dropped > {v.threshold:.1%}{lasting}; "
            f"{v.detail}. Those assignments skip their expert. This is not a router collapse by itself: each "
            "batch routes less evenly than the window, and healthy routers at capacity factor 1.25 drop "
            "25-60 % early in training. Try: raise capacity_factor (e.g. 1.25 -> 2.0) or go dropless, or "
            "rebalance the router (ExpertBiasController or AuxLossController)."
        ),
    ),
    Rule(
        "unrouted_tokens", "warning", "max_unrouted_fraction", "unrouted_fraction", _unrouted_tokens,
        lambda v, lasting: (
            f"tokens routed nowhere, {v.detail} ({v.value:.1%} > {v.threshold:.1%}) were selected by no "
            f"expert{lasting}; they skip this layer's experts (only the residual carries them), which the "
            "dropped fraction does not show. Expert choice picks capacity x tokens / experts tokens per "
            "expert: raise capacity_factor, or use token choice."
        ),
    ),
    Rule(
        "z_loss_spike", "warning", "z_loss_spike", "z_loss", _z_loss_spike,
        lambda v, lasting: (
            f"router z-loss spike, {v.detail} = {v.value:.1f}x > {v.threshold:.1f}x{lasting}; the router "
            "logits are growing fast, a usual precursor of divergence. Try: raise z_loss_coef (e.g. x10), "
            "lower the learning rate or clip gradients."
        ),
        baseline=True,
    ),
    Rule(
        "saturation", "warning", "saturation_confidence", "top1_confidence", _saturation,
        lambda v, lasting: (
            f"router saturated, {v.detail}, top-1 >= {v.threshold:.2f}{lasting}: a nearly one-hot softmax "
            "passes almost no gradient, so the collapse locks in. Try: router noise (RouterNoiseController), "
            "z-loss, expert bias (ExpertBiasController) or a lower learning rate."
        ),
    ),
)  # fmt: skip

# Rule names, in the order the detector evaluates them.
RULES: tuple[str, ...] = tuple(rule.name for rule in RULE_TABLE)
