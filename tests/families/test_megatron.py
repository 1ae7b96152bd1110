"""Megatron-Core's ``TopKRouter``: recognition, knobs and the reading of its own routing output, on the CPU.

Its forward needs CUDA (``gating`` moves a CPU weight to the current CUDA device), so these tests build the router on
the CPU and feed the family's extract function with what Megatron's own ``routing`` returns for given logits; the
hooked forward (and the logits taken from ``gating``) is what needs the GPU machine.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from moe_monitor import RouterMonitor
from moe_monitor.knobs import layer_knobs

router_module = pytest.importorskip("megatron.core.transformer.moe.router")
from megatron.core.process_groups_config import ProcessGroupCollection  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

D, E, K = 16, 8, 2


def _router(**overrides) -> nn.Module:
    fields = dict(
        num_layers=1, hidden_size=D, num_attention_heads=2, num_moe_experts=E, moe_router_topk=K,
        moe_aux_loss_coeff=0.01, use_cpu_initialization=True,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Megatron's own deprecation notices about unrelated defaults
        config = TransformerConfig(**{**fields, **overrides})
    groups = ProcessGroupCollection(tp=None, cp=None, tp_cp=None, tp_dp_cp=None)
    torch.manual_seed(0)
    return router_module.TopKRouter(config, pg_collection=groups).eval()


def _model(**overrides) -> nn.ModuleDict:
    return nn.ModuleDict({"layers": nn.ModuleList([_router(**overrides), _router(**overrides)])})


def test_routers_are_found_with_their_expert_count_top_k_and_capacity():
    monitor = RouterMonitor(_model())
    assert [(l.name, l.num_experts, l.top_k, l.adapter, l.dropless) for l in monitor.layers] == [
        ("layers.0", E, K, "megatron", True),
        ("layers.1", E, K, "megatron", True),
    ]
    capped = RouterMonitor(_model(moe_expert_capacity_factor=1.0, moe_token_drop_policy="probs"))
    assert [layer.dropless for layer in capped.layers] == [False, False]


def test_dropless_routing_map_is_counted_as_megatron_routed_it():
    model = _model()
    monitor = RouterMonitor(model)
    router = model["layers"][0]
    logits_TE = torch.randn(12, E, generator=torch.Generator().manual_seed(1))
    output = router.routing(logits_TE.reshape(6, 2, E))
    routing = monitor.layers[0].extract(router, (torch.zeros(6, 2, D),), output)
    counts = torch.zeros(E, dtype=torch.long).index_add_(0, routing.expert_idx_A, torch.ones_like(routing.expert_idx_A))
    assert counts.tolist() == output[1].sum(dim=0).tolist()
    assert routing.num_tokens == 12 and routing.kept_A is None


def test_group_limited_routing_with_token_dropping_is_refused_at_setup():
    with pytest.raises(ValueError, match=r"group-limited routing.*moe_expert_capacity_factor=1.0"):
        RouterMonitor(_model(moe_expert_capacity_factor=1.0, moe_router_num_groups=2, moe_router_group_topk=1))


def test_knob_is_the_shared_aux_loss_coefficient_of_the_config():
    model = _model(moe_aux_loss_coeff=0.02)
    monitor = RouterMonitor(model)
    knobs = layer_knobs(model, monitor.layers[1])
    assert [ref.label for ref in knobs.aux_loss_coef] == ["layers.1.config.moe_aux_loss_coeff"]
    assert knobs.aux_loss_coef[0].get(model) == 0.02
    assert knobs.expert_bias is None  # moe_router_enable_expert_bias puts its buffer on CUDA: GPU machine only


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Megatron-Core's router forward needs CUDA")
@pytest.mark.parametrize("capacity_factor", [None, 0.5], ids=["dropless-bias", "capacity"])
def test_cuda_forward_is_counted_like_the_routing_map(capacity_factor):
    if capacity_factor is None:
        overrides = dict(moe_router_enable_expert_bias=True, moe_router_score_function="sigmoid")
    else:
        overrides = dict(moe_expert_capacity_factor=capacity_factor, moe_token_drop_policy="probs")
    model = _model(**overrides).cuda()
    router = model["layers"][0]
    if capacity_factor is None:
        router.expert_bias.copy_(torch.linspace(0.0, 0.5, E, device="cuda"))
    monitor = RouterMonitor(model)
    maps = []
    router.register_forward_hook(lambda module, args, output: maps.append(output[1].detach()))
    x = torch.randn(8, 2, D, device="cuda")
    router(x)
    snap = monitor.collect(step=0)
    kept = int(maps[0].sum())
    if capacity_factor is None:
        assert snap.counts[0].tolist() == maps[0].sum(dim=0).long().cpu().tolist()
        assert snap.dropped.tolist()[0] == 0
    else:
        assert int(snap.counts[0].sum()) == 16 * K
        assert snap.dropped.tolist()[0] == 16 * K - kept > 0
    logits = torch.nn.functional.linear(x.reshape(-1, D).float(), router.weight.float()).double()
    assert snap.stats["z_loss"][0].item() == pytest.approx(torch.logsumexp(logits, -1).square().mean().item(), rel=1e-4)
