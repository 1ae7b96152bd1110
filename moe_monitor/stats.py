"""The statistics of SPEC §3 as pure functions, vectorised over layers.

Shape legend: ``L`` layers, ``E`` experts (the largest of any layer; a layer with fewer experts has zero-padded
columns, excluded through ``num_experts_L``).

Every function takes float64 CPU tensors and returns ``float64 [L]``. An empty window (no tokens, no assignments)
gives NaN through 0/0, never an exception; so does a statistic a router cannot provide.

One expert (``E = 1``): the router has no choice, and every statistic reads its degenerate ideal rather than a
0/0 NaN, because each is well defined in the limit and a one-expert layer (e.g. a dense layer registered as a
router) is not a router that fails to provide it: the load is exactly the fair share (``load_entropy`` 1,
``max_violation`` 0, ``cv`` 0, ``gini`` 0) and the router's distribution is a point mass (``router_entropy`` 0,
``top1_confidence`` 1; the counters add a one-expert token's normalised entropy as 0). The load side of the rule is
implemented here and nowhere else.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def _expert_mask(counts_LE: torch.Tensor, num_experts_L: torch.Tensor) -> torch.Tensor:
    return torch.arange(counts_LE.shape[1]) < num_experts_L[:, None]


def load_entropy(counts_LE: torch.Tensor, num_experts_L: torch.Tensor) -> torch.Tensor:
    """``-sum(load * ln load) / ln E``: 1 for perfectly balanced, 0 when one expert takes every assignment.

    A one-expert layer reads 1: its only possible load is the fair share (see the module docstring).

    Example:
        >>> counts = torch.tensor([[1.0, 1.0], [2.0, 0.0], [5.0, 0.0]], dtype=torch.float64)
        >>> load_entropy(counts, torch.tensor([2, 2, 1])).tolist()
        [1.0, 0.0, 1.0]
    """
    load_LE = counts_LE / counts_LE.sum(dim=1, keepdim=True)
    # 0.0 - x rather than -x so that a single-expert window reads 0.0, not -0.0.
    entropy_L = 0.0 - torch.special.xlogy(load_LE, load_LE).sum(dim=1) / num_experts_L.double().log()
    # ln 1 = 0: 0/0 for one expert; its entropy is 1 wherever the window is not empty (a NaN load stays NaN).
    return torch.where((num_experts_L == 1) & (load_LE[:, 0] == load_LE[:, 0]), 1.0, entropy_L)


def max_violation(counts_LE: torch.Tensor, num_experts_L: torch.Tensor) -> torch.Tensor:
    """MaxVio, ``max(count) / mean(count) - 1`` (Wang et al. 2024).

    Example:
        >>> max_violation(torch.tensor([[3.0, 1.0]], dtype=torch.float64), torch.tensor([2])).tolist()
        [0.5]
    """
    mean_L = counts_LE.sum(dim=1) / num_experts_L
    return counts_LE.amax(dim=1) / mean_L - 1


def cv(counts_LE: torch.Tensor, num_experts_L: torch.Tensor) -> torch.Tensor:
    """Coefficient of variation ``std(count) / mean(count)`` (population std, over each layer's own experts).

    Example:
        >>> cv(torch.tensor([[3.0, 1.0, 0.0]], dtype=torch.float64), torch.tensor([2])).tolist()
        [0.5]
    """
    mask_LE = _expert_mask(counts_LE, num_experts_L)
    mean_L = counts_LE.sum(dim=1) / num_experts_L
    var_L = ((counts_LE - mean_L[:, None]).square() * mask_LE).sum(dim=1) / num_experts_L
    return var_L.sqrt() / mean_L


def gini(counts_LE: torch.Tensor, num_experts_L: torch.Tensor) -> torch.Tensor:
    """Gini coefficient of the counts: ``sum_i (2i - n - 1) x_(i) / (n sum x)`` over the ascending ``x_(i)``.

    0 for equal counts, ``(n - 1) / n`` when one expert takes everything.

    Example:
        >>> gini(torch.tensor([[0.0, 0.0, 0.0, 4.0], [1.0, 1.0, 1.0, 1.0]], dtype=torch.float64),
        ...      torch.tensor([4, 4])).tolist()
        [0.75, 0.0]
    """
    mask_LE = _expert_mask(counts_LE, num_experts_L)
    # Padding columns sort last (+inf) and get weight 0, so each row is ranked over its own experts only.
    sorted_LE = torch.where(mask_LE, counts_LE, math.inf).sort(dim=1).values
    sorted_LE = torch.where(mask_LE, sorted_LE, 0.0)
    rank_LE = torch.arange(1, counts_LE.shape[1] + 1, dtype=torch.float64)[None, :]
    weight_LE = (2 * rank_LE - num_experts_L[:, None] - 1) * mask_LE
    return (weight_LE * sorted_LE).sum(dim=1) / (num_experts_L * counts_LE.sum(dim=1))


def dead_experts(counts_LE: torch.Tensor, num_experts_L: torch.Tensor) -> torch.Tensor:
    """Experts with ``count == 0`` (as float64; NaN for an empty window, where every expert is trivially idle).

    Example:
        >>> dead_experts(torch.tensor([[0.0, 2.0, 0.0]], dtype=torch.float64), torch.tensor([3])).tolist()
        [2.0]
    """
    dead_L = ((counts_LE == 0) & _expert_mask(counts_LE, num_experts_L)).sum(dim=1).double()
    return torch.where(counts_LE.sum(dim=1) > 0, dead_L, math.nan)


def aux_loss(
    counts_LE: torch.Tensor, prob_sum_LE: torch.Tensor, tokens_L: torch.Tensor, num_experts_L: torch.Tensor
) -> torch.Tensor:
    """Switch/GShard load-balancing loss ``E * sum_e (count[e] / T) * P[e]``, ``P[e] = prob_sum[e] / T``.

    Example:
        >>> counts = torch.tensor([[2.0, 2.0]], dtype=torch.float64)
        >>> aux_loss(counts, torch.tensor([[1.0, 1.0]], dtype=torch.float64), torch.tensor([2.0]),
        ...          torch.tensor([2])).tolist()
        [2.0]
    """
    return num_experts_L * ((counts_LE / tokens_L[:, None]) * (prob_sum_LE / tokens_L[:, None])).sum(dim=1)


def compute(
    counts_LE: torch.Tensor,
    prob_sum_LE: torch.Tensor,
    num_experts_L: torch.Tensor,
    tokens_L: torch.Tensor,
    prob_tokens_L: torch.Tensor,
    logit_tokens_L: torch.Tensor,
    z_sum_L: torch.Tensor,
    entropy_sum_L: torch.Tensor,
    top1_sum_L: torch.Tensor,
    dropped_L: torch.Tensor,
    drop_unknown_L: torch.Tensor | None = None,
    unrouted_L: torch.Tensor | None = None,
    skipped_L: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Every SPEC §3 statistic (keys as ``moe_monitor.snapshot.STAT_NAMES``, plus ``unrouted_fraction``).

    ``prob_tokens_L`` / ``logit_tokens_L`` are the tokens whose probabilities / logits were known: 0 makes the
    statistics that need them NaN. ``drop_unknown_L`` > 0 (assignments of a router with a capacity that did not
    report its drops) makes ``dropped_fraction`` NaN: 0 would be a made-up number. ``unrouted_L`` are the counted
    tokens no expert selected; ``unrouted_fraction = unrouted / tokens`` (NaN when not given). ``skipped_L`` are the
    assignments a random policy of the router skipped; ``skipped_fraction = skipped / assignments`` (NaN when not
    given).

    Example:
        >>> f64 = lambda *v: torch.tensor(v, dtype=torch.float64)
        >>> s = compute(f64([2.0, 2.0]), f64([1.0, 1.0]), torch.tensor([2]), f64(2.0), f64(2.0), f64(0.0),
        ...             f64(0.0), f64(2.0), f64(1.0), f64(0.0))
        >>> s["load_entropy"].tolist(), s["aux_loss"].tolist(), s["z_loss"].tolist()
        ([1.0], [2.0], [nan])
    """
    counts_LE, prob_sum_LE = counts_LE.reshape(len(num_experts_L), -1), prob_sum_LE.reshape(len(num_experts_L), -1)
    assignments_L = counts_LE.sum(dim=1)
    no_probs = prob_tokens_L == 0
    dropped_fraction_L = dropped_L / assignments_L
    if drop_unknown_L is not None:
        dropped_fraction_L = torch.where(drop_unknown_L > 0, math.nan, dropped_fraction_L)
    return {
        "dropped_fraction": dropped_fraction_L,
        "load_entropy": load_entropy(counts_LE, num_experts_L),
        "max_violation": max_violation(counts_LE, num_experts_L),
        "cv": cv(counts_LE, num_experts_L),
        "gini": gini(counts_LE, num_experts_L),
        "dead_experts": dead_experts(counts_LE, num_experts_L),
        "aux_loss": torch.where(no_probs, math.nan, aux_loss(counts_LE, prob_sum_LE, tokens_L, num_experts_L)),
        "z_loss": z_sum_L / logit_tokens_L,
        "router_entropy": entropy_sum_L / prob_tokens_L,
        "top1_confidence": top1_sum_L / prob_tokens_L,
        "unrouted_fraction": (math.nan if unrouted_L is None else unrouted_L) / tokens_L,
        "skipped_fraction": (math.nan if skipped_L is None else skipped_L) / assignments_L,
    }


def window(values_LF: torch.Tensor, layout: Any, num_experts_L: torch.Tensor) -> dict[str, torch.Tensor]:
    """:func:`compute` on a reduced window buffer ``[L, F]``, each input read by its field name in ``layout``.

    ``layout`` is the buffer's :class:`moe_monitor.counters.Layout` (its ``field(name)`` gives a field's columns),
    so the reduction reads the same named columns the hook wrote.

    Example:
        >>> from moe_monitor.counters import Layout, forward_update
        >>> from moe_monitor.routing import Routing
        >>> layout = Layout(num_experts=2, coactivation=False, capacity_factors=())
        >>> row_F = forward_update(Routing.from_topk(torch.tensor([[0], [1], [1]])), 2, 1, layout)
        >>> round(window(row_F[None], layout, torch.tensor([2]))["max_violation"].item(), 4)
        0.3333
    """

    def read(name: str) -> torch.Tensor:
        values = values_LF[:, layout.field(name)].double()
        return values if name in ("counts", "prob_sum") else values[:, 0]

    return compute(
        read("counts"),
        read("prob_sum"),
        num_experts_L,
        read("tokens"),
        read("prob_tokens"),
        read("logit_tokens"),
        read("z_sum"),
        read("entropy_sum"),
        read("top1_sum"),
        read("dropped"),
        read("drop_unknown"),
        read("unrouted_tokens"),
        read("skipped"),
    )
