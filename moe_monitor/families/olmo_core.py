"""Family: OLMo-core (``olmo_core.nn.moe.router``), routers derived from ``MoERouter`` (``MoELinearRouter``).

Shape legend: ``B`` batch, ``S`` sequence, ``T = B * S`` tokens, ``E`` experts, ``K`` experts chosen per token.

The router returns ``(expert_weights_BSK, expert_indices_BSK, batch_size_per_expert_E, aux_loss)``: the chosen
experts after its ``score_bias`` (auxiliary-loss-free balancing). Its logits come from its method
``get_expert_logits`` (``F.linear`` on a flat weight, no submodule): the family wraps that method on the router
instance to keep its result (:class:`MethodStash`), so no second matrix product. Dropless.

Knobs: the router's ``lb_loss_weight`` (aux-loss weight, when set), ``jitter_eps`` (multiplicative input jitter, when
set) and ``score_bias`` buffer (when ``bias_gamma`` is set).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from moe_monitor.families.base import MethodStash, RouterLayer, find, is_instance_of, sigmoid_probs
from moe_monitor.knobs import KnobRef, LayerKnobs
from moe_monitor.routing import Routing

NAME = "olmo-core"
SEARCHED = "OLMo-core: olmo_core.nn.moe.router.MoERouter and subclasses (MoELinearRouter)"
_CLASSES = ("MoERouter",)
_LIBRARY = "olmo_core"


def knobs(model: nn.Module, layer_path: str) -> LayerKnobs:
    """The router's aux-loss weight, input jitter and score bias, those it has.

    Example:
        >>> router = nn.Linear(8, 4)  # the attributes of an OLMo-core MoERouter
        >>> router.lb_loss_weight, router.jitter_eps, router.score_bias = 0.01, 0.1, None
        >>> k = knobs(nn.Sequential(router), "0")
        >>> [ref.label for ref in k.aux_loss_coef], k.jitter.label, k.expert_bias
        (['0.lb_loss_weight'], '0.jitter_eps', None)
    """
    router = model.get_submodule(layer_path)
    return LayerKnobs(
        aux_loss_coef=(KnobRef(layer_path, "lb_loss_weight"),) if router.lb_loss_weight is not None else (),
        jitter=KnobRef(layer_path, "jitter_eps") if router.jitter_eps is not None else None,
        expert_bias=KnobRef(layer_path, "score_bias") if router.score_bias is not None else None,
    )


def _extract(stash: MethodStash):
    def extract(module: nn.Module, args: tuple, output: Any) -> Routing:
        logits = stash.take()
        probs_TE = None
        if logits is not None and str(module.gating_function) == "sigmoid":
            probs_TE = sigmoid_probs(logits.reshape(-1, logits.shape[-1]))
        return Routing.from_topk(output[1], logits_TE=logits, probs_TE=probs_TE)

    return extract


def describe(name: str, module: nn.Module, model: nn.Module) -> RouterLayer | None:
    """The layer of an OLMo-core router, else ``None``.

    Example:
        >>> describe("0", nn.Linear(8, 4), nn.Sequential(nn.Linear(8, 4))) is None  # not an OLMo-core MoERouter
        True
    """
    if not is_instance_of(module, _LIBRARY, _CLASSES):
        return None
    wraps = callable(getattr(type(module), "get_expert_logits", None))
    stash = MethodStash(module, "get_expert_logits") if wraps else None
    meta = {"knobs": knobs, "logits": "get_expert_logits result", "probs": str(module.gating_function)}
    extract = _extract(stash) if stash is not None else lambda m, a, out: Routing.from_topk(out[1])
    return RouterLayer(name, module, int(module.num_experts), int(module.top_k), extract, adapter=NAME, meta=meta)


def discover(model: nn.Module) -> list[RouterLayer]:
    """Every OLMo-core router in ``model``, in model order.

    Example:
        >>> discover(nn.Linear(2, 2))
        []
    """
    return find(model, _LIBRARY, describe)
