"""forward_update's per-forward math, chunked over the tokens, against a plain float64 computation of every field.

The reference below is written apart from the counters: torch.softmax / torch.logsumexp / xlogy in float64 for the
router statistics, and Python loops over the tokens for the counts, co-activation, unrouted tokens and the
counterfactual drop.
"""

from __future__ import annotations

import math

import pytest
import torch

from moe_monitor import counters
from moe_monitor.counters import Layout, forward_update
from moe_monitor.routing import Routing

CAPACITY_FACTORS = (1.0, 1.25)


def _routing_case(num_tokens, e, k, seed, dtype, nonfinite, masked_experts, no_expert):
    gen = torch.Generator().manual_seed(seed)
    logits_TE = torch.randn(num_tokens, e, generator=gen, dtype=torch.float64) * 3
    if masked_experts and e > 1:
        logits_TE[torch.rand(num_tokens, e, generator=gen) < 0.2] = -math.inf
        logits_TE[torch.arange(num_tokens), torch.randint(0, e, (num_tokens,), generator=gen)] = 0.5
    bad = []
    if nonfinite:
        bad = sorted({1, num_tokens // 2, num_tokens - 1})
        logits_TE[bad[0], e - 1] = math.nan
        logits_TE[bad[1], 0] = math.inf
        logits_TE[bad[2]] = -math.inf
    logits_TE = logits_TE.to(dtype)
    idx_TK = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(num_tokens)])
    if no_expert:
        idx_TK[0, 0] = -1
        idx_TK[num_tokens // 3, -1] = e  # "no expert" marks: not assignments
    return logits_TE, idx_TK, bad


def _reference(logits_TE, probs_TE, idx_TK, mask_T, bad, e, k, width):
    """Every window field of one forward, computed plainly in float64."""
    num_tokens = idx_TK.shape[0]
    weight = [1.0 if mask_T is None else float(mask_T[t]) for t in range(num_tokens)]
    has_probs = logits_TE is not None or probs_TE is not None
    counted = [t for t in range(num_tokens) if not (has_probs and t in bad)]
    counts, coact = [0.0] * width, [[0.0] * width for _ in range(width)]
    unrouted = 0.0
    for t in counted:
        chosen = [x for x in idx_TK[t].tolist() if 0 <= x < e]
        unrouted += weight[t] * (not chosen)
        for x in chosen:
            counts[x] += weight[t]
            for y in chosen:
                coact[x][y] += weight[t]
    tokens = sum(weight[t] for t in counted)
    fields = {"counts": counts, "coact": coact, "tokens": tokens, "unrouted_tokens": unrouted}
    fields["cf_assignments"] = sum(counts)
    for cf in CAPACITY_FACTORS:
        capacity = math.ceil(tokens * k * cf / e)
        fields[f"cf_dropped@{cf!r}"] = sum(max(c - capacity, 0.0) for c in counts)
    if not has_probs:
        return fields
    w_T = torch.tensor([weight[t] for t in counted], dtype=torch.float64)
    p_TE = probs_TE[counted].double() if probs_TE is not None else torch.softmax(logits_TE[counted].double(), -1)
    fields["nonfinite_tokens"] = sum(weight[t] for t in bad)
    fields["prob_tokens"] = tokens
    fields["prob_sum"] = (w_T[:, None] * p_TE).sum(0).tolist() + [0.0] * (width - e)
    fields["top1_sum"] = (w_T * p_TE.amax(-1)).sum().item()
    entropy_T = -torch.special.xlogy(p_TE, p_TE).sum(-1) / math.log(e) if e > 1 else torch.zeros(len(counted))
    fields["entropy_sum"] = (w_T * entropy_T).sum().item()
    if logits_TE is not None:
        fields["logit_tokens"] = tokens
        fields["z_sum"] = (w_T * torch.logsumexp(logits_TE[counted].double(), -1).square()).sum().item()
    return fields


def _check(update_F, layout, expected, width) -> torch.Tensor:
    """Asserts every expected field; returns which columns of ``update_F`` the expectation covers."""
    covered = torch.zeros(update_F.numel(), dtype=torch.bool)
    for name, value in expected.items():
        covered[layout.field(name)] = True
        got, value = update_F[layout.field(name)], value if isinstance(value, list) else [value]
        if name == "coact":
            got = got.view(width, width)
        counted = ("counts", "coact", "tokens", "unrouted_tokens", "nonfinite_tokens", "prob_tokens", "logit_tokens")
        if name in counted or name.startswith("cf_"):  # counts: exact
            assert got.tolist() == value, name
        else:
            assert got.tolist() == pytest.approx(value, rel=2e-5, abs=1e-5), name
    return covered


CASES = {
    # id: (tokens, experts, k, tokens per chunk (None: the default chunking), dtype)
    "E8-k2-chunk7-tail": (40, 8, 2, 7, torch.float32),
    "E1": (33, 1, 1, 4, torch.float32),
    "E256-k8-default-chunks-tail": (1100, 256, 8, None, torch.float32),
    "E16-k8-bf16": (61, 16, 8, 9, torch.bfloat16),
    "E5-k2-fp64": (50, 5, 2, 16, torch.float64),
    "E3-k2-fp16-one-chunk": (20, 3, 2, None, torch.float16),
}


@pytest.mark.parametrize("source", ["logits", "probs", "logits+probs"])
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "padding-mask"])
@pytest.mark.parametrize("case", list(CASES))
def test_every_field_matches_a_plain_float64_computation(case, masked, source, monkeypatch):
    num_tokens, e, k, chunk_tokens, dtype = CASES[case]
    if chunk_tokens is not None:
        monkeypatch.setattr(counters, "CHUNK_ELEMENTS", chunk_tokens * e)
    logits_TE, idx_TK, bad = _routing_case(
        num_tokens, e, k, seed=num_tokens + e, dtype=dtype, nonfinite=True, masked_experts=True, no_expert=e > 1
    )
    probs_TE = None
    if "probs" in source:
        probs_TE = torch.softmax(logits_TE.double(), -1).to(dtype)  # NaN rows where the logits are non-finite
        probs_TE[bad[0]] = probs_TE[bad[0]].nan_to_num(1.0)  # non-finite through a logit only
        probs_TE[bad[-1]] = 1.0 / e
        probs_TE[bad[-1], 0] = math.nan
    if source == "probs":
        logits_TE = None
        # Without logits a token is non-finite only through its probabilities.
        bad = [t for t in bad if not torch.isfinite(probs_TE[t]).all()] if bad else bad
    gen = torch.Generator().manual_seed(5)
    mask_T = (torch.rand(num_tokens, generator=gen) < 0.7).float() if masked else None
    width = e + 2  # the buffer of a monitor whose widest layer has more experts than this one
    layout = Layout(num_experts=width, coactivation=True, capacity_factors=CAPACITY_FACTORS)
    routing = Routing.from_topk(idx_TK, logits_TE=logits_TE, probs_TE=probs_TE)
    update_F = forward_update(routing, e, k, layout, mask_T, coactivation=True, counterfactual=True)

    covered = _check(update_F, layout, _reference(logits_TE, probs_TE, idx_TK, mask_T, bad, e, k, width), width)
    assert update_F[~covered].count_nonzero() == 0  # no sum filed under a column the reference does not predict


def test_chunked_and_whole_forward_give_the_same_sums(monkeypatch):
    # The chunk size is a cost choice only: many small chunks and one chunk agree to fp32 rounding.
    logits_TE, idx_TK, _ = _routing_case(301, 12, 3, 0, torch.float32, True, True, True)
    layout = Layout(num_experts=12, coactivation=False, capacity_factors=())
    whole_F = forward_update(Routing.from_topk(idx_TK, logits_TE), 12, 3, layout)
    monkeypatch.setattr(counters, "CHUNK_ELEMENTS", 12 * 10)
    chunked_F = forward_update(Routing.from_topk(idx_TK, logits_TE), 12, 3, layout)
    assert torch.allclose(chunked_F, whole_F, rtol=1e-6, atol=1e-6)
    assert torch.equal(chunked_F[layout.counts], whole_F[layout.counts])


def test_router_without_scores_counts_every_token():
    idx_TK = torch.tensor([[0, 1], [2, 2], [-1, 1]])
    layout = Layout(num_experts=3, coactivation=True, capacity_factors=())
    update_F = forward_update(Routing.from_topk(idx_TK), 3, 2, layout, coactivation=True)
    assert update_F[layout.counts].tolist() == [1.0, 2.0, 2.0]
    assert update_F[layout.scalar("tokens")].item() == 3.0
    assert update_F[layout.scalar("nonfinite_tokens")].item() == 0.0
    # Token 1 chose expert 2 twice: 2 x 2 co-selections with itself, as a token-by-expert count matrix gives.
    assert update_F[layout.coact].view(3, 3).tolist() == [[1.0, 1.0, 0.0], [1.0, 2.0, 0.0], [0.0, 0.0, 4.0]]


def test_forward_with_no_tokens_adds_nothing():
    layout = Layout(num_experts=4, coactivation=True, capacity_factors=(1.0,))
    routing = Routing.from_topk(torch.zeros(0, 2, dtype=torch.long), logits_TE=torch.zeros(0, 4))
    update_F = forward_update(routing, 4, 2, layout, coactivation=True, counterfactual=True)
    assert update_F.abs().sum().item() == 0.0


def test_no_tensor_of_the_forward_scales_with_tokens_times_experts(monkeypatch):
    # Without co-activation the hook's work space is one token chunk of E columns, plus a few values per token.
    from torch.utils._python_dispatch import TorchDispatchMode

    num_tokens, e, chunk_tokens = 512, 64, 16
    monkeypatch.setattr(counters, "CHUNK_ELEMENTS", chunk_tokens * e)
    logits_TE, idx_TK, _ = _routing_case(num_tokens, e, 4, 0, torch.float32, True, True, False)
    layout = Layout(num_experts=e, coactivation=False, capacity_factors=(1.0,))
    routing = Routing.from_topk(idx_TK, logits_TE=logits_TE)
    mask_T = torch.ones(num_tokens)
    inputs = {logits_TE.untyped_storage().data_ptr()}

    class Sizes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for tensor in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() not in inputs:
                    self.largest = max(self.largest, tensor.numel())
            return out

    forward_update(routing, e, 4, layout, mask_T, counterfactual=True)  # the first call sizes the scratch buffer
    with Sizes() as sizes:
        update_F = forward_update(routing, e, 4, layout, mask_T, counterfactual=True)
    assert update_F[layout.scalar("tokens")].item() == num_tokens - 3
    # The largest tensor made: the view of the scratch buffer, (5 + 3) rows per token and two chunk buffers.
    assert sizes.largest <= 8 * num_tokens + 2 * chunk_tokens * e < num_tokens * e // 4


def test_scratch_buffer_made_under_inference_mode_serves_later_forwards():
    # Lightning runs validation under inference mode; a buffer first made there must still be writable after it.
    layout = Layout(num_experts=4, coactivation=False, capacity_factors=())
    gen = torch.Generator().manual_seed(2)
    sizes = (50_000, 7, 90_000)  # a first forward far larger than any before, then a small one, then larger again
    expected, got = [], []
    for index, num_tokens in enumerate(sizes):
        logits_TE = torch.randn(num_tokens, 4, generator=gen)
        routing = Routing.from_topk(logits_TE.topk(1, -1).indices, logits_TE=logits_TE)
        with torch.inference_mode(index == 0):
            update_F = forward_update(routing, 4, 1, layout)
        got.append(update_F[layout.prob_sum].tolist())
        expected.append(torch.softmax(logits_TE.double(), -1).sum(0).tolist())
    for row, reference in zip(got, expected):
        assert row == pytest.approx(reference, rel=1e-5)
