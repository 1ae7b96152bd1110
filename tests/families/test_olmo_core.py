"""OLMo-core's ``MoELinearRouter`` against its own ``batch_size_per_expert`` (its experts need Triton/CUDA; the
router runs on the CPU)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moe_monitor import RouterMonitor
from moe_monitor.knobs import layer_knobs

olmo_router = pytest.importorskip("olmo_core.nn.moe.router")

D, E, K = 16, 8, 2


def _model(**kwargs) -> nn.ModuleDict:
    torch.manual_seed(0)
    routers = [olmo_router.MoELinearRouter(d_model=D, num_experts=E, top_k=K, **kwargs) for _ in range(2)]
    return nn.ModuleDict({"blocks": nn.ModuleList(routers)})


def test_routers_are_found_and_counted_like_batch_size_per_expert_after_the_score_bias():
    model = _model(bias_gamma=0.01, lb_loss_weight=0.01)
    monitor = RouterMonitor(model)
    assert [(layer.name, layer.num_experts, layer.top_k, layer.adapter) for layer in monitor.layers] == [
        ("blocks.0", E, K, "olmo-core"),
        ("blocks.1", E, K, "olmo-core"),
    ]
    router = model["blocks"][0]
    router.score_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0]))
    x = torch.randn(2, 8, D)
    theirs = [r(x)[2].long().tolist() for r in model["blocks"]]
    snap = monitor.collect(step=0)
    assert snap.counts.tolist() == theirs
    assert sum(theirs[0][5:]) == 2 * 8 * K - sum(theirs[0][:5]) and sum(theirs[0][5:]) > 16  # the bias moved it
    logits = router.get_expert_logits(x).reshape(-1, E).double()
    assert snap.stats["z_loss"][0].item() == pytest.approx(torch.logsumexp(logits, -1).square().mean().item(), rel=1e-5)


def test_knobs_are_the_lb_loss_weight_jitter_and_score_bias():
    model = _model(bias_gamma=0.01, lb_loss_weight=0.02, jitter_eps=0.1)
    knobs = layer_knobs(model, RouterMonitor(model).layers[1])
    router = model["blocks"][1]
    assert [ref.get(model) for ref in knobs.aux_loss_coef] == [0.02]
    assert knobs.jitter.get(model) == 0.1
    assert knobs.expert_bias.get(model) is router.score_bias
    bare = _model()
    knobs = layer_knobs(bare, RouterMonitor(bare).layers[0])
    assert knobs.aux_loss_coef == () and knobs.jitter is None and knobs.expert_bias is None


def test_the_logits_wrapper_goes_away_with_the_monitor():
    model = _model()
    monitor = RouterMonitor(model)
    router = model["blocks"][0]
    assert "get_expert_logits" in router.__dict__
    monitor.remove()
    router(torch.randn(1, 4, D))
    assert "get_expert_logits" not in router.__dict__


def test_a_deep_copy_of_a_monitored_router_computes_with_its_own_weights():
    import copy

    model = _model()
    RouterMonitor(model)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone["blocks"][0].weight.mul_(-1.0)
    x = torch.randn(1, 4, D)
    own = torch.nn.functional.linear(x, clone["blocks"][0].weight.view(E, D))
    assert torch.allclose(clone["blocks"][0].get_expert_logits(x), own)
