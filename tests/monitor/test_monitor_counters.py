"""forward_update on random routings: both ways of masking non-finite tokens against a plain loop."""

from __future__ import annotations

import math

import pytest
import torch

from moe_monitor.counters import Layout, forward_update
from moe_monitor.routing import Routing


@pytest.mark.parametrize("given_probs", [False, True], ids=["probs_from_logits", "probs_given"])
@pytest.mark.parametrize("seed", range(4))
def test_random_routing_with_nonfinite_tokens_and_a_mask_matches_a_loop(given_probs, seed):
    # Logits only: non-finite tokens are masked by zeroing NaNs; with probabilities: by torch.where.
    gen = torch.Generator().manual_seed(seed)
    num_tokens, e, k, width = 40, 5, 2, 6
    logits_TE = torch.randn(num_tokens, e, generator=gen) * 3
    logits_TE[torch.rand(num_tokens, e, generator=gen) < 0.1] = -math.inf  # masked experts, not non-finite
    logits_TE[3, 1], logits_TE[7, 4], logits_TE[11] = math.nan, math.inf, -math.inf
    idx_TK = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(num_tokens)])
    idx_TK[5, 0] = -1  # "no expert": not an assignment
    mask_T = (torch.rand(num_tokens, generator=gen) < 0.8).float()
    probs_TE = torch.softmax(logits_TE, dim=-1) if given_probs else None
    layout = Layout(num_experts=width, coactivation=True, capacity_factors=(1.0, 1.5))
    update_F = forward_update(
        Routing.from_topk(idx_TK, logits_TE, probs_TE), e, k, layout, mask_T, coactivation=True, counterfactual=True
    )

    finite = [t for t in range(num_tokens) if t not in (3, 7, 11)]
    counted = [t for t in finite if mask_T[t] == 1]
    counts, coact = [0.0] * width, [[0.0] * width for _ in range(width)]
    for t in counted:
        chosen = [x for x in idx_TK[t].tolist() if 0 <= x < e]
        for x in chosen:
            counts[x] += 1
            for y in chosen:
                coact[x][y] += 1
    assert update_F[layout.counts].tolist() == counts
    assert update_F[layout.coact].view(width, width).tolist() == coact
    scalar = {name: update_F[layout.scalar(name)].item() for name in layout.scalar_names}
    assert scalar["tokens"] == scalar["prob_tokens"] == scalar["logit_tokens"] == len(counted)
    assert scalar["nonfinite_tokens"] == sum(mask_T[t].item() for t in (3, 7, 11))
    assert scalar["cf_assignments"] == sum(counts)
    for cf in (1.0, 1.5):
        capacity = math.ceil(len(counted) * k * cf / e)
        assert scalar[f"cf_dropped@{cf!r}"] == sum(max(c - capacity, 0) for c in counts)

    p_TE = torch.softmax(logits_TE[counted].double(), dim=-1)
    assert update_F[layout.prob_sum][:e].tolist() == pytest.approx(p_TE.sum(0).tolist(), rel=1e-5)
    assert update_F[layout.prob_sum][e:].tolist() == [0.0]
    assert scalar["top1_sum"] == pytest.approx(p_TE.amax(-1).sum().item(), rel=1e-5)
    entropy = -torch.special.xlogy(p_TE, p_TE).sum(-1) / math.log(e)
    assert scalar["entropy_sum"] == pytest.approx(entropy.sum().item(), rel=1e-5)
    lse = torch.logsumexp(logits_TE[counted].double(), dim=-1)
    assert scalar["z_sum"] == pytest.approx(lse.square().sum().item(), rel=1e-5)


def test_update_adds_into_the_given_row():
    layout = Layout(num_experts=3, coactivation=False, capacity_factors=())
    row_F = torch.ones(layout.width, dtype=torch.float64)
    returned = forward_update(Routing.from_topk(torch.tensor([[0], [2], [2]])), 3, 1, layout, out_F=row_F)
    assert returned is row_F
    assert row_F[layout.counts].tolist() == [2.0, 1.0, 3.0]
    assert row_F[layout.scalar("tokens")].item() == 4.0
