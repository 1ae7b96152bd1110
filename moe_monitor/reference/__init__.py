"""Reference Mixture-of-Experts transformer, bundled byte-level corpus and Lightning module.

``MoEConfig``, ``MoETransformer`` and the router types import only torch; ``ReferenceLM`` and
``CorpusDataModule`` pull in Lightning and are imported on first use.

Example:
    >>> from moe_monitor.reference import MoEConfig, MoETransformer
    >>> model = MoETransformer(MoEConfig.from_preset("tiny"))
    >>> [name for name, _ in model.named_modules() if name.endswith("router")]
    ['blocks.0.moe.router', 'blocks.1.moe.router', 'blocks.2.moe.router', 'blocks.3.moe.router']
"""

from __future__ import annotations

import importlib
from typing import Any

from moe_monitor.reference.config import PRESETS, MoEConfig
from moe_monitor.reference.model import MoEOutput, MoETransformer
from moe_monitor.reference.router import Router, RouterOutput

_LAZY = {
    "ReferenceLM": "moe_monitor.reference.lightning_module",
    "CorpusDataModule": "moe_monitor.reference.data",
}

__all__ = [
    "PRESETS",
    "CorpusDataModule",
    "MoEConfig",
    "MoEOutput",
    "MoETransformer",
    "ReferenceLM",
    "Router",
    "RouterOutput",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moe_monitor.reference' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))
