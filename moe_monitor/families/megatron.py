"""Family: Megatron-Core (``megatron.core.transformer.moe.router.TopKRouter``, inside ``MoELayer``).

Shape legend: ``T`` tokens (sequence x batch, flattened), ``E`` experts, ``K`` = ``moe_router_topk``.

The router returns ``(probs_TE, routing_map_TE)``: the combine weights and the boolean token-to-expert map *after*
token dropping (``moe_expert_capacity_factor``). Its logits are the result of its method ``gating`` (kept by a
wrapper on the instance, :class:`~moe_monitor.families.base.MethodStash`: no second matrix product).

- Dropless (no capacity factor, Megatron's usual setting): the map holds exactly the ``K`` chosen experts of every
  token (after expert bias, group-limited routing and router replay, as Megatron chose them).
- With a capacity factor: the chosen experts are the top-``K`` of the scores (``moe_router_score_function`` of the
  logits, plus ``expert_bias``) and those missing from the map were dropped. Group-limited routing
  (``moe_router_num_groups``) together with a capacity factor is refused at setup: the choice before dropping cannot
  be recovered then.

Megatron's forward needs CUDA (``gating`` moves a CPU weight to the current CUDA device).

Knobs: ``config.moe_aux_loss_coeff`` (a float; shared by every layer of one config) and the ``expert_bias`` buffer
(``moe_router_enable_expert_bias``).

Names: under pipeline parallelism every stage numbers its own layers from 0 (``decoder.layers.0`` on each stage), but
each ``TransformerLayer`` carries its global ``layer_number`` (1-based, offset by the stage) and hands it to its
router. A router is named by it, ``decoder.layers.<layer_number - 1>.mlp.router``: the name it has in the whole model,
unique across stages; its module path on the stage stays in ``RouterLayer.path`` (where its knobs are looked up).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moe_monitor.families.base import MethodStash, RouterLayer, find, is_instance_of, sigmoid_probs
from moe_monitor.knobs import KnobRef, LayerKnobs
from moe_monitor.routing import Routing

NAME = "megatron"
SEARCHED = "Megatron-Core: megatron.core.transformer.moe.router.TopKRouter (inside MoELayer)"
_CLASSES = ("TopKRouter",)
_LIBRARY = "megatron.core"


def knobs(model: nn.Module, layer_path: str) -> LayerKnobs:
    """The aux-loss coefficient (when a single float) and the expert bias (when enabled).

    Example:
        >>> import types
        >>> router = nn.Module()
        >>> router.config, router.expert_bias = types.SimpleNamespace(moe_aux_loss_coeff=0.01), None
        >>> k = knobs(nn.Sequential(router), "0")
        >>> [ref.label for ref in k.aux_loss_coef], k.expert_bias
        (['0.config.moe_aux_loss_coeff'], None)
    """
    router = model.get_submodule(layer_path)
    coeff = getattr(router.config, "moe_aux_loss_coeff", None)
    has_coeff = isinstance(coeff, (int, float)) and not isinstance(coeff, bool)
    return LayerKnobs(
        aux_loss_coef=(KnobRef(layer_path, "config.moe_aux_loss_coeff"),) if has_coeff else (),
        expert_bias=KnobRef(layer_path, "expert_bias") if getattr(router, "expert_bias", None) is not None else None,
    )


def _scores(module: nn.Module, logits_TE: torch.Tensor) -> torch.Tensor:
    if module.score_function == "sigmoid":
        return logits_TE.float().sigmoid()
    return logits_TE.float().softmax(dim=-1)


def _extract(stash: MethodStash):
    def extract(module: nn.Module, args: tuple, output: Any) -> Routing:
        routing_map_TE = output[1].detach()
        logits = stash.take()
        logits_TE = None if logits is None else logits.reshape(-1, logits.shape[-1])
        probs_TE = None
        if logits_TE is not None and module.score_function == "sigmoid":
            probs_TE = sigmoid_probs(logits_TE)
        k = int(module.topk)
        if module.config.moe_expert_capacity_factor is None or logits_TE is None:
            chosen_TK = routing_map_TE.to(torch.int8).topk(k, dim=-1).indices
            return Routing.from_topk(chosen_TK, logits_TE=logits_TE, probs_TE=probs_TE)
        scores_TE = _scores(module, logits_TE)
        if module.expert_bias is not None:
            scores_TE = scores_TE + module.expert_bias
        chosen_TK = scores_TE.topk(k, dim=-1).indices
        kept_TK = routing_map_TE.gather(-1, chosen_TK)
        return Routing.from_topk(chosen_TK, logits_TE=logits_TE, probs_TE=probs_TE, kept_TK=kept_TK)

    return extract


def describe(name: str, module: nn.Module, model: nn.Module) -> RouterLayer | None:
    """The layer of a Megatron-Core ``TopKRouter``, else ``None``.

    Raises:
        ValueError: group-limited routing with a capacity factor (see the module docstring).

    Example:
        >>> describe("0", nn.Linear(8, 4), nn.Sequential(nn.Linear(8, 4))) is None  # not a Megatron-Core TopKRouter
        True
    """
    if not is_instance_of(module, _LIBRARY, _CLASSES):
        return None
    config = module.config
    dropless = config.moe_expert_capacity_factor is None
    if not dropless and getattr(config, "moe_router_num_groups", None):
        raise ValueError(
            f"Megatron router {name!r} combines group-limited routing (moe_router_num_groups="
            f"{config.moe_router_num_groups}) with token dropping (moe_expert_capacity_factor="
            f"{config.moe_expert_capacity_factor}): its choice before dropping is not in its output. Register it with "
            f"RouterSpec(name={name!r}, num_experts={module.num_experts}, top_k={module.topk}, dropless=False, "
            "extract=fn) reading the routing_map, or leave one of the two settings out"
        )
    stash = MethodStash(module, "gating")
    meta = {"knobs": knobs, "logits": "gating() result", "probs": module.score_function}
    return RouterLayer(
        global_name(name, module, model),
        module,
        int(module.num_experts),
        int(module.topk),
        _extract(stash),
        "token_choice",
        dropless,
        NAME,
        meta,
        path=name,
    )


def global_name(name: str, router: nn.Module, model: nn.Module) -> str:
    """``name`` with the index of its ``TransformerLayer`` (``...layers.<i>...``) replaced by the layer's global index.

    Megatron-Core's ``TransformerLayer`` sets ``layer_number`` (1-based, plus its pipeline stage's offset) and passes it
    to its router (``set_layer_number``). Only the nearest ``layers.<i>`` ancestor that is that ``TransformerLayer`` is
    renamed: a router outside one (e.g. in a multi-token-prediction layer) keeps its path.

    Example:
        >>> router = nn.Module()
        >>> router.layer_number = 5
        >>> global_name("decoder.layers.0.mlp.router", router, nn.Module())  # no TransformerLayer there: unchanged
        'decoder.layers.0.mlp.router'
    """
    number = getattr(router, "layer_number", None)
    if not isinstance(number, int) or isinstance(number, bool) or number < 1:
        return name
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        if parts[i - 1] != "layers" or not parts[i].isdigit():
            continue
        try:
            holder = model.get_submodule(".".join(parts[: i + 1]))
        except AttributeError:
            return name
        if is_instance_of(holder, _LIBRARY, ("TransformerLayer",)) and getattr(holder, "layer_number", None) == number:
            parts[i] = str(number - 1)
            return ".".join(parts)
        return name
    return name


def discover(model: nn.Module) -> list[RouterLayer]:
    """Every Megatron-Core router in ``model``, in model order.

    Example:
        >>> discover(nn.Linear(2, 2))
        []
    """
    return find(model, _LIBRARY, describe)
