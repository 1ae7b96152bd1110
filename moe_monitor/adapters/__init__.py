"""Former home of router discovery, kept so that ``from moe_monitor.adapters import RouterSpec`` keeps working.

Everything now lives in :mod:`moe_monitor.families` (one module per model family); this module re-exports its
public names (its ``__all__``), so the two can never list different ones.

Example:
    >>> from moe_monitor.adapters import RouterSpec
    >>> RouterSpec(name="layers.0.mlp.gate", top_k=2).top_k
    2
"""

from moe_monitor.families import *  # noqa: F403  (the shim's purpose: exactly the names of moe_monitor.families)
