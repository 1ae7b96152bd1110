"""Router discovery: find the routers of a model and say how to read each one's output.

Shape legend: ``T`` tokens in one forward, ``E`` experts, ``k`` experts chosen per token, ``A`` assignments.

Discovery tries, in order, and keeps the first that finds anything:

1. routers named by hand (``RouterMonitor(model, routers=[...])``): module names, modules or :class:`RouterSpec`;
2. the reference model's ``moe_monitor.reference.router.Router`` (:mod:`moe_monitor.adapters.reference`);
3. Hugging Face transformers MoE models, through each model class's ``_can_record_outputs["router_logits"]``
   registry, and older gates that are a bare ``nn.Linear`` (:mod:`moe_monitor.adapters.hf`).

Every adapter produces an :data:`Extract` function ``fn(module, args, output) -> Routing`` that the hooks call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from moe_monitor.routing import Routing

Extract = Callable[[nn.Module, tuple, Any], Routing]
"""``fn(module, args, output) -> Routing``: reads one forward of a router from its forward hook."""

ROUTER_KINDS = ("token_choice", "expert_choice")

# What automatic discovery looks for, quoted in NoRoutersFoundError so a user knows why nothing matched.
SEARCHED = (
    "moe_monitor.reference.router.Router (the reference model)",
    "Hugging Face transformers MoE routers: the classes in a model's _can_record_outputs['router_logits'] "
    "(Mixtral, Qwen2-MoE, OLMoE, Switch Transformers, DeepSeek-V3 and every family following that contract)",
    "older Hugging Face gates: an nn.Linear named '...gate' or '...router' with config.num_experts outputs",
)


class NoRoutersFoundError(ValueError):
    """Raised when a model has no router the monitor can recognise; the message says how to register one."""


@dataclass
class RouterSpec:
    """Registers a router by hand.

    Args:
        name: module path, as in ``model.named_modules()``; give this or ``module``.
        module: the router module itself.
        num_experts: ``E``; read from the module (``num_experts``/``n_experts``/``out_features``) when ``None``.
        top_k: experts chosen per token; read from the module (``top_k``) when ``None``.
        extract: ``fn(module, args, output) -> Routing`` mapping the hooked output; when ``None`` the output (or its
            first element) must be the router logits ``[..., E]`` and the top-``k`` experts are recomputed from them.
        kind: ``"token_choice"`` or ``"expert_choice"``.
        dropless: whether the router never drops assignments for capacity; the counterfactual drop rate is only
            computed for dropless token-choice routers. With ``dropless=False`` and an extract function that gives
            no ``kept_A``, the dropped fraction is unknown: NaN, not 0.

    Example:
        >>> gate = nn.Linear(16, 4, bias=False)
        >>> spec = RouterSpec(module=gate, top_k=2)
        >>> spec.kind, spec.num_experts is None
        ('token_choice', True)
    """

    name: str | None = None
    module: nn.Module | None = None
    num_experts: int | None = None
    top_k: int | None = None
    extract: Extract | None = None
    kind: str = "token_choice"
    dropless: bool = True


@dataclass
class RouterLayer:
    """One monitored router, as listed in ``RouterMonitor.layers`` (model order).

    Attributes:
        name: module path, as in ``model.named_modules()``.
        module: the router module the hook sits on.
        num_experts: ``E``.
        top_k: experts chosen per token (for expert choice, the average experts per token the capacity allows).
        extract: the adapter's ``fn(module, args, output) -> Routing``.
        kind: ``"token_choice"`` or ``"expert_choice"``.
        dropless: ``True`` when the router never drops assignments for capacity.
        adapter: which adapter found it (``"manual"``, ``"reference"``, ``"hf"``, ``"hf-linear"``).
        live: for routers whose kind and capacity may change between steps (the reference router),
            ``fn(module) -> (kind, dropless)`` read at every forward instead of ``kind`` and ``dropless``.
    """

    name: str
    module: nn.Module
    num_experts: int
    top_k: int
    extract: Extract
    kind: str = "token_choice"
    dropless: bool = True
    adapter: str = "manual"
    meta: dict[str, Any] = field(default_factory=dict, repr=False)
    live: Callable[[nn.Module], tuple[str, bool]] | None = field(default=None, repr=False)


def logits_extract(top_k: int, probs: str = "softmax") -> Extract:
    """Builds an extraction function for a router whose output (or its first element) is the logits ``[..., E]``.

    The chosen experts are recomputed as the top-``k`` of the logits, so this fits gates that return logits only.

    Args:
        top_k: experts chosen per token.
        probs: ``"softmax"`` or ``"sigmoid"`` (see :func:`sigmoid_probs`).

    Example:
        >>> fn = logits_extract(top_k=1)
        >>> r = fn(None, (), torch.tensor([[0.0, 3.0], [2.0, 1.0]]))
        >>> r.expert_idx_A.tolist(), r.num_tokens
        ([1, 0], 2)
    """
    if probs not in ("softmax", "sigmoid"):
        raise ValueError(f"probs must be 'softmax' or 'sigmoid', got {probs!r}")

    def extract(module: nn.Module, args: tuple, output: Any) -> Routing:
        logits = output[0] if isinstance(output, (tuple, list)) else output
        logits_TE = logits.reshape(-1, logits.shape[-1])
        # Top-k of the logits equals top-k of softmax or sigmoid scores: both are monotonic per token.
        topk_idx_TK = logits_TE.topk(top_k, dim=-1).indices
        probs_TE = sigmoid_probs(logits_TE) if probs == "sigmoid" else None
        return Routing.from_topk(topk_idx_TK, logits_TE=logits_TE, probs_TE=probs_TE)

    return extract


def sigmoid_probs(logits_TE: torch.Tensor) -> torch.Tensor:
    """Router probabilities of a sigmoid-scored router (DeepSeek-V3 style), ``float32 [T, E]``.

    A sigmoid router scores each expert independently, so its scores do not form a distribution. The monitor uses
    the scores normalised per token, ``p_e = sigmoid(z_e) / sum_f sigmoid(z_f)`` — the normalised affinity that
    DeepSeek-V3 uses in its sequence-wise balance loss — for ``aux_loss``, ``router_entropy`` and
    ``top1_confidence``. ``z_loss`` stays defined on the raw logits.

    Example:
        >>> sigmoid_probs(torch.zeros(1, 4)).tolist()
        [[0.25, 0.25, 0.25, 0.25]]
    """
    scores_TE = logits_TE.float().sigmoid()
    return scores_TE / scores_TE.sum(dim=-1, keepdim=True)


def module_num_experts(module: nn.Module) -> int | None:
    """Reads ``E`` from the usual attribute names of a router module, or ``None``."""
    for attr in ("num_experts", "n_experts", "n_routed_experts", "num_local_experts", "out_features"):
        value = getattr(module, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def module_top_k(module: nn.Module) -> int | None:
    """Reads ``k`` from the usual attribute names of a router module, or ``None``."""
    for attr in ("top_k", "num_experts_per_tok", "k"):
        value = getattr(module, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def module_logit_width(module: nn.Module) -> int | None:
    """Expert scores a router module computes, read from the shape of its gate weight (``[E, D]``), or ``None``.

    Example:
        >>> module_logit_width(nn.Linear(16, 8)), module_logit_width(nn.ReLU())
        (8, None)
    """
    if isinstance(module, nn.Linear):
        return module.out_features
    # Switch Transformers' router keeps its gate as .classifier, the reference router as .gate.
    for attr in ("classifier", "gate"):
        gate = getattr(module, attr, None)
        if isinstance(gate, nn.Linear):
            return gate.out_features
    # transformers' TopKRouter classes hold the gate weight [E, D] themselves and apply F.linear.
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return weight.shape[0]
    return None


def _check_width(layer: RouterLayer) -> None:
    width = module_logit_width(layer.module)
    if width is not None and width != layer.num_experts:
        raise ValueError(
            f"Router {layer.name!r} ({type(layer.module).__name__}) computes {width} expert scores (the shape of its "
            f"gate weight), but it is registered with num_experts={layer.num_experts}; its statistics would mix up "
            f"experts. Register it with RouterSpec(name={layer.name!r}, num_experts={width}, top_k={layer.top_k})"
            ", or give an extract function if the router's output is not its logits"
        )


def _manual(model: nn.Module, routers: Iterable[str | nn.Module | RouterSpec]) -> list[RouterLayer]:
    from moe_monitor.adapters import hf, reference

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
            # A bare name or module of a known router type: let its adapter describe it.
            auto = reference.describe(name, module) or hf.describe(name, module, model)
            if auto is not None:
                _check_width(auto)
                found.append(auto)
                continue
        num_experts = spec.num_experts or module_num_experts(module)
        top_k = spec.top_k or module_top_k(module)
        if num_experts is None or top_k is None:
            raise ValueError(
                f"Cannot tell the number of experts / top_k of router {name!r} ({type(module).__name__}); "
                f"give them: RouterSpec(name={name!r}, num_experts=E, top_k=k)"
            )
        layer = RouterLayer(
            name, module, num_experts, top_k, spec.extract or logits_extract(top_k), spec.kind, spec.dropless, "manual"
        )
        if spec.extract is None:
            # The logits come straight from the module: their width is known now. A custom extract function may map
            # them (or read something else), so its layers are checked at their first forward instead.
            _check_width(layer)
        found.append(layer)
    # .layers is in model order whatever the order of routers=, so layer indices match the model's blocks.
    return sorted(found, key=lambda layer: position[id(layer.module)])


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
    from moe_monitor.adapters import hf, reference

    if routers is not None:
        if isinstance(routers, (str, nn.Module, RouterSpec)):
            routers = [routers]
        routers = list(routers)
        if not routers:
            raise NoRoutersFoundError(
                "routers= is an empty list, so there is nothing to monitor: pass routers=None to find the routers "
                "automatically, or name at least one, e.g. routers=['layers.0.mlp.gate']"
            )
        found = _manual(model, routers)
    else:
        found = reference.discover(model) or hf.discover(model)
        for layer in found:
            _check_width(layer)
    if not found:
        searched = "\n".join(f"  - {s}" for s in SEARCHED)
        raise NoRoutersFoundError(
            f"No MoE router found in {type(model).__name__}. Searched for:\n{searched}\n"
            "Register routers by hand, by module name or with an extraction function:\n"
            "  RouterMonitor(model, routers=['layers.0.mlp.gate'])  # output = logits [..., E], top_k on the module\n"
            "  RouterMonitor(model, routers=[RouterSpec(name='layers.0.mlp.gate', num_experts=8, top_k=2,\n"
            "      extract=lambda module, args, output: Routing.from_topk(output[1], logits_TE=output[0]))])\n"
            "With the Lightning callback pass the same list as MoEMonitor(routers=[...]); names are then relative to "
            "the LightningModule, e.g. 'model.blocks.0.moe.router' when the network is its attribute 'model'."
        )
    return found
