"""Window counters against plain Python loops over the same random routing decisions."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from monitor_toys import Replay, replay_spec
from torch import nn

from moe_monitor import RouterMonitor

E, K = 5, 2


def _model():
    return nn.ModuleDict({"a": Replay(), "b": Replay()})


def _random_forward(gen, num_tokens, num_experts=E, top_k=K, drop_p=0.0):
    logits_TE = torch.randn(num_tokens, num_experts, generator=gen)
    # Random distinct experts per token, deliberately unrelated to the logits: the counts must follow the
    # decisions the router reports, not a recomputation.
    idx_TK = torch.stack([torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(num_tokens)])
    kept_TK = torch.rand(num_tokens, top_k, generator=gen) >= drop_p
    return logits_TE, idx_TK, kept_TK


def test_counts_tokens_dropped_match_a_python_loop():
    gen = torch.Generator().manual_seed(0)
    model = _model()
    monitor = RouterMonitor(model, routers=[replay_spec("a", E, K, dropless=False), replay_spec("b", E, K)])
    expected_counts = [[0] * E, [0] * E]
    expected_tokens, expected_dropped = [0, 0], [0, 0]
    for num_tokens in (7, 1, 12):
        for layer, name in enumerate(("a", "b")):
            logits_TE, idx_TK, kept_TK = _random_forward(gen, num_tokens, drop_p=0.3 if name == "a" else 0.0)
            model[name](logits_TE, idx_TK, kept_TK if name == "a" else None)
            for t in range(num_tokens):
                expected_tokens[layer] += 1
                for j in range(K):
                    expected_counts[layer][int(idx_TK[t, j])] += 1
                    if name == "a" and not kept_TK[t, j]:
                        expected_dropped[layer] += 1
    snap = monitor.collect(step=3)
    assert snap.counts.dtype == torch.int64 and snap.counts.tolist() == expected_counts
    assert snap.tokens.tolist() == expected_tokens
    assert snap.dropped.tolist() == expected_dropped and expected_dropped[0] > 0
    assert snap.stats["dropped_fraction"][0].item() == pytest.approx(expected_dropped[0] / (20 * K))
    # The window is reset: the next collect sees nothing.
    assert monitor.collect(step=4).counts.sum().item() == 0


def test_coactivation_and_counterfactual_drop_match_a_python_loop():
    gen = torch.Generator().manual_seed(1)
    model = _model()
    monitor = RouterMonitor(model, routers=[replay_spec("a", E, K)], capacity_factors=(1.0, 1.25))
    coact = [[0] * E for _ in range(E)]
    cf_dropped = {1.0: 0, 1.25: 0}
    assignments = 0
    for num_tokens in (6, 11):
        logits_TE, idx_TK, _ = _random_forward(gen, num_tokens)
        # Skew the routing so that some expert overflows its counterfactual capacity.
        idx_TK[: num_tokens // 2, 0] = 0
        idx_TK[: num_tokens // 2, 1] = torch.where(idx_TK[: num_tokens // 2, 1] == 0, 1, idx_TK[: num_tokens // 2, 1])
        model["a"](logits_TE, idx_TK)
        per_expert = [0] * E
        for t in range(num_tokens):
            chosen = [int(e) for e in idx_TK[t]]
            for e in chosen:
                per_expert[e] += 1
                for f in chosen:
                    coact[e][f] += 1
        assignments += num_tokens * K
        for cf in cf_dropped:
            capacity = math.ceil(num_tokens / E * K * cf)
            cf_dropped[cf] += sum(max(c - capacity, 0) for c in per_expert)
    snap = monitor.collect(step=0)
    assert snap.extras["coactivation"][0].tolist() == coact
    assert cf_dropped[1.0] > 0
    for cf, dropped in cf_dropped.items():
        assert snap.extras[f"counterfactual_drop@{cf!r}"][0].item() == pytest.approx(dropped / assignments)


def test_padding_mask_excludes_tokens():
    gen = torch.Generator().manual_seed(2)
    model = _model()
    monitor = RouterMonitor(model, routers=[replay_spec("a", E, K)])
    mask_BS = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    monitor.set_token_mask(mask_BS)
    logits_TE, idx_TK, _ = _random_forward(gen, 8)
    model["a"](logits_TE, idx_TK)
    expected = [0] * E
    for t, keep in enumerate(mask_BS.reshape(-1).tolist()):
        if keep:
            for e in idx_TK[t].tolist():
                expected[e] += 1
    monitor.set_token_mask(None)
    model["a"](logits_TE[:2], idx_TK[:2])
    for e in idx_TK[:2].reshape(-1).tolist():
        expected[e] += 1
    snap = monitor.collect(step=0)
    assert snap.tokens.tolist() == [4 + 2]
    assert snap.counts[0].tolist() == expected


def test_token_mask_of_another_size_is_ignored_with_one_warning():
    model = _model()
    monitor = RouterMonitor(model, routers=[replay_spec("a", E, K)])
    monitor.set_token_mask(torch.ones(3))
    logits_TE, idx_TK, _ = _random_forward(torch.Generator().manual_seed(3), 5)
    with pytest.warns(RuntimeWarning, match="token mask has 3 entries"):
        model["a"](logits_TE, idx_TK)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model["a"](logits_TE, idx_TK)
    assert monitor.collect(step=0).tokens.tolist() == [10]


def test_nonfinite_logits_are_counted_apart_and_masked():
    gen = torch.Generator().manual_seed(4)
    model = _model()
    monitor = RouterMonitor(model, routers=[replay_spec("a", E, K)])
    logits_TE, idx_TK, _ = _random_forward(gen, 6)
    logits_TE[1, 2] = math.nan
    logits_TE[4, 0] = math.inf
    model["a"](logits_TE, idx_TK)
    snap = monitor.collect(step=0)
    finite = [0, 2, 3, 5]
    expected = [0] * E
    for t in finite:
        for e in idx_TK[t].tolist():
            expected[e] += 1
    assert snap.nonfinite_tokens.tolist() == [2]
    assert snap.tokens.tolist() == [4]
    assert snap.counts[0].tolist() == expected
    lse = torch.logsumexp(logits_TE[finite].double(), dim=-1)
    assert snap.stats["z_loss"][0].item() == pytest.approx(lse.square().mean().item(), rel=1e-5)
    for name, value in snap.stats.items():
        assert math.isfinite(value[0].item()), name


def test_half_precision_logits_are_reduced_in_fp32():
    gen = torch.Generator().manual_seed(5)
    model = _model()
    monitor = RouterMonitor(model, routers=[replay_spec("a", E, K)])
    logits_TE, idx_TK, _ = _random_forward(gen, 64)
    # Large logits: logsumexp**2 in bf16 would be off by several percent.
    logits_bf16 = (logits_TE * 40).bfloat16()
    model["a"](logits_bf16, idx_TK)
    snap = monitor.collect(step=0)
    lse = torch.logsumexp(logits_bf16.double(), dim=-1)
    assert snap.stats["z_loss"][0].item() == pytest.approx(lse.square().mean().item(), rel=1e-5)


def test_empty_window_gives_nan_statistics():
    monitor = RouterMonitor(_model(), routers=[replay_spec("a", E, K)])
    snap = monitor.collect(step=0)
    assert snap.counts.sum().item() == 0 and snap.tokens.tolist() == [0]
    for name, value in snap.stats.items():
        assert math.isnan(value[0].item()), name
    assert math.isnan(snap.extras["counterfactual_drop@1.0"][0].item())


def test_router_without_probabilities_reports_nan_for_probability_statistics():
    from moe_monitor.adapters import RouterSpec
    from moe_monitor.routing import Routing

    def extract(module, args, output):
        return Routing.from_topk(output[1])

    model = _model()
    monitor = RouterMonitor(model, routers=[RouterSpec(name="a", num_experts=E, top_k=K, extract=extract)])
    logits_TE, idx_TK, _ = _random_forward(torch.Generator().manual_seed(6), 9)
    model["a"](logits_TE, idx_TK)
    snap = monitor.collect(step=0)
    assert snap.counts.sum().item() == 18
    for name in ("aux_loss", "z_loss", "router_entropy", "top1_confidence"):
        assert math.isnan(snap.stats[name][0].item()), name
    assert math.isfinite(snap.stats["load_entropy"][0].item())


def test_expert_indices_outside_the_range_are_not_assignments():
    model = _model()
    monitor = RouterMonitor(model, routers=[replay_spec("a", E, K)])
    logits_TE = torch.zeros(3, E)
    idx_TK = torch.tensor([[0, -1], [E, 1], [1, 2]])
    model["a"](logits_TE, idx_TK)
    assert monitor.collect(step=0).counts[0].tolist() == [1, 2, 1, 0, 0]


def test_layers_with_different_expert_counts_share_one_buffer():
    model = _model()
    monitor = RouterMonitor(model, routers=[replay_spec("a", 3, 1), replay_spec("b", 5, 2)])
    model["a"](torch.zeros(4, 3), torch.tensor([[0], [0], [2], [0]]))
    model["b"](torch.zeros(2, 5), torch.tensor([[4, 3], [3, 0]]))
    snap = monitor.collect(step=0)
    assert snap.counts.tolist() == [[3, 0, 1, 0, 0], [1, 0, 0, 2, 1]]
    # Layer "a" has 3 experts: its zero-padded columns are not dead experts.
    assert snap.stats["dead_experts"].tolist() == [1.0, 2.0]
    assert snap.stats["max_violation"][0].item() == pytest.approx(3 / (4 / 3) - 1)
    frame = monitor.expert_frame()
    assert frame.groupby("layer").size().tolist() == [3, 5]
    assert snap.extras["coactivation"][1, 3].tolist() == [1, 0, 0, 2, 1]
    assert math.isnan(snap.extras["coactivation"][0, 0, 0].item())  # top-1 layer: no co-activation


def test_a_forward_with_no_tokens_adds_nothing_and_keeps_the_layer():
    model = _model()
    monitor = RouterMonitor(model, routers=[replay_spec("a", E, K)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model["a"](torch.zeros(0, E), torch.zeros(0, K, dtype=torch.long))
        logits_TE, idx_TK, _ = _random_forward(torch.Generator().manual_seed(7), 5)
        model["a"](logits_TE, idx_TK)
    expected = [0] * E
    for e in idx_TK.reshape(-1).tolist():
        expected[e] += 1
    snap = monitor.collect(step=0)
    assert snap.tokens.tolist() == [5] and snap.counts[0].tolist() == expected
    lse = torch.logsumexp(logits_TE.double(), dim=-1)
    assert snap.stats["z_loss"][0].item() == pytest.approx(lse.square().mean().item(), rel=1e-6)


@pytest.mark.parametrize("width", [E + 1, E - 1])
def test_scores_of_another_width_than_num_experts_disable_the_layer_with_advice(width):
    model = _model()
    monitor = RouterMonitor(model, routers=[replay_spec("a", E, 1), replay_spec("b", E, 1)])
    logits_TE = torch.randn(6, width, generator=torch.Generator().manual_seed(8))
    with pytest.warns(RuntimeWarning, match=rf"RouterSpec\(name='a', num_experts={width}, top_k=1\)"):
        model["a"](logits_TE, logits_TE[:, : E - 1].argmax(dim=-1, keepdim=True))
    model["b"](torch.zeros(2, E), torch.tensor([[0], [1]]))
    snap = monitor.collect(step=0)
    assert snap.tokens.tolist() == [0, 2]
    for name, value in snap.stats.items():
        assert math.isnan(value[0].item()), name
    assert snap.stats["load_entropy"][1].item() == pytest.approx(math.log(2) / math.log(E))


def test_minus_inf_logits_are_masked_experts_not_nonfinite_tokens():
    import numpy as np

    model = _model()
    monitor = RouterMonitor(model, routers=[replay_spec("a", E, K)])
    logits_TE = torch.randn(9, E, generator=torch.Generator().manual_seed(9)) * 2
    logits_TE[:, 3] = -math.inf  # expert 3 masked out for every token (group-limited routing does this)
    logits_TE[8] = -math.inf  # a token with no allowed expert has no distribution
    idx_TK = logits_TE.topk(K, dim=-1).indices
    model["a"](logits_TE, idx_TK)
    snap = monitor.collect(step=0)
    z_TE = logits_TE[:8].double().numpy()
    finite_TE = np.where(np.isfinite(z_TE), z_TE, -np.inf)
    lse_T = np.log(np.exp(finite_TE).sum(axis=1))
    p_TE = np.exp(finite_TE - lse_T[:, None])
    p_log_p_TE = np.where(p_TE > 0, p_TE * np.log(np.where(p_TE > 0, p_TE, 1.0)), 0.0)
    expected = [0] * E
    for row in idx_TK[:8].tolist():
        for e in row:
            expected[e] += 1
    assert snap.tokens.tolist() == [8] and snap.nonfinite_tokens.tolist() == [1]
    assert snap.counts[0].tolist() == expected and expected[3] == 0
    assert snap.stats["z_loss"][0].item() == pytest.approx(np.mean(lse_T**2), rel=1e-6)
    assert snap.stats["top1_confidence"][0].item() == pytest.approx(p_TE.max(axis=1).mean(), rel=1e-6)
    entropy = np.mean(-p_log_p_TE.sum(axis=1) / np.log(E))
    assert snap.stats["router_entropy"][0].item() == pytest.approx(entropy, rel=1e-6)
    counts_E = np.array(expected, dtype=np.float64)
    aux = E * np.sum(counts_E / 8 * p_TE.mean(axis=0))
    assert snap.stats["aux_loss"][0].item() == pytest.approx(aux, rel=1e-6)


def test_capacity_router_without_drop_information_has_unknown_not_zero_drops():
    model = _model()
    monitor = RouterMonitor(model, routers=[replay_spec("a", E, K, dropless=False), replay_spec("b", E, K)])
    gen = torch.Generator().manual_seed(10)
    logits_TE, idx_TK, kept_TK = _random_forward(gen, 8, drop_p=0.5)
    model["a"](logits_TE, idx_TK, kept_TK)  # this forward says which assignments it dropped ...
    model["a"](logits_TE, idx_TK)  # ... this one does not
    model["b"](logits_TE, idx_TK)  # dropless: no kept_A means nothing dropped
    snap = monitor.collect(step=0)
    assert snap.dropped.tolist() == [int((~kept_TK).sum()), 0]
    assert snap.extras["drop_unknown"].tolist() == [8 * K, 0]
    assert math.isnan(snap.stats["dropped_fraction"][0].item())
    assert snap.stats["dropped_fraction"][1].item() == 0.0
    # The counterfactual drop of a "what if it had a capacity" is for dropless routers only.
    assert math.isnan(snap.extras["counterfactual_drop@1.0"][0].item())
    assert math.isfinite(snap.extras["counterfactual_drop@1.0"][1].item())
    # The next window, where every forward reports its drops, has a known dropped fraction again.
    model["a"](logits_TE, idx_TK, kept_TK)
    snap = monitor.collect(step=1)
    assert snap.stats["dropped_fraction"][0].item() == pytest.approx(float((~kept_TK).sum()) / (8 * K))
