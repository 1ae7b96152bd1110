"""CollapseDetector on hand-built snapshots: every rule, patience, hysteresis, guards, phases and state."""

from __future__ import annotations

import io
import math

import pytest
import torch

from moe_monitor.detect import EVENT_COLUMNS, CollapseDetector, CollapseEvent, dead_expert_probability, make_snapshot
from moe_monitor.detect.rules import RULE_TABLE

# Top-2 of 8 experts unless a test says otherwise: the default model's routing, where entropy can fall to
# ln 2 / ln 8 = 1/3 and MaxVio rise to 8 / 2 - 1 = 3.
TOP_K = 2
BALANCED = [[1000] * 8]
# Experts 0 and 1 take 7/8 of 8000 assignments, the rest share 1/8: MaxVio 3 (the largest possible for top-2 of 8),
# entropy ~0.58 (0.37 of the range from 1/3 to 1), no dead experts.
SKEWED = [[4000, 3000] + [1000 // 6] * 5 + [1000 - 5 * (1000 // 6)]]


def snap(counts, top_k: int = TOP_K, **kwargs):
    return make_snapshot(counts, top_k=top_k, **kwargs)


def only(detector: CollapseDetector, keep: str) -> CollapseDetector:
    """Switches off every rule but ``keep`` (so a test sees one rule's events)."""
    for rule in RULE_TABLE:
        if rule.name != keep:
            setattr(detector, rule.argument, None)
    return detector


def feed(detector: CollapseDetector, counts, n: int, start: int = 1, **kwargs) -> list[list[CollapseEvent]]:
    return [detector.update(snap(counts, step=start + i, **kwargs)) for i in range(n)]


def entropy(counts: list[int]) -> float:
    total = sum(counts)
    return -sum(c / total * math.log(c / total) for c in counts if c) / math.log(len(counts))


def loop_stats(counts: list[int], dropped: int) -> dict[str, float]:
    """The count statistics of docs/metrics.md by plain loops over one layer's counts (NaN where a formula is 0/0)."""
    n, total = len(counts), sum(counts)
    if total == 0:
        names = ("load_entropy", "max_violation", "cv", "gini", "dead_experts", "dropped_fraction")
        return dict.fromkeys(names, math.nan)
    mean = total / n
    ranked = sorted(counts)
    return {
        # A single expert is its own perfect balance (the stats module's rule for E = 1: its degenerate ideal).
        "load_entropy": entropy(counts) if n > 1 else 1.0,
        "max_violation": max(counts) / mean - 1,
        "cv": math.sqrt(sum((c - mean) ** 2 for c in counts) / n) / mean,
        "gini": sum((2 * i - n - 1) * c for i, c in enumerate(ranked, start=1)) / (n * total),
        "dead_experts": float(sum(1 for c in counts if c == 0)),
        "dropped_fraction": dropped / total,
    }


@pytest.mark.parametrize(
    "counts, dropped",
    [(SKEWED[0], 700), ([0, 3, 0, 9, 1], 0), ([12], 2), ([0, 0, 0], 0)],
    ids=["skewed", "dead", "one_expert", "empty"],
)
def test_make_snapshot_statistics_match_plain_loops(counts, dropped):
    window = snap([counts, counts[::-1]], top_k=1, dropped=[dropped, 0])
    for layer, layer_dropped in enumerate((dropped, 0)):
        for name, expected in loop_stats(counts, layer_dropped).items():
            assert float(window.stats[name][layer]) == pytest.approx(expected, nan_ok=True), (layer, name)
    # No router probabilities or logits were given: their statistics are unknown, not 0.
    for name in ("aux_loss", "z_loss", "router_entropy", "top1_confidence"):
        assert window.stats[name].isnan().all(), name
    assert window.tokens.tolist() == [sum(counts)] * 2


def test_make_snapshot_takes_given_statistics_and_counts_tokens_per_top_k():
    window = snap(SKEWED, z_loss=[12.5])
    assert window.stats["z_loss"].tolist() == [12.5] and window.stats["aux_loss"].isnan().all()
    assert int(window.tokens[0]) == sum(SKEWED[0]) // 2


def test_load_entropy_alert_after_patience_with_actionable_message():
    det = only(CollapseDetector(patience=3), "load_entropy")
    events = feed(det, SKEWED, 3, layer_names=["blocks.1.moe.router"])
    assert events[0] == [] and events[1] == []
    (event,) = events[2]
    assert (event.kind, event.rule, event.severity, event.step) == ("alert", "load_entropy", "critical", 3)
    # Reported in the statistic's own units: the threshold 0.4 of the range [1/3, 1] is entropy 0.6.
    assert event.value == pytest.approx(entropy(SKEWED[0])) and event.threshold == pytest.approx(1 / 3 + 0.4 * 2 / 3)
    assert event.experts == (0, 1)
    for text in ("blocks.1.moe.router", "0.58 < 0.60", "0.36 of the way", "top-2 of 8", "0 (50%), 1 (38%)", "Try:"):
        assert text in event.message
    assert det.active == {("blocks.1.moe.router", "load_entropy")}


def test_patience_needs_consecutive_windows():
    det = only(CollapseDetector(patience=3), "load_entropy")
    seq = [SKEWED, SKEWED, BALANCED, SKEWED, SKEWED, BALANCED, SKEWED, SKEWED, SKEWED]
    fired = [i for i, counts in enumerate(seq) if det.update(snap(counts, step=i))]
    assert fired == [8]


def test_max_violation_threshold_and_busiest_expert():
    det = only(CollapseDetector(patience=1, max_violation=2 / 3), "max_violation")
    # Top-2 of 8: MaxVio at most 3, so 2/3 of the range is MaxVio 2.0. Exactly 2.0 (3x the mean) is not above it.
    assert det.update(snap([[300, 100, 100, 100, 100, 100, 0, 0]])) == []  # mean 100 -> MaxVio 2.0
    (event,) = det.update(snap([[320, 100, 100, 100, 100, 80, 0, 0]]))  # mean 100 -> 2.2
    assert event.value == pytest.approx(2.2) and event.threshold == pytest.approx(2.0) and event.experts[0] == 0
    assert "MaxVio 2.20 > 2.00" in event.message and "73% of the largest possible 3" in event.message
    assert "3.2x its fair share" in event.message


def test_dead_experts_only_judged_when_a_fair_share_expert_would_certainly_get_tokens():
    det = only(CollapseDetector(patience=1, dead_expert_p=1e-6), "dead_experts")
    # Independent bound: the smallest A with (7/8)^A < 1e-6.
    a_min = next(a for a in range(1, 1000) if (7 / 8) ** a < 1e-6)
    assert a_min == 104
    small = [[a_min - 1 - 6 * 10] + [10] * 6 + [0]]  # a_min - 1 assignments, expert 7 empty
    assert sum(small[0]) == a_min - 1
    assert all(ev == [] for ev in feed(det, small, 20))
    big = [[a_min - 6 * 10] + [10] * 6 + [0]]
    (event,) = det.update(snap(big, step=99))
    assert event.rule == "dead_experts" and event.experts == (7,) and event.value == 1.0
    assert event.severity == "warning" and "ids [7]" in event.message


def test_dead_expert_probability_formula():
    for e, a in ((8, 10), (16, 300), (64, 2000)):
        assert dead_expert_probability(e, a) == pytest.approx((1 - 1 / e) ** a, rel=1e-12)


def test_many_dead_experts_are_critical():
    det = only(CollapseDetector(patience=1), "dead_experts")
    (event,) = det.update(snap([[500, 500, 500, 500, 0, 0, 0, 0]]))
    assert event.severity == "critical" and event.experts == (4, 5, 6, 7)


def test_dropped_fraction_rule():
    det = only(CollapseDetector(patience=2, max_dropped_fraction=0.1), "dropped_fraction")
    assert feed(det, BALANCED, 3, dropped=[800]) == [[], [], []]  # 10 % is not above 10 %
    events = feed(det, BALANCED, 2, start=10, dropped=[1200])
    (event,) = events[1]
    assert event.value == pytest.approx(0.15) and "15.0% of assignments dropped" in event.message


def test_nonfinite_logits_alert_immediately_and_critical():
    det = CollapseDetector(patience=5)
    (event,) = det.update(snap(BALANCED, step=7, nonfinite_tokens=[3]))
    assert (event.rule, event.severity, event.step, event.value) == ("nonfinite_logits", "critical", 7, 3.0)
    assert "3 tokens" in event.message and "learning rate" in event.message


def test_z_loss_spike_against_running_median_and_floor():
    det = only(CollapseDetector(patience=2, z_loss_spike=3.0, z_loss_min=10.0), "z_loss_spike")
    for i in range(6):
        assert det.update(snap(BALANCED, step=i, z_loss=[5.0 + 0.1 * i])) == []
    # 4x the median but below the floor: no spike.
    assert feed(det, BALANCED, 3, start=10, z_loss=[8.0]) == [[], [], []]
    det = only(CollapseDetector(patience=2, z_loss_spike=3.0, z_loss_min=10.0), "z_loss_spike")
    for i in range(6):
        det.update(snap(BALANCED, step=i, z_loss=[5.0]))
    first = det.update(snap(BALANCED, step=6, z_loss=[40.0]))
    (event,) = det.update(snap(BALANCED, step=7, z_loss=[40.0]))
    assert first == [] and event.rule == "z_loss_spike"
    assert event.value == pytest.approx(40.0 / 5.0)  # median of [5]*6 + [40] is 5
    assert "z-loss 40" in event.message


def test_z_loss_waits_for_history():
    det = only(CollapseDetector(patience=1, z_loss_history=16), "z_loss_spike")
    assert [det.update(snap(BALANCED, step=i, z_loss=[1.0 if i == 0 else 100.0])) for i in range(4)] == [
        [],
        [],
        [],
        [],
    ]


def test_saturation_needs_both_confidence_and_low_entropy():
    det = only(CollapseDetector(patience=1, saturation_confidence=0.9, saturation_load_entropy=0.8), "saturation")
    assert det.update(snap(BALANCED, top1_confidence=[0.97])) == []  # confident but balanced
    assert det.update(snap(SKEWED, top1_confidence=[0.5])) == []  # skewed but not saturated
    (event,) = det.update(snap(SKEWED, top1_confidence=[0.97]))
    assert event.rule == "saturation" and event.value == pytest.approx(0.97) and event.experts == (0, 1)


def test_recovery_needs_hysteresis_and_consecutive_healthy_windows():
    # 0.6 of MaxVio's range 3 (top-2 of 8) is 1.8; healthy is 0.6 * 0.9 = 0.54 of it, MaxVio 1.62.
    det = only(CollapseDetector(patience=1, recovery=2, hysteresis=0.1, max_violation=0.6), "max_violation")

    def vio(v: float) -> list[list[int]]:  # expert 0 at (1 + v) x the mean of 8 experts, 800 per expert
        hot = round(800 * (1 + v))
        rest = 8 * 800 - hot
        return [[hot] + [rest // 7] * 6 + [rest - 6 * (rest // 7)]]

    assert det.update(snap(vio(2.5), step=1))[0].kind == "alert"
    # 1.7 is below the threshold but above the healthy level 1.62: the alert stays.
    assert feed(det, vio(1.7), 5, start=2) == [[]] * 5
    assert det.update(snap(vio(1.5), step=10)) == []
    assert det.update(snap(vio(2.1), step=11)) == []  # breach resets the healthy streak
    assert det.update(snap(vio(1.5), step=12)) == []
    (event,) = det.update(snap(vio(1.5), step=13))
    assert (event.kind, event.severity, event.step) == ("recovery", "info", 13)
    assert "alert raised at step 1" in event.message and det.active == frozenset()


def test_value_hovering_at_threshold_does_not_flap():
    det = only(CollapseDetector(patience=2, recovery=2), "load_entropy")
    kinds = []
    for i in range(40):
        # Alternates between entropy 0.574 and 0.604, around the threshold 0.6 (0.4 of the range [1/3, 1] of top-2
        # of 8), never reaching the healthy level 0.44 of the range (0.627).
        counts = (
            SKEWED if i < 2 else [[3200, 3200, 800, 800, 0, 0, 0, 0]] if i % 2 else [[3000, 3000, 1000, 1000] + [0] * 4]
        )
        kinds += [e.kind for e in det.update(snap(counts, step=i))]
    assert kinds == ["alert"]


def test_windows_without_evidence_leave_streaks_unchanged():
    det = only(CollapseDetector(patience=2), "load_entropy")
    empty = [[0] * 8]
    assert det.update(snap(SKEWED, step=1)) == []
    assert det.update(snap(empty, step=2)) == []  # NaN entropy: no evidence
    assert det.update(snap(SKEWED, step=3))[0].rule == "load_entropy"
    full = CollapseDetector()
    assert feed(full, empty, 10) == [[]] * 10


def test_phases_are_separate_and_can_be_filtered():
    det = only(CollapseDetector(patience=2), "load_entropy")
    det.update(snap(SKEWED, step=1, phase="train"))
    assert det.update(snap(SKEWED, step=1, phase="val")) == []
    (event,) = det.update(snap(SKEWED, step=2, phase="val"))
    assert event.phase == "val" and det.active_in("val") and not det.active_in("train")
    train_only = CollapseDetector(patience=1, phases=["train"])
    assert train_only.update(snap(SKEWED, phase="val")) == []


def test_event_frame_history():
    det = CollapseDetector(patience=1, recovery=1)
    det.update(snap(SKEWED, step=1))
    det.update(snap(BALANCED, step=2))
    frame = det.event_frame()
    assert list(frame.columns) == list(EVENT_COLUMNS)
    assert frame[["step", "rule", "kind"]].values.tolist() == [
        [1, "load_entropy", "alert"],
        [1, "max_violation", "alert"],
        [2, "load_entropy", "recovery"],
        [2, "max_violation", "recovery"],
    ]
    assert CollapseDetector().event_frame().empty


def test_state_dict_round_trip_resumes_exactly():
    stream = [SKEWED] * 2 + [BALANCED] * 2 + [SKEWED] * 3 + [BALANCED] * 4
    z = [12.0, 12.5, 11.0, 12.0, 13.0, 60.0, 70.0, 12.0, 12.0, 12.0, 12.0]
    kwargs = dict(patience=2, recovery=2)
    reference = CollapseDetector(**kwargs)
    ref_events = [reference.update(snap(c, step=i, z_loss=[zz])) for i, (c, zz) in enumerate(zip(stream, z))]

    first = CollapseDetector(**kwargs)
    for i in range(5):
        first.update(snap(stream[i], step=i, z_loss=[z[i]]))
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = CollapseDetector(**kwargs)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.state_dict() == first.state_dict() and resumed.active == first.active
    later = [resumed.update(snap(stream[i], step=i, z_loss=[z[i]])) for i in range(5, len(stream))]
    assert later == ref_events[5:]
    # The events are the watcher's history, not the detector's state: each object lists what it raised.
    assert "events" not in first.state_dict()
    assert first.events + resumed.events == reference.events


def test_old_states_with_events_still_load():
    """Checkpoints written when the detector saved its events next to the watcher's still resume exactly."""
    reference, first = CollapseDetector(patience=2), CollapseDetector(patience=2)
    stream = [SKEWED] * 3 + [BALANCED] * 4
    ref_events = [e for i, c in enumerate(stream) for e in reference.update(snap(c, step=i, z_loss=[12.0]))]
    for i in range(3):
        first.update(snap(stream[i], step=i, z_loss=[12.0]))
    old = {**first.state_dict(), "events": [dict(vars(e), experts=list(e.experts)) for e in first.events]}
    resumed = CollapseDetector(patience=2)
    resumed.load_state_dict(old)
    later = [e for i in range(3, len(stream)) for e in resumed.update(snap(stream[i], step=i, z_loss=[12.0]))]
    assert [e.kind for e in later] == ["recovery", "recovery"] and first.events + later == ref_events
    assert resumed.events == later


@pytest.mark.parametrize(
    "kwargs, text",
    [
        (dict(patience=0), "patience=0"),
        (dict(min_load_entropy=1.5), "min_load_entropy=1.5"),
        (dict(max_violation=2.0), "max_violation=2.0"),
        (dict(z_loss_spike=0.5), "z_loss_spike=0.5"),
        (dict(hysteresis=1.0), "hysteresis=1.0"),
        (dict(dead_expert_p=0.0), "dead_expert_p=0.0"),
    ],
)
def test_invalid_arguments_are_rejected(kwargs, text):
    with pytest.raises(ValueError, match=text):
        CollapseDetector(**kwargs)


def test_event_validates_severity_and_kind():
    with pytest.raises(ValueError, match="severity='bad'"):
        CollapseEvent(0, "train", "l", "r", 0.0, 0.0, "bad", "m")
    with pytest.raises(ValueError, match="kind='bad'"):
        CollapseEvent(0, "train", "l", "r", 0.0, 0.0, "info", "m", kind="bad")


def test_sustained_z_loss_spike_does_not_recover_by_itself():
    # Reviewer's case: z-loss 5 for 8 windows, then 40 for good. The spiking windows must not become the baseline.
    det = only(CollapseDetector(), "z_loss_spike")
    kinds = [
        (i, e.kind) for i in range(40) for e in det.update(snap(BALANCED, step=i, z_loss=[5.0 if i < 8 else 40.0]))
    ]
    assert kinds == [(10, "alert")]
    assert det.active == {("layer0", "z_loss_spike")}
    # Back to the pre-spike level: recovery after `recovery` healthy windows, measured against the old median 5.
    later = [e.kind for i in range(40, 43) for e in det.update(snap(BALANCED, step=i, z_loss=[5.0]))]
    assert later == ["recovery"]


@pytest.mark.parametrize(
    "counts, top_k, collapsed",
    [
        # Reviewer's case: top-4 of 8 with 99.5 % of the load on half the experts. Entropy 0.67 is its floor.
        ([[1000] * 4 + [5] * 4], 4, True),
        ([[2000, 2000, 20, 20]], 2, True),  # top-2 of 4: MaxVio 0.98, its largest possible value is 1
        ([[1300, 1200, 1100, 1000, 1000, 900, 800, 700]], 4, False),  # uneven but healthy
        ([[1150, 1050, 950, 850]], 2, False),
        ([[1000] * 8], 4, False),
        ([[1000] * 4], 2, False),
    ],
)
def test_imbalance_rules_scale_with_top_k_and_experts(counts, top_k, collapsed):
    num_experts = len(counts[0])
    floor, ceiling = math.log(top_k) / math.log(num_experts), num_experts / top_k - 1  # independent bounds
    events = [e for window in feed(CollapseDetector(), counts, 3, top_k=top_k) for e in window]
    assert bool(events) == collapsed
    if collapsed:
        assert {e.rule for e in events} == {"load_entropy", "max_violation"}
        by_rule = {e.rule: e for e in events}
        # Value and threshold in the statistic's own units: the default fractions of each layer's own range.
        assert by_rule["load_entropy"].threshold == pytest.approx(floor + 0.4 * (1 - floor))
        assert by_rule["load_entropy"].value == pytest.approx(entropy(counts[0]))
        assert by_rule["max_violation"].threshold == pytest.approx(CollapseDetector().max_violation * ceiling)
        assert f"top-{top_k} of {num_experts}" in by_rule["max_violation"].message


def test_no_imbalance_possible_when_every_token_uses_every_expert():
    assert feed(CollapseDetector(patience=1), [[500, 500]], 2, top_k=2) == [[], []]


def test_dropped_fraction_message_does_not_claim_a_collapse():
    det = only(CollapseDetector(patience=1), "dropped_fraction")
    (event,) = det.update(snap(BALANCED, dropped=[2000]))
    assert event.severity == "warning" and "capacity overflow, 25.0% of assignments dropped" in event.message
    assert "not a router collapse" in event.message


def test_a_new_rule_is_one_table_entry(monkeypatch):
    """A rule added to the table alone gets patience, recovery, messages and state from the detector."""
    from moe_monitor.detect import detector as detector_module
    from moe_monitor.detect.rules import Rule, upper_bound

    def cv_rule(window, threshold, tuning):
        counts = window.counts_E
        mean = sum(counts) / len(counts)
        cv = math.sqrt(sum((c - mean) ** 2 for c in counts) / len(counts)) / mean  # by hand, not stats.py
        return upper_bound(cv, threshold, tuning.hysteresis)

    rule = Rule("spread", "warning", "max_cv", "cv", cv_rule, lambda v, lasting: f"cv {v.value:.2f}{lasting}")
    monkeypatch.setattr(detector_module, "RULE_TABLE", (*RULE_TABLE, rule))
    det = only(CollapseDetector(patience=2, recovery=1), "none")
    det.max_cv = 1.0
    assert det.rules == ("spread",)
    # SKEWED: counts 4000, 3000, 166 x 5, 170 -> mean 1000, cv sqrt((3000² + 2000² + 5 x 834² + 830²) / 8) / 1000 = 1.46
    assert feed(det, SKEWED, 1) == [[]]
    resumed = CollapseDetector(patience=2, recovery=1)
    resumed.max_cv = 1.0
    resumed.load_state_dict(det.state_dict())
    (alert,) = resumed.update(snap(SKEWED, step=2))
    assert alert.message == "[train step 2] layer0: cv 1.46 for 2 consecutive windows" and alert.severity == "warning"
    (recovery,) = resumed.update(snap(BALANCED, step=3))
    assert recovery.kind == "recovery" and recovery.value == 0.0 and resumed.active == frozenset()
