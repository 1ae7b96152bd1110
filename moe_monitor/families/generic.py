"""Generic fallback for a home-made MoE, used only when no family recognises anything in the model.

Shape legend: ``E`` experts, ``k`` experts chosen per token.

A module is taken for a router when its name (or class name) says router or gate, it computes ``E`` scores (an
``nn.Linear`` of ``E`` outputs: itself, or its child), the block holding it has ``E`` experts (an ``nn.ModuleList``
or ``nn.ModuleDict`` of ``E`` modules) and ``k`` is an attribute of the router or of that block (``top_k``,
``num_experts_per_tok``, ``k``). Its output is read by :func:`~moe_monitor.families.base.read_output`: the integer
``[..., k]`` tensor is the chosen experts, the float ``[..., E]`` tensor the logits (``torch.topk`` output works).

What was assumed is said in one warning at setup and kept in ``RouterLayer.meta["assumed"]``. A guess the first
forward contradicts (no such tensors in the output) raises in the hook, so the monitor warns, naming the module and
what to register, and counts nothing for it: never silently wrong numbers.
"""

from __future__ import annotations

import warnings

from torch import nn

from moe_monitor.families.base import RouterLayer, module_top_k, output_extract, positive_int

NAME = "generic"
SEARCHED = (
    "a home-made MoE (generic fallback): a module named '...router' or '...gate' computing E scores (an nn.Linear "
    "of E outputs), in a block with E experts (an nn.ModuleList) and top_k on the router or the block, whose forward "
    "returns float scores [..., E] and/or integer chosen experts [..., k] (or torch.topk output)"
)
_WORDS = ("router", "gate", "gating")


def _looks_like_router(name: str, module: nn.Module) -> bool:
    leaf = name.rpartition(".")[2].lower()
    cls = type(module).__name__.lower()
    return any(word in leaf or word in cls for word in _WORDS)


def _width(module: nn.Module) -> tuple[int, str] | None:
    if isinstance(module, nn.Linear):
        return module.out_features, "its out_features"
    linears = [(n, m) for n, m in module.named_children() if isinstance(m, nn.Linear)]
    if len(linears) == 1:
        return linears[0][1].out_features, f"the out_features of its Linear {linears[0][0]!r}"
    return None


def _experts(block: nn.Module, num_experts: int) -> str | None:
    for child_name, child in block.named_children():
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)) and len(child) == num_experts:
            return child_name
    return None


def guess(model: nn.Module, name: str, module: nn.Module) -> RouterLayer | None:
    """The generic layer of ``module`` if it looks like a router (see the module docstring), else ``None``.

    Example:
        >>> class Block(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.router, self.top_k = nn.Linear(8, 4), 2
        ...         self.experts = nn.ModuleList(nn.ReLU() for _ in range(4))
        >>> layer = guess(Block(), "router", Block().router)
        >>> layer.num_experts, layer.top_k, layer.meta["assumed"]["top_k"]
        (4, 2, "attribute top_k of '' (Block)")
    """
    if not name or not _looks_like_router(name, module):
        return None
    width = _width(module)
    if width is None:
        return None
    num_experts, width_source = width
    block_name = name.rpartition(".")[0]
    block = model.get_submodule(block_name)
    experts = _experts(block, num_experts)
    if experts is None or num_experts < 2:
        return None
    for owner_name, owner in ((name, module), (block_name, block)):
        top_k = module_top_k(owner)
        if top_k is not None:
            attr = next(a for a in ("top_k", "num_experts_per_tok", "k") if positive_int(owner, a) == top_k)
            k_source = f"attribute {attr} of {owner_name!r} ({type(owner).__name__})"
            break
    else:
        return None
    assumed = {
        "num_experts": f"{num_experts}, {width_source}, matching {block_name}.{experts} of {num_experts} modules",
        "top_k": k_source,
        "output": f"integer [..., {top_k}] = chosen experts, float [..., {num_experts}] = logits (softmax)",
    }
    meta = {"assumed": assumed, "logits": "router output (assumed)", "probs": "softmax"}
    extract = output_extract(top_k, num_experts=num_experts)
    return RouterLayer(name, module, num_experts, top_k, extract, adapter=NAME, meta=meta)


def discover(model: nn.Module) -> list[RouterLayer]:
    """Every module of ``model`` that looks like a home-made router, in model order, with one warning saying so.

    Example:
        >>> discover(nn.Sequential(nn.Linear(2, 2)))
        []
    """
    found: list[RouterLayer] = []
    for name, module in model.named_modules():
        if any(name.startswith(layer.name + ".") for layer in found):
            continue  # the gate Linear inside a router already taken
        layer = guess(model, name, module)
        if layer is not None:
            found.append(layer)
    if found:
        lines = "\n".join(
            f"  - {layer.name!r} ({type(layer.module).__name__}): E={layer.num_experts} from "
            f"{layer.meta['assumed']['num_experts'].split(', ', 1)[1]}; top_k={layer.top_k} from "
            f"{layer.meta['assumed']['top_k']}"
            for layer in found[:8]
        )
        more = f"\n  ... and {len(found) - 8} more" if len(found) > 8 else ""
        first = found[0]
        warnings.warn(
            f"moe_monitor: no known MoE family in {type(model).__name__}; guessed {len(found)} router(s):\n"
            f"{lines}{more}\n"
            f"Their outputs are read as integer [..., k] chosen experts and float [..., E] logits; a forward whose "
            "output has neither stops that router's monitoring with a warning. If a guess is wrong, register the "
            f"routers by hand: RouterMonitor(model, routers=[RouterSpec(name={first.name!r}, "
            f"num_experts={first.num_experts}, top_k={first.top_k}, extract=fn)]), "
            "fn(module, args, output) -> moe_monitor.routing.Routing",
            RuntimeWarning,
            stacklevel=4,
        )
    return found


def describe(name: str, module: nn.Module, model: nn.Module) -> RouterLayer | None:
    """The generic fallback describes nothing by itself in manual registration (a bare name is read as-is).

    Example:
        >>> describe("router", nn.Linear(8, 4), nn.Sequential(nn.Linear(8, 4))) is None
        True
    """
    return None
