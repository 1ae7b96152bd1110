"""Per-expert kept counts and policy-skipped assignments, against a plain loop over the assignments."""

from __future__ import annotations

import torch

from moe_monitor.counters import Layout, forward_update
from moe_monitor.routing import Routing

T, E, K = 12, 4, 2


def _plain(topk_TK, kept_TK, skipped_TK, mask_T, finite_T):
    kept_E, dropped, skipped = [0] * E, 0, 0
    for t in range(T):
        if not (mask_T[t] and finite_T[t]):
            continue
        for slot in range(K):
            if not kept_TK[t, slot]:
                dropped += 1
            elif skipped_TK[t, slot]:
                skipped += 1
            else:
                kept_E[int(topk_TK[t, slot])] += 1
    return kept_E, dropped, skipped


def test_kept_dropped_and_skipped_follow_the_padding_mask_and_non_finite_tokens():
    generator = torch.Generator().manual_seed(3)
    logits_TE = torch.randn(T, E, generator=generator)
    logits_TE[5, 1] = float("nan")  # a non-finite token: left out of every count
    topk_TK = logits_TE.nan_to_num(0.0).topk(K, dim=-1).indices
    kept_TK = torch.rand(T, K, generator=generator) > 0.3
    skipped_TK = (torch.rand(T, K, generator=generator) > 0.6) & kept_TK  # a skipped assignment stays "kept"
    mask_T = torch.ones(T)
    mask_T[[0, 7, 11]] = 0  # padding
    layout = Layout(num_experts=E, coactivation=False, capacity_factors=())
    routing = Routing.from_topk(topk_TK, logits_TE=logits_TE, kept_TK=kept_TK, skipped_TK=skipped_TK)
    row_F = forward_update(routing, E, K, layout, mask_T=mask_T, dropless=False)
    kept_E, dropped, skipped = _plain(topk_TK, kept_TK, skipped_TK, mask_T, logits_TE.isfinite().all(-1))
    counts_E = row_F[layout.counts]
    assert (counts_E - row_F[layout.lost]).tolist() == kept_E
    assert row_F[layout.scalar("dropped")].item() == dropped > 0
    assert row_F[layout.scalar("skipped")].item() == skipped > 0
    assert counts_E.sum().item() == 2 * (T - 4)  # 3 padding tokens and 1 non-finite token left out


def test_a_router_without_kept_or_skipped_marks_leaves_the_lost_block_untouched():
    topk_TK = torch.randint(0, E, (T, 1), generator=torch.Generator().manual_seed(4))
    layout = Layout(num_experts=E, coactivation=False, capacity_factors=())
    row_F = forward_update(Routing.from_topk(topk_TK), E, 1, layout)
    assert row_F[layout.lost].tolist() == [0.0] * E
    assert row_F[layout.scalar("skipped")].item() == 0.0
    skipped_only = Routing.from_topk(topk_TK, skipped_TK=topk_TK == 2)  # a policy but no capacity: dropped stays 0
    row_F = forward_update(skipped_only, E, 1, layout)
    assert row_F[layout.lost].tolist() == [0.0, 0.0, float((topk_TK == 2).sum()), 0.0]
    assert row_F[layout.scalar("dropped")].item() == 0.0
