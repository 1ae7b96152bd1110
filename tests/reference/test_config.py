"""Config validation: every bad value raises a ValueError that names the field and what is allowed."""

from __future__ import annotations

import pytest

from moe_monitor.reference import PRESETS, MoEConfig


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"top_k": 9, "n_experts": 8}, r"top_k=9 is larger than n_experts=8"),
        ({"top_k": 0}, r"top_k=0 must be at least 1"),
        ({"n_experts": 0, "top_k": 1}, r"n_experts=0 must be at least 1"),
        ({"capacity_factor": 0.0}, r"capacity_factor=0.0 must be positive, or None"),
        ({"capacity_factor": -1.0}, r"capacity_factor=-1.0"),
        ({"d_model": 130, "n_heads": 4}, r"d_model=130 must be a positive multiple of n_heads=4"),
        ({"router": "hash"}, r"router='hash' is not supported; choose one of token_choice, expert_choice"),
        ({"router_noise": "uniform"}, r"router_noise='uniform' is not supported; choose one of none, jitter, gaussian"),
        ({"dense_every": -1}, r"dense_every=-1"),
        ({"aux_loss_coef": -0.1}, r"aux_loss_coef=-0.1 must be non-negative"),
        ({"seq_len": 0}, r"seq_len=0 must be at least 1"),
        ({"dropout": 1.0}, r"dropout=1.0 must be in \[0, 1\)"),
        ({"router": "expert_choice", "expert_bias": True}, r"expert_bias=True has no effect with router='expert_ch"),
    ],
)
def test_bad_config_raises_naming_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        MoEConfig(**overrides)


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ValueError, match="preset='huge' is unknown; choose one of tiny, small, base"):
        MoEConfig.from_preset("huge")


def test_presets_are_kwargs_and_config_round_trips():
    assert set(PRESETS) == {"tiny", "small", "base"}
    config = MoEConfig.from_preset("small", router="expert_choice", capacity_factor=1.5)
    assert MoEConfig(**config.to_dict()) == config
