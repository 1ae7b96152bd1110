"""Sizes and helpers shared by the detector, controller and scenario tests."""

from __future__ import annotations

from typing import Any

# Small enough that a 150-step scenario trains in about a second on one CPU core.
MICRO = dict(d_model=32, n_layers=2, n_heads=2, seq_len=32, d_expert=64)


def expected_bias(step_counts: list[list[float]], rate: float) -> list[float]:
    """The expert-bias update rule written as a plain loop: sign step toward the mean count, then mean-centred."""
    bias = [0.0] * len(step_counts[0])
    for counts in step_counts:
        mean = sum(counts) / len(counts)
        bias = [b + rate * ((mean > c) - (mean < c)) for b, c in zip(bias, counts)]
        centre = sum(bias) / len(bias)
        bias = [b - centre for b in bias]
    return bias


def tiny_mixtral(**overrides: Any) -> Any:
    """A two-layer Mixtral causal LM (4 experts, top-2) from a tiny config, returning router logits."""
    import transformers

    options = dict(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_local_experts=4,
        num_experts_per_tok=2,
        output_router_logits=True,
    )
    return transformers.MixtralForCausalLM(transformers.MixtralConfig(**{**options, **overrides}))
