"""The reference model, found with no configuration; counts against its own RouterOutput, recounted here."""

from __future__ import annotations

import math

import pytest
import torch
from monitor_toys import record_hook_syncs

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


def test_statistics_stay_fp32_under_bf16_autocast():
    # Large logits and enough tokens that bf16 rounding would show: lse**2 ~ 40, per-expert counts above 256.
    model = _model(d_model=32, n_layers=1, seq_len=128, n_experts=8, init_std=0.5)
    monitor = RouterMonitor(model)
    tokens = torch.randint(0, 256, (8, 128), generator=torch.Generator().manual_seed(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (output,) = _run_and_capture(model, tokens)
    snap = monitor.collect(step=0)
    logits_TE = output.logits_TE.double()
    assert output.logits_TE.dtype == torch.float32
    z_loss = torch.logsumexp(logits_TE, dim=-1).square().mean().item()
    probs_TE = logits_TE.softmax(dim=-1)
    counts_E = torch.zeros(8, dtype=torch.float64).index_add_(
        0, output.expert_idx_A, torch.ones(len(output.expert_idx_A)).double()
    )
    aux_loss = 8 * ((counts_E / 1024) * probs_TE.mean(dim=0)).sum().item()
    assert snap.stats["z_loss"][0].item() == pytest.approx(z_loss, rel=1e-6)
    assert snap.stats["aux_loss"][0].item() == pytest.approx(aux_loss, rel=1e-6)
    assert snap.stats["top1_confidence"][0].item() == pytest.approx(probs_TE.amax(dim=-1).mean().item(), rel=1e-5)
    chosen_TK = output.expert_idx_A.view(1024, 2)
    coact_EE = [[int(((chosen_TK == e).any(-1) & (chosen_TK == f).any(-1)).sum()) for f in range(8)] for e in range(8)]
    assert max(coact_EE[e][e] for e in range(8)) > 256
    assert snap.extras["coactivation"][0].tolist() == coact_EE


def test_capacity_changed_between_steps_is_read_per_forward():
    model = _model(capacity_factor=0.5)
    monitor = RouterMonitor(model)
    tokens = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(3))
    outputs = _run_and_capture(model, tokens)
    snap = monitor.collect(step=0)
    assert snap.dropped.tolist() == [_recount(output, 4)[1] for output in outputs]
    assert all(math.isnan(v) for v in snap.extras["counterfactual_drop@1.0"].tolist())
    for block in model.blocks:
        block.moe.router.capacity_factor = None
    model(tokens)
    snap = monitor.collect(step=1)
    assert snap.stats["dropped_fraction"].tolist() == [0.0, 0.0]
    assert all(math.isfinite(v) for v in snap.extras["counterfactual_drop@1.0"].tolist())


@pytest.mark.parametrize("router", ["token_choice", "expert_choice"])
def test_hooks_do_not_synchronise_with_capacity_or_expert_choice(monkeypatch, router):
    with record_hook_syncs(monkeypatch) as recorder:
        model = _model(router=router, capacity_factor=0.5)
        monitor = RouterMonitor(model)
        model(torch.randint(0, 256, (2, 8))).logits.sum().backward()
    assert recorder.ops == []
    snap = monitor.collect(step=0)
    assert snap.tokens.tolist() == [16, 16]
    assert router == "expert_choice" or min(snap.dropped.tolist()) > 0
