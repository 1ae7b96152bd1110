"""st-moe-pytorch and mixture-of-experts (lucidrains): GShard-style capacity with a random second-choice policy,
checked against their own dispatch tensors and a plain-loop capacity simulation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moe_monitor import RouterMonitor
from moe_monitor.knobs import layer_knobs

st_moe = pytest.importorskip("st_moe_pytorch")
lucidrains = pytest.importorskip("mixture_of_experts")

D, E, B, N = 16, 4, 2, 16


def _dispatched(model_gate) -> list:
    outputs = []
    model_gate.register_forward_hook(lambda module, args, output: outputs.append(output[0].detach()))
    return outputs


def _plain_outcome(topk_BNK, ran_BNE, capacity: int, maybe_BNK, never_BNK=None):
    """Slot by slot, token by token: (selected counts, dropped, skipped), the way both libraries fill capacity; a
    choice that did not run is skipped where the policy skips it, or may have and its expert had room."""
    counts, dropped, skipped = [0] * E, 0, 0
    for b in range(topk_BNK.shape[0]):
        taken = [0] * E
        for slot in range(topk_BNK.shape[2]):
            for n in range(topk_BNK.shape[1]):
                e = int(topk_BNK[b, n, slot])
                counts[e] += 1
                if ran_BNE[b, n, e]:
                    taken[e] += 1
                elif (never_BNK is not None and never_BNK[b, n, slot]) or (
                    maybe_BNK[b, n, slot] and taken[e] < capacity
                ):
                    skipped += 1
                else:
                    dropped += 1
    return counts, dropped, skipped


def _check_kept_and_skipped(monitor: RouterMonitor, snap, dispatch_BNEC: torch.Tensor, skipped: int) -> None:
    """The monitor's kept counts are what the library's dispatch tensor sends to each expert; skipped apart."""
    ran_E = (dispatch_BNEC != 0).any(-1).sum((0, 1))
    assert snap.kept[0].tolist() == ran_E.tolist()
    assert snap.skipped.tolist() == [skipped]
    row = monitor.layer_frame().iloc[0]
    assert int(row.skipped) == skipped and row.skipped_fraction == pytest.approx(skipped / (B * N * 2))
    assert monitor.expert_frame()["kept"].tolist() == ran_E.tolist()


def _st_model(**kwargs) -> nn.ModuleDict:
    torch.manual_seed(0)
    return nn.ModuleDict({"moe": st_moe.MoE(dim=D, num_experts=E, **kwargs)})


@pytest.mark.parametrize(
    ("threshold", "capacity_factor"),
    [(0.2, 1.0), (1e-6, 1.0), (1e6, 4.0), (0.2, 4.0)],
    ids=["default", "all", "none", "roomy"],
)
def test_st_moe_counts_drops_and_skips_against_its_dispatch_tensor(record, threshold, capacity_factor):
    # capacity_factor 1.0 with N=16 and E=4 gives capacity 4 == E: the dispatch tensor [B, N, E, C] ends in E and
    # must not be read as logits.
    model = _st_model(threshold_train=threshold, capacity_factor_train=capacity_factor)
    monitor = RouterMonitor(model)
    layer = monitor.layers[0]
    assert (layer.name, layer.num_experts, layer.top_k, layer.adapter) == ("moe.gate", E, 2, "st-moe")
    routings, dispatched = record(layer), _dispatched(model["moe"].gate)
    x = torch.randn(B, N, D)
    model["moe"](x)
    snap = monitor.collect(step=0)
    dispatch = dispatched[0]
    if capacity_factor == 1.0:
        assert dispatch.shape[-1] == E
    logits = model["moe"].gate.to_gates(x)
    top, topk = logits.softmax(-1).topk(2, dim=-1)
    maybe = torch.stack([torch.zeros(B, N, dtype=torch.bool), top[..., 1] / top.sum(-1) < threshold], dim=-1)
    counts, dropped, skipped = _plain_outcome(topk, (dispatch != 0).any(-1), dispatch.shape[-1], maybe)
    assert snap.counts[0].tolist() == counts and sum(counts) == B * N * 2
    assert snap.dropped.tolist() == [dropped]
    assert int(routings[0].skipped_A.sum()) == skipped
    ran = int((dispatch != 0).sum())
    assert B * N * 2 - dropped - skipped == ran  # every assignment ran, was dropped or was skipped
    _check_kept_and_skipped(monitor, snap, dispatch, skipped)
    if threshold == 1e-6:
        assert skipped == 0
    if threshold == 1e6:
        assert dropped == 0 and skipped == B * N  # every second choice skipped, no first choice dropped
    lse = torch.logsumexp(logits.reshape(-1, E).double(), -1)
    assert snap.stats["z_loss"][0].item() == pytest.approx(lse.square().mean().item(), rel=1e-5)


def test_st_moe_knob_is_the_balance_loss_coef():
    model = _st_model(balance_loss_coef=0.03)
    knobs = layer_knobs(model, RouterMonitor(model).layers[0])
    assert [ref.label for ref in knobs.aux_loss_coef] == ["moe.balance_loss_coef"]
    assert knobs.aux_loss_coef[0].get(model) == 0.03


def test_st_moe_noised_gates_warn_once():
    model = _st_model()
    RouterMonitor(model)
    with pytest.warns(RuntimeWarning, match="noise_gates=True"):
        model["moe"](torch.randn(B, N, D), noise_gates=True)


# ("threshold" fails inside the library on [B, N, D] inputs: its mask_2 lacks an expert dimension.)
@pytest.mark.parametrize("policy", ["random", "all", "none"])
def test_lucidrains_counts_drops_and_skips_against_its_dispatch_tensor(record, policy):
    torch.manual_seed(1)
    model = nn.ModuleDict({"moe": lucidrains.MoE(dim=D, num_experts=E, second_policy_train=policy)})
    monitor = RouterMonitor(model)
    layer = monitor.layers[0]
    assert (layer.name, layer.num_experts, layer.top_k, layer.adapter) == ("moe.gate", E, 2, "mixture-of-experts")
    routings, dispatched = record(layer), _dispatched(model["moe"].gate)
    x = torch.randn(B, N, D)
    model["moe"](x)
    snap = monitor.collect(step=0)
    dispatch = dispatched[0]
    top, topk = (x @ model["moe"].gate.w_gating).softmax(-1).topk(2, dim=-1)
    second = torch.full((B, N), policy != "all") & (top[..., 1] / top.sum(-1) < 0.2)
    maybe = torch.stack([torch.zeros(B, N, dtype=torch.bool), second & (policy == "random")], dim=-1)
    never = torch.stack([torch.zeros(B, N, dtype=torch.bool), torch.full((B, N), policy == "none")], dim=-1)
    counts, dropped, skipped = _plain_outcome(topk, (dispatch != 0).any(-1), dispatch.shape[-1], maybe, never)
    assert snap.counts[0].tolist() == counts
    assert snap.dropped.tolist() == [dropped]
    assert int(routings[0].skipped_A.sum()) == skipped
    _check_kept_and_skipped(monitor, snap, dispatch, skipped)
    if policy == "none":
        assert skipped == B * N
    if policy == "all":
        assert skipped == 0
    knobs = layer_knobs(model, layer)
    assert knobs.aux_loss_coef[0].get(model) == model["moe"].loss_coef
