"""Hugging Face MoE families built from tiny random configs: the monitor's counts against the model's own
``output_router_logits=True`` outputs, recomputed here."""

from __future__ import annotations

import math
import types

import pytest
import torch
from monitor_toys import record_hook_syncs
from torch import nn

from moe_monitor import RouterMonitor

transformers = pytest.importorskip("transformers")

VOCAB = 64
COMMON = dict(
    vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=1,
)  # fmt: skip


def _decoder(family: str) -> nn.Module:
    torch.manual_seed(0)
    if family == "mixtral":
        config = transformers.MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2)
        return transformers.MixtralForCausalLM(config)
    if family == "qwen2_moe":
        config = transformers.Qwen2MoeConfig(
            **COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16
        )
        return transformers.Qwen2MoeForCausalLM(config)
    if family == "olmoe":
        config = transformers.OlmoeConfig(**COMMON, num_experts=4, num_experts_per_tok=2)
        return transformers.OlmoeForCausalLM(config)
    raise ValueError(family)


def _topk_counts(logits_TE: torch.Tensor, top_k: int, mask_T: torch.Tensor | None = None) -> list[int]:
    idx_TK = torch.softmax(logits_TE.float(), dim=-1).topk(top_k, dim=-1).indices
    counts = [0] * logits_TE.shape[-1]
    for t, row in enumerate(idx_TK.tolist()):
        if mask_T is None or mask_T[t]:
            for e in row:
                counts[e] += 1
    return counts


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "olmoe"])
def test_counts_match_output_router_logits(family):
    model = _decoder(family)
    monitor = RouterMonitor(model)
    assert [layer.name for layer in monitor.layers] == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    assert [(layer.num_experts, layer.top_k) for layer in monitor.layers] == [(4, 2), (4, 2)]
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    out = model(ids, output_router_logits=True)
    snap = monitor.collect(step=0)
    assert snap.counts.tolist() == [_topk_counts(logits, 2) for logits in out.router_logits]
    assert snap.tokens.tolist() == [14, 14] and snap.dropped.tolist() == [0, 0]
    lse = torch.logsumexp(out.router_logits[0].double(), dim=-1)
    assert snap.stats["z_loss"][0].item() == pytest.approx(lse.square().mean().item(), rel=1e-5)


def test_padding_mask_with_attention_mask_matches_transformers_aux_loss():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    model = _decoder("mixtral")
    monitor = RouterMonitor(model)
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(2))
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    monitor.set_token_mask(attention_mask)
    out = model(ids, attention_mask=attention_mask, output_router_logits=True)
    snap = monitor.collect(step=0)
    mask_T = attention_mask.reshape(-1).bool()
    assert snap.tokens.tolist() == [10, 10]
    assert snap.counts.tolist() == [_topk_counts(logits, 2, mask_T) for logits in out.router_logits]
    theirs = load_balancing_loss_func(out.router_logits[:1], num_experts=4, top_k=2, attention_mask=attention_mask)
    assert snap.stats["aux_loss"][0].item() == pytest.approx(theirs.item(), rel=1e-5)


def test_switch_transformers_counts_and_capacity_drops():
    torch.manual_seed(0)
    config = transformers.SwitchTransformersConfig(
        vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=2,
        num_experts=4, expert_capacity=2, encoder_sparse_step=1, decoder_sparse_step=1,
    )  # fmt: skip
    model = transformers.SwitchTransformersForConditionalGeneration(config)
    monitor = RouterMonitor(model)
    names = [layer.name for layer in monitor.layers]
    assert len(names) == 4 and names[0].startswith("encoder.") and names[-1].startswith("decoder.")
    assert all(layer.top_k == 1 and not layer.dropless for layer in monitor.layers)
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    out = model(input_ids=ids, decoder_input_ids=ids[:, :5], output_router_logits=True)
    snap = monitor.collect(step=0)
    expected_counts, expected_dropped = [], []
    for logits_BSE in (*out.encoder_router_logits, *out.decoder_router_logits):
        chosen_BS = logits_BSE.argmax(dim=-1)
        counts, dropped = [0] * 4, 0
        for row in chosen_BS.tolist():
            per_sequence = [0] * 4  # Switch enforces the capacity per sequence, first come first served
            for e in row:
                counts[e] += 1
                per_sequence[e] += 1
                dropped += per_sequence[e] > config.expert_capacity
        expected_counts.append(counts)
        expected_dropped.append(dropped)
    assert snap.counts.tolist() == expected_counts
    assert snap.dropped.tolist() == expected_dropped and sum(expected_dropped) > 0
    assert snap.tokens.tolist() == [12, 12, 10, 10]
    assert all(math.isnan(v) for v in snap.extras["counterfactual_drop@1.0"].tolist())


def test_deepseek_v3_sigmoid_router_uses_its_own_choice_and_normalised_scores():
    torch.manual_seed(0)
    config = transformers.DeepseekV3Config(
        **COMMON, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, n_group=4, topk_group=2,
        first_k_dense_replace=1, kv_lora_rank=8, q_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4,
        v_head_dim=8, n_shared_experts=1,
    )  # fmt: skip
    model = transformers.DeepseekV3ForCausalLM(config)
    gate = model.model.layers[1].mlp.gate
    with torch.no_grad():
        gate.weight.normal_()
        gate.e_score_correction_bias.copy_(torch.linspace(-0.3, 0.3, 8))
    monitor = RouterMonitor(model)
    assert [layer.name for layer in monitor.layers] == ["model.layers.1.mlp.gate"]
    assert monitor.layers[0].meta["probs"] == "sigmoid-normalised"
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(4))
    out = model(ids, output_router_logits=True)
    snap = monitor.collect(step=0)
    # DeepSeek-V3 selection, rewritten here: bias-corrected sigmoid scores, best 2 of 4 groups (each scored by its
    # top-2 sum), then the top-2 experts inside the chosen groups.
    logits_TE = out.router_logits[0].double()
    scores_TE = logits_TE.sigmoid()
    counts = [0] * 8
    for t in range(scores_TE.shape[0]):
        biased = [scores_TE[t, e].item() + gate.e_score_correction_bias[e].item() for e in range(8)]
        groups = [sorted(biased[2 * g : 2 * g + 2], reverse=True) for g in range(4)]
        best_groups = sorted(range(4), key=lambda g: -sum(groups[g][:2]))[:2]
        allowed = [e for e in range(8) if e // 2 in best_groups]
        for e in sorted(allowed, key=lambda e: -biased[e])[:2]:
            counts[e] += 1
    assert snap.counts.tolist() == [counts]
    assert counts != _topk_counts(logits_TE, 2), "the bias and group limit must change the choice for this to test it"
    probs_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True)
    top1 = probs_TE.max(dim=-1).values.mean().item()
    assert snap.stats["top1_confidence"][0].item() == pytest.approx(top1, rel=1e-5)
    aux = 8 * sum(counts[e] / 16 * probs_TE[:, e].mean().item() for e in range(8))
    assert snap.stats["aux_loss"][0].item() == pytest.approx(aux, rel=1e-5)


def test_manual_registration_by_name_keeps_the_family_adapter():
    model = _decoder("olmoe")
    monitor = RouterMonitor(model, routers=["model.layers.1.mlp.gate"])
    assert [(layer.name, layer.adapter, layer.top_k) for layer in monitor.layers] == [
        ("model.layers.1.mlp.gate", "hf", 2)
    ]
    out = model(torch.randint(0, VOCAB, (1, 5)), output_router_logits=True)
    assert monitor.collect(step=0).counts.tolist() == [_topk_counts(out.router_logits[1], 2)]


class _OldStyleMoE(nn.Module):
    """A transformers-4-style model: the gate is a bare nn.Linear, top-k only known from the config."""

    def __init__(self) -> None:
        super().__init__()
        self.config = types.SimpleNamespace(num_local_experts=4, num_experts_per_tok=2)
        self.layers = nn.ModuleList(nn.ModuleDict({"gate": nn.Linear(8, 4, bias=False)}) for _ in range(2))

    def forward(self, x_TD):
        return [layer["gate"](x_TD) for layer in self.layers]


def test_old_style_linear_gate_recomputes_top_k_from_logits():
    model = _OldStyleMoE()
    monitor = RouterMonitor(model)
    assert [(layer.name, layer.adapter, layer.top_k) for layer in monitor.layers] == [
        ("layers.0.gate", "hf-linear", 2),
        ("layers.1.gate", "hf-linear", 2),
    ]
    logits = model(torch.randn(9, 8))
    assert monitor.collect(step=0).counts.tolist() == [_topk_counts(lg, 2) for lg in logits]


def test_gradient_checkpointing_of_a_transformers_model_counts_each_forward_once():
    model = _decoder("mixtral")
    ids = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(5))
    model.eval()
    with torch.no_grad():
        expected = [_topk_counts(logits, 2) for logits in model(ids, output_router_logits=True).router_logits]
    model.train()
    (
        model.activation_checkpointing_enable
        if hasattr(model, "activation_checkpointing_enable")
        else model.gradient_checkpointing_enable
    )()
    monitor = RouterMonitor(model)
    calls = []
    model.model.layers[0].mlp.gate.register_forward_hook(lambda *args: calls.append(1))
    model(ids, labels=ids).loss.backward()
    assert len(calls) == 2, "the gate must be recomputed in backward for this test to mean anything"
    assert monitor.collect(step=0).counts.tolist() == expected


@pytest.mark.parametrize(
    "family",
    [
        pytest.param(lambda: transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
            **COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=8)), id="qwen3_moe"),
        pytest.param(lambda: transformers.GptOssForCausalLM(transformers.GptOssConfig(
            **COMMON, num_local_experts=4, num_experts_per_tok=2, head_dim=8)), id="gpt_oss"),
        pytest.param(lambda: transformers.Llama4ForCausalLM(transformers.Llama4TextConfig(
            **COMMON, num_local_experts=4, num_experts_per_tok=1, head_dim=8, intermediate_size_mlp=32)), id="llama4"),
    ],
)  # fmt: skip
def test_other_families_following_the_registry_contract_work_unchanged(family):
    torch.manual_seed(0)
    model = family()
    monitor = RouterMonitor(model)
    assert len(monitor.layers) == 2
    out = model(torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(6)), output_router_logits=True)
    expected = [_topk_counts(logits, layer.top_k) for logits, layer in zip(out.router_logits, monitor.layers)]
    assert monitor.collect(step=0).counts.tolist() == expected


def test_hf_adapters_do_not_synchronise(monkeypatch):
    torch.manual_seed(0)
    switch_config = transformers.SwitchTransformersConfig(
        vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=2,
        num_experts=4, expert_capacity=2, encoder_sparse_step=1, decoder_sparse_step=1,
    )  # fmt: skip
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(5))
    with record_hook_syncs(monkeypatch) as recorder:
        mixtral = _decoder("mixtral")
        mixtral_monitor = RouterMonitor(mixtral)
        assert {layer.adapter for layer in mixtral_monitor.layers} == {"hf"}
        mixtral(ids)
        switch = transformers.SwitchTransformersForConditionalGeneration(switch_config)
        switch_monitor = RouterMonitor(switch)
        switch(input_ids=ids, decoder_input_ids=ids[:, :5])
    assert recorder.ops == []
    assert mixtral_monitor.collect(step=0).tokens.tolist() == [12, 12]
    switch_snap = switch_monitor.collect(step=0)
    assert switch_snap.tokens.tolist() == [12, 12, 10, 10] and switch_snap.dropped.sum().item() > 0
