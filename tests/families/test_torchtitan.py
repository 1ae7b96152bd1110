"""torchtitan's MoE, found with no configuration, against its own ``tokens_per_expert_E`` counter."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from moe_monitor import RouterMonitor
from moe_monitor.knobs import layer_knobs

titan_moe = pytest.importorskip("torchtitan.models.common.moe")
from torchtitan.models.common.linear import Linear  # noqa: E402
from torchtitan.models.common.token_dispatcher import LocalTokenDispatcher  # noqa: E402

D, E, K = 16, 8, 2


def _moe(score_func: str = "sigmoid") -> nn.Module:
    config = titan_moe.MoE.Config(
        num_experts=E,
        routed_experts=titan_moe.RoutedExperts.Config(
            inner_experts=titan_moe.GroupedExperts.Config(dim=D, hidden_dim=32, num_experts=E),
            token_dispatcher=LocalTokenDispatcher.Config(num_experts=E, top_k=K),
        ),
        router=titan_moe.TokenChoiceTopKRouter.Config(
            num_experts=E, gate=Linear.Config(in_features=D, out_features=E), top_k=K, score_func=score_func
        ),
        load_balance_coeff=1e-3,
    )
    moe = config.build()
    for parameter in moe.parameters():
        nn.init.normal_(parameter, std=0.1)
    return moe


class Stack(nn.Module):
    def __init__(self, checkpointed: bool = False, score_func: str = "sigmoid") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(_moe(score_func) for _ in range(2))
        self.checkpointed = checkpointed

    def forward(self, x):
        for layer in self.layers:
            x = checkpoint(layer, x, use_reentrant=False) if self.checkpointed else layer(x)
        return x


def _theirs(model: Stack) -> list[list[int]]:
    return [layer.tokens_per_expert_E.long().tolist() for layer in model.layers]


@pytest.mark.filterwarnings("ignore:In CPU autocast")
@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
def test_routers_are_found_and_counted_like_tokens_per_expert(score_func):
    model = Stack(score_func=score_func)
    monitor = RouterMonitor(model)
    assert [(layer.name, layer.num_experts, layer.top_k, layer.adapter) for layer in monitor.layers] == [
        ("layers.0.router", E, K, "torchtitan"),
        ("layers.1.router", E, K, "torchtitan"),
    ]
    x = torch.randn(2, 8, D)
    logits_TE = model.layers[0].router.gate(x).reshape(-1, E).double()
    model(x)
    snap = monitor.collect(step=0)
    assert snap.counts.tolist() == _theirs(model)
    assert snap.dropped.tolist() == [0, 0]
    # The logits come from the gate's output: z_loss = mean logsumexp(logits)^2 over the 16 tokens.
    expected_z = torch.logsumexp(logits_TE, dim=-1).square().mean().item()
    assert snap.stats["z_loss"][0].item() == pytest.approx(expected_z, rel=1e-5)
    if score_func == "softmax":
        top1 = logits_TE.softmax(-1).amax(-1).mean().item()
    else:
        scores = logits_TE.sigmoid()
        top1 = (scores / scores.sum(-1, keepdim=True)).amax(-1).mean().item()
    assert snap.stats["top1_confidence"][0].item() == pytest.approx(top1, rel=1e-5)


@pytest.mark.filterwarnings("ignore:In CPU autocast")
def test_counts_are_taken_after_the_expert_bias():
    model = Stack()
    monitor = RouterMonitor(model)
    bias_E = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.3, 0.6, 0.9])
    model.layers[0].expert_bias_E.copy_(bias_E)
    x = torch.randn(4, 8, D)
    unbiased = [0] * E
    for e in model.layers[0].router.gate(x).sigmoid().topk(K, dim=-1).indices.reshape(-1).tolist():
        unbiased[e] += 1
    model(x)
    counts = monitor.collect(step=0).counts.tolist()
    assert counts == _theirs(model)
    assert counts[0] != unbiased  # the bias moved the choice: the gate's top-k alone would be wrong
    assert sum(counts[0][5:]) > sum(unbiased[5:])


@pytest.mark.filterwarnings("ignore:In CPU autocast")
def test_activation_checkpointing_is_counted_once_where_torchtitan_counts_twice():
    model = Stack(checkpointed=True)
    monitor = RouterMonitor(model)
    x = torch.randn(2, 8, D, requires_grad=True)
    model(x).sum().backward()
    counts = monitor.collect(step=0).counts
    theirs = torch.tensor(_theirs(model))
    assert theirs.sum().item() == 2 * 2 * 16 * K  # torchtitan's counter re-counts the recompute in backward
    assert (counts * 2).tolist() == theirs.tolist()
    assert counts.sum(dim=1).tolist() == [16 * K, 16 * K]


@pytest.mark.filterwarnings("ignore:In CPU autocast")
def test_knobs_are_the_expert_bias_buffer_and_follow_a_module_move():
    model = Stack()
    monitor = RouterMonitor(model)
    knobs = layer_knobs(model, monitor.layers[1])
    assert knobs.expert_bias.label == "layers.1.expert_bias_E"
    model.double()  # replaces every buffer
    assert knobs.expert_bias.get(model) is model.layers[1].expert_bias_E
    assert knobs.aux_loss_coef == () and knobs.noise is None


@pytest.mark.filterwarnings("ignore:In CPU autocast")
def test_the_gate_hook_goes_away_with_the_monitor():
    model = Stack()
    monitor = RouterMonitor(model)
    gate = model.layers[0].router.gate
    assert len(gate._forward_hooks) == 1
    monitor.remove()
    model(torch.randn(1, 4, D))
    assert len(gate._forward_hooks) == 0
