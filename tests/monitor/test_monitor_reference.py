"""The reference model, found with no configuration; counts against its own RouterOutput, recounted here."""

from __future__ import annotations

import math

import pytest
import torch

from moe_monitor import RouterMonitor
from moe_monitor.reference import MoEConfig, MoETransformer


def _model(**overrides) -> MoETransformer:
    torch.manual_seed(0)
    fields = dict(d_model=16, n_layers=2, n_heads=2, seq_len=16, n_experts=4, top_k=2, d_expert=8, aux_loss_coef=1.0)
    return MoETransformer(MoEConfig(**{**fields, **overrides}))


def _run_and_capture(model: MoETransformer, tokens: torch.Tensor) -> list:
    outputs = []
    handles = [block.moe.router.register_forward_hook(lambda m, a, o: outputs.append(o)) for block in model.blocks]
    model(tokens)
    for handle in handles:
        handle.remove()
    return outputs


def _recount(output, num_experts: int) -> tuple[list[int], int]:
    counts, dropped = [0] * num_experts, 0
    for e, kept in zip(output.expert_idx_A.tolist(), output.kept_A.tolist()):
        counts[e] += 1
        dropped += not kept
    return counts, dropped


@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_token_choice_counts_drops_and_aux_loss(capacity_factor):
    model = _model(capacity_factor=capacity_factor)
    monitor = RouterMonitor(model)
    assert [(layer.name, layer.num_experts, layer.top_k) for layer in monitor.layers] == [
        ("blocks.0.moe.router", 4, 2),
        ("blocks.1.moe.router", 4, 2),
    ]
    tokens = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(1))
    outputs = _run_and_capture(model, tokens)
    snap = monitor.collect(step=0)
    recounted = [_recount(output, 4) for output in outputs]
    assert snap.counts.tolist() == [counts for counts, _ in recounted]
    assert snap.dropped.tolist() == [dropped for _, dropped in recounted]
    assert snap.tokens.tolist() == [16, 16]
    if capacity_factor is None:
        assert snap.dropped.tolist() == [0, 0]
        assert all(math.isfinite(v) for v in snap.extras["counterfactual_drop@1.0"].tolist())
    else:
        assert min(snap.dropped.tolist()) > 0
        assert all(math.isnan(v) for v in snap.extras["counterfactual_drop@1.0"].tolist())
    # With aux_loss_coef=1 the router's own loss is the unscaled Switch loss of the same forward.
    assert snap.stats["aux_loss"].tolist() == pytest.approx([o.aux_loss.item() for o in outputs], rel=1e-5)


def test_expert_choice_counts_every_expert_at_capacity():
    model = _model(router="expert_choice", capacity_factor=1.0)
    monitor = RouterMonitor(model)
    assert all(layer.kind == "expert_choice" for layer in monitor.layers)
    outputs = _run_and_capture(model, torch.randint(0, 256, (2, 8)))
    snap = monitor.collect(step=0)
    capacity = math.ceil(16 * 2 / 4)
    assert snap.counts.tolist() == [[capacity] * 4] * 2
    assert snap.counts.tolist() == [_recount(output, 4)[0] for output in outputs]
    assert snap.stats["load_entropy"].tolist() == pytest.approx([1.0, 1.0])
