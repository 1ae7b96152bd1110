"""Each statistic against a direct numpy formula written here, on the same routing decisions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monitor_toys import Replay, replay_spec
from torch import nn

from moe_monitor import RouterMonitor
from moe_monitor import stats as mstats


def _numpy_stats(idx_TK: np.ndarray, logits_TE: np.ndarray) -> dict[str, float]:
    num_tokens, num_experts = logits_TE.shape
    top_k = idx_TK.shape[1]
    count = np.zeros(num_experts)
    for e in idx_TK.reshape(-1):
        count[e] += 1
    load = count / count.sum()
    nz = load[load > 0]
    shifted = logits_TE - logits_TE.max(axis=1, keepdims=True)
    probs = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
    lse = np.log(np.exp(logits_TE).sum(axis=1))
    sorted_counts = np.sort(count)
    n = num_experts
    gini = np.sum((2 * np.arange(1, n + 1) - n - 1) * sorted_counts) / (n * count.sum())
    p_log_p = np.where(probs > 0, probs * np.log(np.where(probs > 0, probs, 1)), 0.0)
    return {
        "assignments": num_tokens * top_k,
        "load_entropy": -np.sum(nz * np.log(nz)) / np.log(num_experts),
        "max_violation": count.max() / count.mean() - 1,
        "cv": count.std() / count.mean(),
        "gini": gini,
        "dead_experts": float(np.sum(count == 0)),
        "aux_loss": num_experts * np.sum(count / num_tokens * probs.mean(axis=0)),
        "z_loss": np.mean(lse**2),
        "router_entropy": np.mean(-p_log_p.sum(axis=1) / np.log(num_experts)),
        "top1_confidence": np.mean(probs.max(axis=1)),
        "dropped_fraction": 0.0,
    }


@pytest.mark.parametrize("skew", [0.0, 3.0])
def test_every_statistic_matches_numpy(skew):
    gen = torch.Generator().manual_seed(7)
    num_experts, top_k = 6, 2
    model = nn.ModuleDict({"r": Replay()})
    monitor = RouterMonitor(model, routers=[replay_spec("r", num_experts, top_k)])
    all_logits, all_idx = [], []
    for num_tokens in (13, 20):
        bias_E = skew * torch.arange(num_experts, dtype=torch.float32)
        logits_TE = torch.randn(num_tokens, num_experts, generator=gen) + bias_E
        idx_TK = logits_TE.topk(top_k, dim=-1).indices
        model["r"](logits_TE, idx_TK)
        all_logits.append(logits_TE)
        all_idx.append(idx_TK)
    snap = monitor.collect(step=0)
    expected = _numpy_stats(torch.cat(all_idx).numpy(), torch.cat(all_logits).double().numpy())
    if skew:
        assert expected["dead_experts"] > 0
    assert snap.counts.sum().item() == expected.pop("assignments")
    for name, value in expected.items():
        assert snap.stats[name][0].item() == pytest.approx(value, rel=1e-6, abs=1e-9), name


def test_stats_respect_each_layers_own_expert_count():
    # Layer 0 has 4 experts, layer 1 only 2: padding columns must not count as dead or pull the mean down.
    counts_LE = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 0.0, 0.0]], dtype=torch.float64)
    num_experts_L = torch.tensor([4, 2])
    assert mstats.dead_experts(counts_LE, num_experts_L).tolist() == [0.0, 0.0]
    assert mstats.cv(counts_LE, num_experts_L).tolist() == pytest.approx([np.std([1, 2, 3, 4]) / 2.5, 0.0])
    assert mstats.gini(counts_LE, num_experts_L).tolist() == pytest.approx([0.25, 0.0])
    assert mstats.load_entropy(counts_LE, num_experts_L).tolist() == pytest.approx(
        [-sum(p * np.log(p) for p in (0.1, 0.2, 0.3, 0.4)) / np.log(4), 1.0]
    )
    assert mstats.max_violation(counts_LE, num_experts_L).tolist() == pytest.approx([0.6, 0.0])


def test_aux_loss_equals_transformers_load_balancing_loss_func():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    gen = torch.Generator().manual_seed(8)
    num_experts, top_k = 8, 2
    logits_TE = torch.randn(24, num_experts, generator=gen) * 2
    model = nn.ModuleDict({"r": Replay()})
    monitor = RouterMonitor(model, routers=[replay_spec("r", num_experts, top_k)])
    model["r"](logits_TE, torch.softmax(logits_TE, -1).topk(top_k, dim=-1).indices)
    ours = monitor.collect(step=0).stats["aux_loss"][0].item()
    theirs = load_balancing_loss_func((logits_TE,), num_experts=num_experts, top_k=top_k).item()
    assert ours == pytest.approx(theirs, rel=1e-5)


def test_a_one_expert_layer_reports_its_degenerate_ideal_not_nan():
    replay = Replay()
    monitor = RouterMonitor(nn.Sequential(replay), routers=[replay_spec("0", num_experts=1, top_k=1)])
    logits_TE = torch.randn(20, 1)
    replay(logits_TE, torch.zeros(20, 1, dtype=torch.long))
    row = monitor.collect(step=1)
    got = {name: row.stats[name][0].item() for name in row.stats}
    # By hand: the only load is the fair share; the router's distribution is a point mass on expert 0.
    assert got["load_entropy"] == 1.0
    assert (got["max_violation"], got["cv"], got["gini"], got["dead_experts"]) == (0.0, 0.0, 0.0, 0.0)
    assert (got["router_entropy"], got["top1_confidence"]) == (0.0, 1.0)
    assert got["z_loss"] == pytest.approx(float((logits_TE.double() ** 2).mean()), rel=1e-6)
    # An empty window still has no statistics.
    assert np.isnan(monitor.collect(step=2).stats["load_entropy"][0].item())
