"""RouterMonitor on expert choice at a tiny capacity: the tokens no expert picked are in the snapshot and frames."""

from __future__ import annotations

import pytest
import torch

from moe_monitor import CollapseDetector, RouterMonitor
from moe_monitor.reference import MoEConfig, MoETransformer


def test_expert_choice_at_capacity_001_reports_and_alerts_the_unrouted_tokens():
    torch.manual_seed(0)
    config = MoEConfig(
        d_model=32, n_layers=1, n_heads=2, seq_len=32, d_expert=64, router="expert_choice", capacity_factor=0.01
    )
    model = MoETransformer(config)
    picked: list[int] = []
    model.blocks[0].moe.router.register_forward_hook(
        lambda m, a, out: picked.append(len(set(out.token_idx_A.tolist())))
    )
    with RouterMonitor(model) as monitor:
        model(torch.randint(0, 256, (8, 32)))
        snapshot = monitor.collect(step=1)
    assert picked == [8]
    assert snapshot.extras["unrouted_tokens"].tolist() == [248.0]
    assert snapshot.stats["unrouted_fraction"].tolist() == [pytest.approx(248 / 256)]
    assert snapshot.stats["dropped_fraction"].tolist() == [0.0]
    row = monitor.layer_frame().iloc[0]
    assert (int(row.unrouted_tokens), row.unrouted_fraction) == (248, pytest.approx(248 / 256))
    assert "unrouted_tokens" in [e.rule for e in CollapseDetector(patience=1).update(snapshot)]


def test_token_choice_reports_zero_unrouted():
    torch.manual_seed(0)
    model = MoETransformer(MoEConfig(d_model=32, n_layers=1, n_heads=2, seq_len=32, d_expert=64))
    with RouterMonitor(model) as monitor:
        model(torch.randint(0, 256, (2, 32)))
        assert monitor.collect(step=1).stats["unrouted_fraction"].tolist() == [0.0]
