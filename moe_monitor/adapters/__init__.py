"""Former home of router discovery, kept so that ``from moe_monitor.adapters import RouterSpec`` keeps working.

Everything now lives in :mod:`moe_monitor.families` (one module per model family); this module re-exports its
public names.

Example:
    >>> from moe_monitor.adapters import RouterSpec
    >>> RouterSpec(name="layers.0.mlp.gate", top_k=2).top_k
    2
"""

from moe_monitor.families import (
    Extract,
    NoRoutersFoundError,
    RouterLayer,
    RouterOutputError,
    RouterSpec,
    discover,
    logits_extract,
    module_logit_width,
    module_num_experts,
    module_top_k,
    output_extract,
    read_output,
    sigmoid_probs,
)

__all__ = [
    "Extract",
    "NoRoutersFoundError",
    "RouterLayer",
    "RouterOutputError",
    "RouterSpec",
    "discover",
    "logits_extract",
    "module_logit_width",
    "module_num_experts",
    "module_top_k",
    "output_extract",
    "read_output",
    "sigmoid_probs",
]
