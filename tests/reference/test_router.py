"""Router selection, capacity, losses and noise, each checked against an independent computation."""

from __future__ import annotations

import math

import pytest
import torch

from moe_monitor.reference.router import Router, RouterOutput


def forced_router(config, first: int = 0, second: int = 1) -> Router:
    """A router whose gate sends every token with a positive feature 0 to ``first`` (then ``second``)."""
    router = Router(config)
    with torch.no_grad():
        router.gate.weight.zero_()
        router.gate.weight[first, 0] = 10.0
        router.gate.weight[second, 0] = 5.0
    return router


def positive_inputs(num_tokens: int, d_model: int, seed: int = 0) -> torch.Tensor:
    x_TD = torch.randn(num_tokens, d_model, generator=torch.Generator().manual_seed(seed))
    x_TD[:, 0] = 1.0
    return x_TD


@pytest.mark.parametrize("top_k", [1, 2])
def test_capacity_drops_follow_switch_rule(make_config, top_k):
    config = make_config(top_k=top_k, capacity_factor=1.0)
    num_tokens = 24
    out = forced_router(config)(positive_inputs(num_tokens, config.d_model))

    capacity = math.ceil(num_tokens / config.n_experts * top_k * 1.0)
    used = [0] * config.n_experts
    expected_kept = []
    for expert in out.expert_idx_A.tolist():  # token-major order: first come, first served
        expected_kept.append(used[expert] < capacity)
        used[expert] += 1
    assert out.expert_idx_A.tolist()[:top_k] == [0, 1][:top_k]
    assert out.kept_A.tolist() == expected_kept
    assert int((~out.kept_A).sum()) == top_k * (num_tokens - capacity) == {1: 18, 2: 24}[top_k]


def test_dropless_keeps_everything(make_config):
    out = forced_router(make_config(capacity_factor=None))(positive_inputs(24, 16))
    assert out.kept_A.dtype == torch.bool and bool(out.kept_A.all())


def test_token_choice_layout_and_weights(make_config):
    config = make_config(n_experts=6, top_k=3)
    x_TD = torch.randn(10, config.d_model)
    out = Router(config)(x_TD)
    assert out.token_idx_A.tolist() == [t for t in range(10) for _ in range(3)]
    topk_TK = out.probs_TE.topk(3, dim=-1).indices
    assert out.expert_idx_A.tolist() == topk_TK.reshape(-1).tolist()
    weight_TK = out.weight_A.view(10, 3)
    torch.testing.assert_close(weight_TK.sum(-1), torch.ones(10))
    raw_TK = out.probs_TE.gather(1, topk_TK)
    torch.testing.assert_close(weight_TK, raw_TK / raw_TK.sum(-1, keepdim=True))
    assert out.logits_TE.dtype == out.probs_TE.dtype == out.weight_A.dtype == torch.float32
    assert out.token_idx_A.dtype == out.expert_idx_A.dtype == torch.int64


def test_probs_are_softmax_of_gate(make_config):
    config = make_config()
    router = Router(config)
    x_TD = torch.randn(7, config.d_model, dtype=torch.float64)
    out = router(x_TD)
    expected = torch.softmax(x_TD @ router.gate.weight.double().T, dim=-1)
    torch.testing.assert_close(out.probs_TE.double(), expected, rtol=1e-5, atol=1e-6)


def test_unnormalised_and_top1_weights_are_raw_probabilities(make_config):
    x_TD = torch.randn(9, 16)
    for config in (make_config(norm_topk_prob=False), make_config(top_k=1)):
        out = Router(config)(x_TD)
        torch.testing.assert_close(out.weight_A, out.probs_TE[out.token_idx_A, out.expert_idx_A])


@pytest.mark.parametrize("capacity_factor", [None, 1.0, 0.5, 2.0])
def test_expert_choice_gives_every_expert_c_tokens(make_config, capacity_factor):
    config = make_config(router="expert_choice", capacity_factor=capacity_factor, n_experts=4, top_k=2)
    num_tokens = 10
    out = Router(config)(torch.randn(num_tokens, config.d_model))
    factor = 1.0 if capacity_factor is None else capacity_factor
    capacity = min(num_tokens, math.ceil(num_tokens * 2 / 4 * factor))
    counts = torch.bincount(out.expert_idx_A, minlength=4).tolist()
    assert counts == [capacity] * 4
    for expert in range(4):
        tokens = out.token_idx_A[out.expert_idx_A == expert]
        assert len(set(tokens.tolist())) == capacity
        expected = out.probs_TE[:, expert].topk(capacity).indices
        assert sorted(tokens.tolist()) == sorted(expected.tolist())
    torch.testing.assert_close(out.weight_A, out.probs_TE[out.token_idx_A, out.expert_idx_A])
    assert bool(out.kept_A.all())


def switch_aux_by_hand(probs_TE: torch.Tensor, expert_idx_A: torch.Tensor) -> float:
    num_tokens, n_experts = probs_TE.shape
    total = 0.0
    for e in range(n_experts):
        count = sum(1 for x in expert_idx_A.tolist() if x == e)
        mean_prob = sum(probs_TE[t, e].item() for t in range(num_tokens)) / num_tokens
        total += count / num_tokens * mean_prob
    return n_experts * total


def test_aux_loss_matches_switch_formula_and_transformers(make_config):
    config = make_config(n_experts=5, top_k=2, aux_loss_coef=0.3)
    router = Router(config)
    out = router(torch.randn(12, config.d_model) * 20)
    expected = 0.3 * switch_aux_by_hand(out.probs_TE, out.expert_idx_A)
    assert out.aux_loss.item() == pytest.approx(expected, rel=1e-5)

    modeling_mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    hf = modeling_mixtral.load_balancing_loss_func((out.logits_TE,), num_experts=5, top_k=2)
    assert out.aux_loss.item() == pytest.approx(0.3 * hf.item(), rel=1e-5)


def test_aux_loss_counts_dropped_assignments(make_config):
    config = make_config(capacity_factor=0.5, aux_loss_coef=1.0)
    out = forced_router(config)(positive_inputs(16, config.d_model))
    assert not bool(out.kept_A.all())
    assert out.aux_loss.item() == pytest.approx(switch_aux_by_hand(out.probs_TE, out.expert_idx_A), rel=1e-5)


def test_z_loss_formula(make_config):
    config = make_config(z_loss_coef=0.05)
    out = Router(config)(torch.randn(6, config.d_model) * 10)
    by_hand = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in out.logits_TE.double().tolist()) / 6
    assert out.z_loss.item() == pytest.approx(0.05 * by_hand, rel=1e-5)


def test_zero_coefficients_give_zero_losses(make_config):
    out = Router(make_config(aux_loss_coef=0.0, z_loss_coef=0.0))(torch.randn(4, 16))
    assert out.aux_loss.item() == 0.0 and out.z_loss.item() == 0.0 and out.aux_loss.shape == ()


@pytest.mark.parametrize("noise", ["jitter", "gaussian"])
def test_noise_only_in_training(make_config, noise):
    router = Router(make_config(router_noise=noise, router_noise_std=0.5))
    x_TD = torch.randn(8, 16)
    router.eval()
    torch.testing.assert_close(router(x_TD).logits_TE, router(x_TD).logits_TE, rtol=0, atol=0)
    torch.testing.assert_close(router(x_TD).logits_TE, x_TD @ router.gate.weight.T)
    router.train()
    assert not torch.equal(router(x_TD).logits_TE, router(x_TD).logits_TE)
    router.noise = "none"  # controllers switch noise off from outside
    torch.testing.assert_close(router(x_TD).logits_TE, x_TD @ router.gate.weight.T)


def test_jitter_scales_router_input_within_eps(make_config):
    router = Router(make_config(router_noise="jitter", router_noise_std=0.1))
    with torch.no_grad():
        router.gate.weight.zero_()
        router.gate.weight[0, 0] = 1.0
    x_TD = torch.ones(2000, 16)
    logits = router(x_TD).logits_TE[:, 0]
    assert 0.9 <= logits.min().item() and logits.max().item() <= 1.1 and logits.std().item() > 0.03


def test_expert_bias_changes_selection_only(make_config):
    config = make_config(expert_bias=True, n_experts=4, top_k=1)
    router = Router(config)
    assert router.expert_bias.dtype == torch.float32 and router.expert_bias.tolist() == [0.0] * 4
    assert "expert_bias" in dict(router.named_buffers())
    x_TD = torch.randn(20, config.d_model)
    before = router(x_TD)
    router.expert_bias[3] = 10.0  # as a controller would, from outside
    after = router(x_TD)
    assert after.expert_idx_A.tolist() == [3] * 20
    torch.testing.assert_close(after.logits_TE, before.logits_TE)
    torch.testing.assert_close(after.weight_A, after.probs_TE[:, 3])
    assert Router(make_config()).expert_bias is None


def test_mutable_attributes_are_read_every_forward(make_config):
    router = Router(make_config(n_experts=4, top_k=2))
    x_TD = torch.randn(8, 16)
    router.top_k = 1
    assert router(x_TD).expert_idx_A.numel() == 8
    router.capacity_factor = 0.25
    out = router(x_TD)
    counts = torch.bincount(out.expert_idx_A, minlength=4).tolist()
    assert int(out.kept_A.sum()) == sum(min(count, math.ceil(8 / 4 * 1 * 0.25)) for count in counts)
    router.kind = "expert_choice"
    assert torch.bincount(router(x_TD).expert_idx_A, minlength=4).tolist() == [1, 1, 1, 1]
    router.aux_loss_coef = 0.0
    assert router(x_TD).aux_loss.item() == 0.0
    router.kind = "bogus"
    with pytest.raises(ValueError, match="token_choice, expert_choice"):
        router(x_TD)


def test_forward_hook_sees_router_output(make_config):
    router = Router(make_config())
    seen = []
    router.register_forward_hook(lambda module, args, output: seen.append(output))
    router(torch.randn(5, 16))
    assert isinstance(seen[0], RouterOutput) and seen[0].expert_idx_A.numel() == 10


def test_router_stays_fp32_under_autocast(make_config):
    router = Router(make_config())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = router(torch.randn(5, 16).bfloat16())
    assert out.logits_TE.dtype == out.probs_TE.dtype == out.weight_A.dtype == torch.float32


def test_capacity_is_exact_for_decimal_factors():
    from fractions import Fraction

    from moe_monitor.reference.router import switch_capacity

    # Exact rational arithmetic as the reference: ceil(T / E * k * f) with f = 1.1 given as 11/10.
    for num_tokens in range(1, 400):
        for n_experts, top_k in ((2, 2), (8, 2), (4, 1)):
            exact = Fraction(num_tokens * top_k * 11, n_experts * 10)
            assert switch_capacity(num_tokens, n_experts, top_k, 1.1) == -(-exact.numerator // exact.denominator)
