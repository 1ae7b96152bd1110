"""Expert choice at a tiny capacity: tokens no expert picked are counted and alerted like dropped assignments."""

from __future__ import annotations

from dataclasses import replace

import torch
from detect_toys import MICRO

from moe_monitor import stats
from moe_monitor.counters import Layout, forward_update
from moe_monitor.detect import CollapseDetector, make_snapshot
from moe_monitor.reference import MoEConfig, MoETransformer
from moe_monitor.routing import Routing
from moe_monitor.snapshot import Snapshot


def test_expert_choice_at_capacity_001_alerts_on_the_tokens_it_leaves_unrouted():
    torch.manual_seed(0)
    config = MoEConfig(**{**MICRO, "n_layers": 1, "router": "expert_choice", "capacity_factor": 0.01})
    model = MoETransformer(config)
    router = model.blocks[0].moe.router
    layout = Layout(num_experts=config.n_experts, coactivation=False, capacity_factors=())
    row_F = torch.zeros(layout.width, dtype=torch.float64)
    reached: list[set[int]] = []

    def hook(module, args, out):
        reached.append(set(out.token_idx_A.tolist()))
        routing = Routing(out.token_idx_A, out.expert_idx_A, out.logits_TE.shape[0], out.logits_TE, None, out.kept_A)
        forward_update(routing, config.n_experts, config.top_k, layout, dropless=False, out_F=row_F)

    router.register_forward_hook(hook)
    model(torch.randint(0, 256, (8, 32)))  # 256 tokens
    (picked,) = reached
    assert len(picked) == 8  # capacity ceil(256 / 8 * 2 * 0.01) = 1 token per expert
    window = stats.window(row_F[None], layout, torch.tensor([config.n_experts]))
    assert window["dropped_fraction"].item() == 0.0  # what the monitor reported before: nothing looked wrong
    assert window["unrouted_fraction"].item() == (256 - 8) / 256
    snapshot = Snapshot(
        step=1,
        phase="train",
        layer_names=["blocks.0.moe.router"],
        num_experts=[config.n_experts],
        top_k=[config.top_k],
        counts=row_F[layout.counts][None].long(),
        tokens=torch.tensor([256]),
        dropped=torch.tensor([0]),
        nonfinite_tokens=torch.tensor([0]),
        stats=window,
    )
    (alert,) = [e for e in CollapseDetector(patience=1).update(snapshot) if e.rule == "unrouted_tokens"]
    assert (alert.severity, alert.value, alert.threshold) == ("warning", (256 - 8) / 256, 0.1)
    assert "248 of 256 tokens" in alert.message and "capacity_factor" in alert.message


def test_unrouted_rule_has_patience_recovers_and_can_be_switched_off():
    def snap(step: int, fraction: float):
        plain = make_snapshot([[10, 10, 10, 10]], step=step)
        return replace(plain, stats={**plain.stats, "unrouted_fraction": torch.tensor([fraction], dtype=torch.float64)})

    detector = CollapseDetector(patience=2, recovery=1)
    assert [e.rule for e in detector.update(snap(1, 0.5))] == []
    assert [(e.rule, e.kind) for e in detector.update(snap(2, 0.5))] == [("unrouted_tokens", "alert")]
    assert detector.update(snap(3, 0.095)) == []  # inside the 10 % hysteresis band: still firing
    assert [(e.rule, e.kind) for e in detector.update(snap(4, 0.0))] == [("unrouted_tokens", "recovery")]
    quiet = CollapseDetector(patience=1, max_unrouted_fraction=None)
    assert "unrouted_tokens" not in quiet.rules and quiet.update(snap(1, 0.9)) == []
