"""moe_monitor: watch, alert on and repair expert collapse in Mixture-of-Experts routers while they train.

The public names are imported lazily so that ``import moe_monitor`` stays cheap and does not pull in Lightning
for users of the framework-agnostic :class:`RouterMonitor` alone.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "RouterMonitor": "moe_monitor.monitor",
    "NoRoutersFoundError": "moe_monitor.monitor",
    "RouterSpec": "moe_monitor.adapters",
    "Routing": "moe_monitor.routing",
    "MoEMonitor": "moe_monitor.callback",
    "Watcher": "moe_monitor.watcher",
    "audit": "moe_monitor.audit",
    "CollapseDetector": "moe_monitor.detect",
    "CollapseEvent": "moe_monitor.detect",
    "AuxLossController": "moe_monitor.controllers",
    "RouterNoiseController": "moe_monitor.controllers",
    "ExpertBiasController": "moe_monitor.controllers",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'moe_monitor' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
