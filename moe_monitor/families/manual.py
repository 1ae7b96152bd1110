"""Routers registered by hand: ``RouterMonitor(model, routers=[...])`` with module names, modules or RouterSpec.

Shape legend: ``E`` experts, ``k`` experts chosen per token.

A bare name or module of a router that a family recognises is described by that family; anything else becomes a
layer whose output is read by :func:`moe_monitor.families.base.read_output` unless the spec gives ``extract``.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from moe_monitor.families.base import (
    ROUTER_KINDS,
    RouterLayer,
    RouterSpec,
    check_width,
    module_num_experts,
    module_top_k,
    output_extract,
)

NAME = "manual"


def layers(model: nn.Module, routers: Iterable[str | nn.Module | RouterSpec], describe_known) -> list[RouterLayer]:
    """The layers of a manual registration, in model order.

    Args:
        model: the model.
        routers: module names, modules and/or :class:`RouterSpec`.
        describe_known (Callable[[str, nn.Module, nn.Module], RouterLayer | None]): ``fn(name, module, model)``,
            the registry's lookup of the families that recognise a module (used for bare names and modules).

    Example:
        >>> model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
        >>> [(l.name, l.num_experts, l.top_k) for l in layers(model, [RouterSpec(name="1", top_k=2)], lambda *a: None)]
        [('1', 4, 2)]
    """
    names = {id(m): n for n, m in model.named_modules()}
    modules = dict(model.named_modules())
    position = {id(m): i for i, m in enumerate(modules.values())}
    found: list[RouterLayer] = []
    for item in routers:
        spec = (
            item
            if isinstance(item, RouterSpec)
            else RouterSpec(**{"name" if isinstance(item, str) else "module": item})
        )
        if spec.kind not in ROUTER_KINDS:
            raise ValueError(f"RouterSpec.kind must be one of {ROUTER_KINDS}, got {spec.kind!r}")
        module = spec.module
        if module is None:
            if spec.name is None:
                raise ValueError("RouterSpec needs a module name (name=...) or the module itself (module=...)")
            if spec.name not in modules:
                close = [n for n in modules if spec.name.split(".")[-1] in n][:5]
                raise ValueError(f"No module named {spec.name!r} in the model; modules with a similar name: {close}")
            module = modules[spec.name]
        name = spec.name or names.get(id(module))
        if name is None:
            raise ValueError(f"Module {type(module).__name__} given in routers= is not a submodule of the model")
        if any(layer.module is module for layer in found):
            # Two hooks on one module would count every forward twice.
            raise ValueError(f"Router {name!r} is given twice in routers=; list each router once")
        if spec.extract is None and spec.num_experts is None and spec.top_k is None:
            # A bare name or module of a known router type: let its family describe it.
            auto = describe_known(name, module, model)
            if auto is not None:
                found.append(auto)
                continue
        num_experts = spec.num_experts or module_num_experts(module)
        top_k = spec.top_k or module_top_k(module)
        if num_experts is None or top_k is None:
            missing = [
                (what, placeholder)
                for what, value, placeholder in (("num_experts", num_experts, "E"), ("top_k", top_k, "k"))
                if value is None
            ]
            what = " and ".join(w for w, _ in missing)
            given = ", ".join(f"{w}={p}" for w, p in missing)
            raise ValueError(
                f"Cannot tell the {what} of router {name!r} ({type(module).__name__}): no attribute of the module "
                f"names it; give it: RouterSpec(name={name!r}, {given})"
            )
        layer = RouterLayer(
            name,
            module,
            num_experts,
            top_k,
            spec.extract or output_extract(top_k, num_experts=num_experts),
            spec.kind,
            spec.dropless,
            NAME,
        )
        if spec.extract is None:
            # The scores come straight from the module: their width is known now. A custom extract function may map
            # them (or read something else), so its layers are checked at their first forward instead.
            check_width(layer)
        found.append(layer)
    # .layers is in model order whatever the order of routers=, so layer indices match the model's blocks.
    return sorted(found, key=lambda layer: position[id(layer.module)])
