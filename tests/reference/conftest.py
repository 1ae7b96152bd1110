"""Shared fixtures of the reference-model tests: small configs that run in milliseconds."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from moe_monitor.reference import MoEConfig


@pytest.fixture
def make_config() -> Callable[..., MoEConfig]:
    """Factory of a 2-layer, 16-wide model with 4 experts (top-2); keyword arguments override fields."""

    def make(**overrides: Any) -> MoEConfig:
        fields: dict[str, Any] = dict(d_model=16, n_layers=2, n_heads=2, seq_len=16, n_experts=4, top_k=2, d_expert=8)
        return MoEConfig(**{**fields, **overrides})

    return make
