"""Snapshots from plain per-expert counts, for tests, examples and replaying logged counts through a detector."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moe_monitor import stats as moe_stats
from moe_monitor.snapshot import STAT_NAMES, Snapshot


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
