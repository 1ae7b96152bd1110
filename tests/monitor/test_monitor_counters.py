"""forward_update on random routings: both ways of masking non-finite tokens against a plain loop."""

from __future__ import annotations

import math

import pytest
import torch

from moe_monitor import stats
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


# Which window fields and which statistics each row of the hook's work matrix feeds, written out by hand.
OWN_FIELDS = {
    "dispatch": {"counts"},
    "valid": {"tokens", "prob_tokens", "logit_tokens"},
    "unrouted": {"unrouted_tokens"},
    "probs": {"prob_sum"},
    "top1": {"top1_sum"},
    "entropy": {"entropy_sum"},
    "z": {"z_sum"},
}
OWN_STATS = {
    "dispatch": {"load_entropy", "max_violation", "cv", "gini", "aux_loss"},
    "valid": {"aux_loss", "z_loss", "router_entropy", "top1_confidence", "unrouted_fraction"},
    "unrouted": {"unrouted_fraction"},
    "probs": {"aux_loss"},
    "top1": {"top1_confidence"},
    "entropy": {"router_entropy"},
    "z": {"z_loss"},
}


@pytest.mark.parametrize("row", list(OWN_FIELDS))
def test_each_work_row_moves_only_its_own_fields_and_statistics(row):
    e = 4
    layout = Layout(num_experts=e, coactivation=False, capacity_factors=())
    columns = layout.work_columns(e, has_probs=True, has_logits=True)
    gen = torch.Generator().manual_seed(0)
    logits_TE = torch.randn(32, e, generator=gen)
    idx_TK = logits_TE.topk(2, -1).indices
    idx_TK[0] = -1  # one token routed nowhere, so that every statistic has a non-zero numerator
    base_F = forward_update(Routing.from_topk(idx_TK, logits_TE), e, 2, layout)
    # One of the forward's sums nudged: the first entry of the row (an expert's entry for a per-expert row).
    sums_S = torch.zeros(columns.width, dtype=torch.float32)
    sums_S[getattr(columns, row).start] = 3.0
    source, destination = layout._scatter(columns, False, (), torch.device("cpu"))
    moved_F = base_F.clone().index_add_(0, destination, sums_S[source].double())

    fields = {"counts", "prob_sum", *layout.scalar_names}
    moved = {name for name in fields if not torch.equal(moved_F[layout.field(name)], base_F[layout.field(name)])}
    assert moved == OWN_FIELDS[row]
    num_experts_L = torch.tensor([e])
    before, after = (
        stats.window(base_F[None], layout, num_experts_L),
        stats.window(moved_F[None], layout, num_experts_L),
    )
    changed = {name for name in before if not torch.allclose(before[name], after[name], equal_nan=True)}
    assert changed == OWN_STATS[row]


def test_expert_choice_tokens_no_expert_picked_are_counted_unrouted():
    from moe_monitor.reference.config import MoEConfig
    from moe_monitor.reference.router import Router

    torch.manual_seed(0)
    router = Router(MoEConfig(d_model=16, n_experts=4, top_k=2, router="expert_choice", capacity_factor=0.25))
    x_TD = torch.randn(64, 16)
    out = router(x_TD)
    picked = set(out.token_idx_A.tolist())
    mask_T = torch.ones(64)
    mask_T[:8] = 0  # padding is not counted at all, routed or not
    layout = Layout(num_experts=4, coactivation=True, capacity_factors=())
    routing = Routing(out.token_idx_A, out.expert_idx_A, 64, out.logits_TE, None, out.kept_A)
    row_F = forward_update(routing, 4, 2, layout, mask_T, coactivation=True, dropless=False)
    unrouted = [t for t in range(8, 64) if t not in picked]
    assert 0 < len(unrouted) < 56
    assert row_F[layout.scalar("unrouted_tokens")].item() == len(unrouted)
    assert row_F[layout.scalar("tokens")].item() == 56
    fraction = stats.window(row_F[None], layout, torch.tensor([4]))["unrouted_fraction"].item()
    assert fraction == pytest.approx(len(unrouted) / 56)


def test_token_choice_leaves_no_token_unrouted_except_no_expert_marks():
    idx_TK = torch.tensor([[0, 1], [2, 3], [-1, 4], [1, 2]])  # token 2: "no expert" twice (-1, and 4 >= E)
    layout = Layout(num_experts=4, coactivation=False, capacity_factors=())
    row_F = forward_update(Routing.from_topk(idx_TK), 4, 2, layout)
    assert row_F[layout.scalar("unrouted_tokens")].item() == 1.0


@pytest.mark.parametrize(
    "dtype, default_dtype, autocast",
    [
        (torch.bfloat16, torch.bfloat16, None),
        (torch.float16, torch.float16, None),
        (torch.float64, torch.float64, None),
        (torch.float32, torch.float32, torch.float16),  # 16-mixed: fp16 autocast around the hook
        (torch.float32, torch.float32, torch.bfloat16),
    ],
    ids=["bf16-true", "16-true", "64-true", "16-mixed", "bf16-mixed"],
)
def test_counts_and_router_statistics_in_any_dtype_against_a_loop(dtype, default_dtype, autocast):
    # Lightning's "-true" precisions run the forward (this hook included) under a changed default dtype.
    gen = torch.Generator().manual_seed(1)
    logits_TE = (torch.randn(300, 8, generator=gen) * 2).to(dtype)
    idx_TK = logits_TE.float().topk(2, dim=-1).indices
    layout = Layout(num_experts=8, coactivation=True, capacity_factors=(1.0,))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(default_dtype)
    try:
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            row_F = forward_update(
                Routing.from_topk(idx_TK, logits_TE), 8, 2, layout, coactivation=True, counterfactual=True
            )
    finally:
        torch.set_default_dtype(previous)
    assert row_F.dtype == torch.float64
    counts = [0.0] * 8
    for token in idx_TK.tolist():
        for expert in token:
            counts[expert] += 1
    assert row_F[layout.counts].tolist() == counts
    logits64_TE = logits_TE.double()  # the router's values, reduced here in float64
    assert row_F[layout.scalar("z_sum")].item() == pytest.approx(
        torch.logsumexp(logits64_TE, -1).square().sum().item(), rel=1e-5
    )
    assert row_F[layout.prob_sum].tolist() == pytest.approx(torch.softmax(logits64_TE, -1).sum(0).tolist(), rel=1e-5)


def test_unrouted_count_can_be_skipped_by_a_caller_that_routes_every_token():
    idx_TK = torch.tensor([[0, 1], [-1, 4]])
    layout = Layout(num_experts=4, coactivation=False, capacity_factors=())
    skipped_F = forward_update(Routing.from_topk(idx_TK), 4, 2, layout, unrouted=False)
    counted_F = forward_update(Routing.from_topk(idx_TK), 4, 2, layout)
    assert (skipped_F[layout.scalar("unrouted_tokens")].item(), counted_F[layout.scalar("unrouted_tokens")].item()) == (
        0.0,
        1.0,
    )
    other = [c for c in range(layout.width) if c != layout.scalar("unrouted_tokens")]
    assert torch.equal(skipped_F[other], counted_F[other])
