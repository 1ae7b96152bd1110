"""Expert dispatch against a plain per-assignment loop; gradients to the router and the experts."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from moe_monitor.reference.experts import DenseMLP, Experts
from moe_monitor.reference.model import MoELayer
from moe_monitor.reference.router import Router


def naive_moe(x_TD: torch.Tensor, routing, experts: Experts) -> torch.Tensor:
    """One assignment at a time, in float64: ``y[t] += w * down(silu(gate) * up)`` for kept assignments."""
    x_TD = x_TD.double()
    w_gate_up, w_down = experts.w_gate_up.double(), experts.w_down.double()
    y_TD = torch.zeros_like(x_TD)
    for t, e, w, kept in zip(
        routing.token_idx_A.tolist(), routing.expert_idx_A.tolist(), routing.weight_A.tolist(), routing.kept_A.tolist()
    ):
        if kept:
            gate, up = (x_TD[t] @ w_gate_up[e]).chunk(2)
            y_TD[t] += w * ((F.silu(gate) * up) @ w_down[e])
    return y_TD


@pytest.mark.parametrize("dispatch", ["loop", "grouped", "auto"])
@pytest.mark.parametrize(
    "overrides",
    [{}, {"capacity_factor": 0.6}, {"router": "expert_choice"}, {"top_k": 1}, {"n_experts": 8, "top_k": 3}],
)
def test_dispatch_equals_naive_loop(make_config, dispatch, overrides):
    config = make_config(**overrides)
    torch.manual_seed(0)
    router, experts = Router(config), Experts(config, dispatch=dispatch)
    x_TD = torch.randn(24, config.d_model)
    routing = router(x_TD)
    torch.testing.assert_close(experts(x_TD, routing).double(), naive_moe(x_TD, routing, experts), rtol=1e-4, atol=1e-6)


def test_grouped_and_loop_gradients_agree_with_drops(make_config):
    config = make_config(capacity_factor=0.5)
    torch.manual_seed(1)
    loop = Experts(config, dispatch="loop")
    grouped = copy.deepcopy(loop)
    grouped.dispatch = "grouped"
    x_TD = torch.randn(32, config.d_model, requires_grad=True)
    routing = Router(config)(x_TD)
    routing = routing._replace(weight_A=routing.weight_A.detach())
    assert not bool(routing.kept_A.all())
    grads = []
    for experts in (loop, grouped):
        y_TD = experts(x_TD, routing)
        grads.append(torch.autograd.grad(y_TD.square().sum(), [x_TD, experts.w_gate_up, experts.w_down]))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        assert bool(torch.isfinite(a).all())


def test_dropped_tokens_get_zero_moe_output(make_config):
    config = make_config(capacity_factor=1.0)
    router, experts = Router(config), Experts(config)
    with torch.no_grad():
        router.gate.weight.zero_()
        router.gate.weight[0, 0], router.gate.weight[1, 0] = 10.0, 5.0
    x_TD = torch.randn(16, config.d_model)
    x_TD[:, 0] = 1.0
    routing = router(x_TD)
    y_TD = experts(x_TD, routing)
    kept_TK = routing.kept_A.view(16, 2)
    fully_dropped_T = ~kept_TK.any(-1)
    assert int(fully_dropped_T.sum()) == 8  # capacity ceil(16 / 4 * 2) = 8 per expert: tokens 8..15 lose both
    assert bool((y_TD[fully_dropped_T] == 0).all())
    assert bool((y_TD[~fully_dropped_T].abs().sum(-1) > 0).all())


def test_gradients_reach_router_and_used_experts(make_config):
    config = make_config(n_experts=8, top_k=2, aux_loss_coef=0.0, z_loss_coef=0.0)
    torch.manual_seed(0)
    layer = MoELayer(config)
    x_BSD = torch.randn(1, 3, config.d_model)  # 6 assignments over 8 experts: some experts stay idle
    y_BSD, aux_loss, z_loss = layer(x_BSD)
    (y_BSD.square().sum() + aux_loss + z_loss).backward()
    routing = layer.router(x_BSD.view(-1, config.d_model))
    used = set(routing.expert_idx_A.tolist())
    assert layer.router.gate.weight.grad.abs().sum() > 0
    for e in range(8):
        has_grad = bool(layer.experts.w_gate_up.grad[e].abs().sum() > 0) and bool(
            layer.experts.w_down.grad[e].abs().sum() > 0
        )
        assert has_grad == (e in used), e


def test_dense_mlp_matches_experts_flops(make_config):
    config = make_config(d_model=16, d_expert=8, top_k=2)
    dense = DenseMLP(config.d_model, config.top_k * config.d_expert)
    experts = Experts(config)
    dense_params = sum(p.numel() for p in dense.parameters())
    assert dense_params == config.top_k * experts.w_gate_up[0].numel() + config.top_k * experts.w_down[0].numel()


def test_unknown_dispatch_raises(make_config):
    with pytest.raises(ValueError, match="auto, grouped, loop"):
        Experts(make_config(), dispatch="magic")
