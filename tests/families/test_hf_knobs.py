"""The Hugging Face family's knobs: the model-wide aux-loss weight, Mixtral's jitter, DeepSeek-V3's score bias."""

from __future__ import annotations

import pytest
import torch

from moe_monitor import RouterMonitor
from moe_monitor.knobs import layer_knobs

transformers = pytest.importorskip("transformers")

COMMON = dict(
    vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=1,
)  # fmt: skip


def test_mixtral_knobs_are_the_causal_lm_aux_coefficient_and_the_blocks_jitter():
    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        **COMMON, num_local_experts=4, num_experts_per_tok=2, router_jitter_noise=0.1, router_aux_loss_coef=0.03
    )
    model = transformers.MixtralForCausalLM(config)
    monitor = RouterMonitor(model)
    knobs = layer_knobs(model, monitor.layers[1])
    assert [ref.label for ref in knobs.aux_loss_coef] == ["router_aux_loss_coef", "config.router_aux_loss_coef"]
    assert [ref.get(model) for ref in knobs.aux_loss_coef] == [0.03, 0.03]
    assert knobs.jitter.label == "model.layers.1.mlp.jitter_noise" and knobs.jitter.get(model) == 0.1
    assert "output_router_logits" in knobs.inert  # the aux loss is only added when the model outputs router logits


def test_deepseek_v3_knob_is_its_score_correction_bias():
    torch.manual_seed(0)
    config = transformers.DeepseekV3Config(
        **COMMON, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1, moe_intermediate_size=16,
        first_k_dense_replace=0, kv_lora_rank=8, q_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8,
    )  # fmt: skip
    model = transformers.DeepseekV3ForCausalLM(config)
    monitor = RouterMonitor(model)
    knobs = layer_knobs(model, monitor.layers[0])
    assert knobs.expert_bias.get(model) is model.model.layers[0].mlp.gate.e_score_correction_bias
