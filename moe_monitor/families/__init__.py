"""Model families: one module per family of MoE models, each knowing how to find, read and steer its routers.

Shape legend: ``T`` tokens in one forward, ``E`` experts, ``k`` experts chosen per token, ``A`` assignments.

A family module has:

- ``NAME``: the label in ``RouterLayer.adapter``; ``SEARCHED``: what it looks for, quoted in
  :class:`NoRoutersFoundError`;
- ``describe(name, module, model) -> RouterLayer | None``: the layer of one module it recognises (used for manual
  registration by bare name, too);
- ``discover(model) -> list[RouterLayer]``: every router of that family in ``model``, in model order.

Each layer's ``extract`` reads one forward into a :class:`~moe_monitor.routing.Routing` and ``meta["knobs"]`` says
where its balancing knobs are (:func:`moe_monitor.knobs.layer_knobs`). Adding a family is one file and one entry in
:data:`FAMILIES`. Discovery asks every family and keeps what they find (a module found twice is hooked once, by the
first family); only when none finds anything does the :mod:`~moe_monitor.families.generic` fallback guess.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from types import ModuleType

from torch import nn

from moe_monitor.families.base import (
    Extract,
    NoRoutersFoundError,
    RouterLayer,
    RouterOutputError,
    RouterSpec,
    check_width,
    expect_forward,
    logits_extract,
    module_logit_width,
    module_num_experts,
    module_top_k,
    output_extract,
    read_output,
    sigmoid_probs,
)
from moe_monitor.routing import Routing

__all__ = [
    "FAMILIES",
    "Extract",
    "NoRoutersFoundError",
    "RouterLayer",
    "RouterOutputError",
    "RouterSpec",
    "Routing",
    "discover",
    "families",
    "logits_extract",
    "module_logit_width",
    "module_num_experts",
    "module_top_k",
    "output_extract",
    "read_output",
    "sigmoid_probs",
]

FAMILIES: tuple[str, ...] = (
    "reference",
    "hf",
    "torchtitan",
    "deepspeed",
    "olmo_core",
    "megatron",
    "st_moe",
    "lucidrains",
)
"""The registered families, as module names under ``moe_monitor.families`` (the generic fallback is apart)."""


def families() -> list[ModuleType]:
    """The family modules of :data:`FAMILIES`, imported (none of them imports its library).

    Example:
        >>> [family.NAME for family in families()][:2]
        ['reference', 'hf']
    """
    return [importlib.import_module(f"moe_monitor.families.{name}") for name in FAMILIES]


def describe(name: str, module: nn.Module, model: nn.Module) -> RouterLayer | None:
    """The layer of ``module`` as the first family that recognises it describes it, else ``None``.

    Example:
        >>> describe("0", nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2))) is None
        True
    """
    for family in families():
        layer = family.describe(name, module, model)
        if layer is not None:
            return layer
    return None


def _advice(model: nn.Module):
    def advice(parent_name: str, parent: nn.Module) -> str:
        known = describe(parent_name, parent, model)
        if known is not None:
            return (
                f"{parent_name!r} is a {known.adapter} router that RouterMonitor(model) finds by itself: leave "
                f"routers= out, or register routers=[{parent_name!r}]"
            )
        return (
            f"Register the module that computes the routing instead, with an extraction function: "
            f"RouterSpec(name={parent_name!r}, num_experts=E, top_k=k, extract=fn), "
            "fn(module, args, output) -> moe_monitor.routing.Routing"
        )

    return advice


def _searched() -> str:
    from moe_monitor.families import generic

    lines = [family.SEARCHED for family in families()] + [generic.SEARCHED]
    return "\n".join(f"  - {line}" for line in lines)


def discover(model: nn.Module, routers: Sequence[str | nn.Module | RouterSpec] | None = None) -> list[RouterLayer]:
    """Finds the routers of ``model`` in model order.

    Args:
        model: any ``nn.Module``.
        routers: optional manual registration (module names, modules and/or :class:`RouterSpec`); when given,
            only these are monitored.

    Raises:
        NoRoutersFoundError: nothing was found; the message lists what was searched and how to register by hand.
        ValueError: a manual registration is inconsistent (unknown name, missing expert count), or a router's gate
            weight has another number of rows than its expert count (checked wherever the module's own output is
            read as the logits).

    Example:
        >>> model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
        >>> [layer.name for layer in discover(model, routers=[RouterSpec(name="1", top_k=2)])]
        ['1']
    """
    from moe_monitor.families import generic, manual

    if routers is not None:
        if isinstance(routers, (str, nn.Module, RouterSpec)):
            routers = [routers]
        routers = list(routers)
        if not routers:
            raise NoRoutersFoundError(
                "routers= is an empty list, so there is nothing to monitor: pass routers=None to find the routers "
                "automatically, or name at least one, e.g. routers=['layers.0.mlp.gate']"
            )
        found = manual.layers(model, routers, describe)
    else:
        found = []
        for family in families():
            hooked = {id(layer.module) for layer in found}
            found += [layer for layer in family.discover(model) if id(layer.module) not in hooked]
        if not found:
            found = generic.discover(model)
        position = {id(m): i for i, m in enumerate(model.modules())}
        found.sort(key=lambda layer: position[id(layer.module)])
    for layer in found:
        if layer.adapter in ("reference", "hf", "hf-linear"):
            check_width(layer)
        expect_forward(model, layer, _advice(model))
    if not found:
        raise NoRoutersFoundError(
            f"No MoE router found in {type(model).__name__}. Searched for:\n{_searched()}\n"
            "Register routers by hand, by module name or with an extraction function:\n"
            "  RouterMonitor(model, routers=['layers.0.mlp.gate'])  # output: float scores [..., E] and/or integer "
            "chosen experts [..., k]; E and top_k read from the module\n"
            "  RouterMonitor(model, routers=[RouterSpec(name='layers.0.mlp.router', num_experts=8, top_k=2,\n"
            "      extract=lambda module, args, output: Routing.from_topk(output[1], logits_TE=output[0]))])\n"
            "  # output[1]: the chosen experts [..., k] (any leading dims, e.g. [B, S, k] or [T, k]); output[0]: the "
            "logits [..., E], or leave logits_TE out if the router returns none\n"
            "With the Lightning callback pass the same list as MoEMonitor(routers=[...]); names are then relative to "
            "the LightningModule, e.g. 'model.blocks.0.moe.router' when the network is its attribute 'model'."
        )
    return found
