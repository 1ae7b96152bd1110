"""DeepSpeed's MoE (``deepspeed.moe.layer.MoE``, gate ``TopKGate``) against its own ``exp_counts`` and routes."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from moe_monitor import RouterMonitor, RouterSpec
from moe_monitor.knobs import layer_knobs

ds_layer = pytest.importorskip("deepspeed.moe.layer")

D, E, S = 16, 4, 16


def _model(k: int, **kwargs) -> nn.ModuleDict:
    torch.manual_seed(k)
    kwargs = {"capacity_factor": 0.5, "min_capacity": 1, **kwargs}
    return nn.ModuleDict({"moe": ds_layer.MoE(hidden_size=D, expert=nn.Linear(D, D), num_experts=E, k=k, **kwargs)})


def _routes(model: nn.ModuleDict) -> list:
    """The gate's own outputs of every forward (indices [k, S], -1 = dropped for capacity), read by a hook here."""
    outputs = []
    model["moe"].deepspeed_moe.gate.register_forward_hook(lambda module, args, output: outputs.append(output))
    return outputs


@pytest.mark.parametrize("k", [1, 2, 3])
def test_counts_and_drops_equal_deepspeeds_own(k):
    model = _model(k)
    monitor = RouterMonitor(model)
    layer = monitor.layers[0]
    assert (layer.name, layer.num_experts, layer.top_k, layer.adapter) == ("moe.deepspeed_moe.gate", E, k, "deepspeed")
    outputs = _routes(model)
    exp_counts = torch.zeros(E, dtype=torch.long)
    for _ in range(3):
        _, _, counts = model["moe"](torch.randn(2, S // 2, D))
        exp_counts += counts.long()
    snap = monitor.collect(step=0)
    assert snap.counts[0].tolist() == exp_counts.tolist()
    dropped = sum(int((out[3] < 0).sum()) for out in outputs)
    assert dropped > 0  # capacity_factor 0.5: the capacity binds
    assert snap.dropped.tolist() == [dropped]
    assert snap.tokens.tolist() == [3 * S]


def test_the_random_second_expert_is_a_selection_not_a_drop():
    # top2_2nd_expert_sampling (DeepSpeed's default) draws the second expert with Gumbel noise; with room for every
    # assignment nothing is dropped and the counts still equal DeepSpeed's exp_counts.
    model = _model(2, capacity_factor=4.0)
    assert model["moe"].deepspeed_moe.gate.top2_2nd_expert_sampling
    monitor = RouterMonitor(model)
    _, _, exp_counts = model["moe"](torch.randn(4, 8, D))
    snap = monitor.collect(step=0)
    assert snap.counts[0].tolist() == exp_counts.long().tolist()
    assert snap.dropped.tolist() == [0]


def test_logits_are_the_gates_own_and_give_its_aux_loss_inputs():
    model = _model(1, capacity_factor=4.0)
    monitor = RouterMonitor(model)
    x = torch.randn(2, 8, D)
    model["moe"](x)
    snap = monitor.collect(step=0)
    logits_SE = x.reshape(-1, D) @ model["moe"].deepspeed_moe.gate.wg.weight.T
    expected_z = torch.logsumexp(logits_SE.double(), dim=-1).square().mean().item()
    assert snap.stats["z_loss"][0].item() == pytest.approx(expected_z, rel=1e-5)
    # DeepSpeed's top-1 l_aux is E * sum_e mean_gates[e] * fraction[e]: the monitor's aux_loss for k = 1.
    assert snap.stats["aux_loss"][0].item() == pytest.approx(model["moe"].deepspeed_moe.l_aux.item(), rel=1e-5)


def test_registering_the_gate_linear_that_never_runs_warns_and_points_at_the_gate():
    model = _model(2)
    monitor = RouterMonitor(model, routers=[RouterSpec(name="moe.deepspeed_moe.gate.wg", top_k=2)])
    with pytest.warns(RuntimeWarning, match=r"(?s)forward never ran.*'moe.deepspeed_moe.gate' is a deepspeed router"):
        model["moe"](torch.randn(2, 8, D))
    assert monitor.collect(step=0).tokens.tolist() == [0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RouterMonitor(_model(2), routers=["moe.deepspeed_moe.gate"])  # the advice, followed: no error


def test_deepspeed_has_no_knob_for_the_controllers():
    model = _model(2)
    knobs = layer_knobs(model, RouterMonitor(model).layers[0])
    assert knobs.aux_loss_coef == () and knobs.expert_bias is None and knobs.noise is None and knobs.jitter is None


@pytest.mark.parametrize("k", [1, 2, 3])
def test_the_dense_layout_of_a_gate_called_directly_is_read_too(k):
    model = _model(k)
    monitor = RouterMonitor(model)
    gate = model["moe"].deepspeed_moe.gate
    _, _, dispatch_SEC, exp_counts = gate(torch.randn(S, D))  # sparse_routes=False: (l_aux, combine, dispatch, counts)
    snap = monitor.collect(step=0)
    assert snap.counts[0].tolist() == exp_counts.long().tolist()
    assert snap.dropped.tolist() == [k * S - int(dispatch_SEC.sum())]
