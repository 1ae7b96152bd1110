"""Bounded dashboards: the key count of scalar_metrics, its quantiles and worst layers against numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moe_monitor.sinks.scalars import scalar_metrics
from moe_monitor.snapshot import STAT_NAMES, Snapshot


def window(num_layers: int, seed: int = 0) -> Snapshot:
    generator = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 100, (num_layers, 8), generator=generator)
    stats = {name: torch.rand(num_layers, generator=generator, dtype=torch.float64) for name in STAT_NAMES}
    stats["dead_experts"] = torch.randint(0, 3, (num_layers,), generator=generator).double()
    return Snapshot(
        step=1, phase="train", layer_names=[f"blocks.{i}.router" for i in range(num_layers)],
        num_experts=[8] * num_layers, top_k=[2] * num_layers, counts=counts, tokens=counts.sum(1) // 2,
        dropped=torch.zeros(num_layers, dtype=torch.int64), nonfinite_tokens=torch.zeros(num_layers, dtype=torch.int64),
        stats=stats,
    )


@pytest.mark.parametrize("num_layers", [17, 58, 94])
def test_bounded_key_count_does_not_grow_with_layers(num_layers):
    s = len(STAT_NAMES)  # 12 statistics: the 10 of the metric reference, the unrouted and the skipped fraction
    auto = scalar_metrics(window(num_layers))
    assert len(auto) <= 4 * s + 3 * 5 + 4 and len(auto) >= 4 * s + 3 * 2 + 4
    assert len(scalar_metrics(window(num_layers), per_layer=True)) == s * num_layers + 4


def test_auto_logs_every_layer_up_to_16_routers():
    assert len(scalar_metrics(window(16))) == len(STAT_NAMES) * 16 + 4
    assert "moe/train/cv/p95" in scalar_metrics(window(16), per_layer=False)


def test_quantiles_and_worst_layers_match_numpy():
    snap = window(94, seed=3)
    metrics = scalar_metrics(snap)
    for stat in STAT_NAMES:
        values = snap.stats[stat].numpy()
        for name, q in (("min", 0), ("p50", 0.5), ("p95", 0.95), ("max", 1)):
            assert metrics[f"moe/train/{stat}/{name}"] == pytest.approx(np.quantile(values, q), abs=1e-12)
    entropy = snap.stats["load_entropy"].numpy()
    worst = {f"moe/train/load_entropy/L{i:02d}" for i in np.argsort(entropy, kind="stable")[:3]}
    logged = {k for k in metrics if k.startswith("moe/train/load_entropy/L")}
    assert logged == worst
    violation = snap.stats["max_violation"].numpy()
    assert {k for k in metrics if k.startswith("moe/train/max_violation/L")} == {
        f"moe/train/max_violation/L{i:02d}" for i in np.argsort(-violation, kind="stable")[:3]
    }
    assert not any(k.startswith("moe/train/cv/L") for k in metrics)  # not a "worst" statistic


def test_nan_layers_stay_out_of_the_quantiles():
    snap = window(20)
    snap.stats["z_loss"][:19] = float("nan")
    metrics = scalar_metrics(snap)
    assert metrics["moe/train/z_loss/min"] == metrics["moe/train/z_loss/max"] == float(snap.stats["z_loss"][19])
    assert [k for k in metrics if k.startswith("moe/train/z_loss/L")] == ["moe/train/z_loss/L19"]


def test_per_layer_must_be_a_choice():
    with pytest.raises(ValueError, match="choose True, False or 'auto'"):
        scalar_metrics(window(2), per_layer="all")
