"""Family: torchtitan (``torchtitan.models.common.moe``), router ``TokenChoiceTopKRouter`` inside ``MoE``.

Shape legend: ``B`` batch, ``L`` sequence, ``T = B * L`` tokens, ``E`` experts, ``K`` experts chosen per token.

The router returns ``(topk_scores_BLK, topk_expert_ids_BLK, scores_BLE)``: the chosen experts *after* the expert
bias the ``MoE`` passes in (auxiliary-loss-free balancing), and the sigmoid or softmax scores. The logits are its
``gate`` Linear's output, kept by a forward hook on the gate (:class:`~moe_monitor.families.base.GateStash`): no
second matrix product. Dropless (no capacity).

Knobs: the ``MoE``'s ``expert_bias_E`` buffer (when ``load_balance_coeff`` is set). torchtitan has no aux-loss weight
on the module.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from moe_monitor.families.base import GateStash, RouterLayer, find, is_instance_of, sigmoid_probs
from moe_monitor.knobs import KnobRef, LayerKnobs
from moe_monitor.routing import Routing

NAME = "torchtitan"
SEARCHED = "torchtitan: torchtitan.models.common.moe.TokenChoiceTopKRouter (inside torchtitan's MoE)"
_CLASSES = ("TokenChoiceTopKRouter",)
_LIBRARY = "torchtitan"


def knobs(model: nn.Module, layer_path: str) -> LayerKnobs:
    """The expert bias of the ``MoE`` holding the router, when it has one.

    Example:
        >>> import torch
        >>> moe = nn.Module()
        >>> moe.router, moe.expert_bias_E = nn.Linear(8, 4), torch.zeros(4)
        >>> knobs(nn.Sequential(moe), "0.router").expert_bias.label
        '0.expert_bias_E'
    """
    parent = layer_path.rpartition(".")[0]
    bias = KnobRef(parent, "expert_bias_E")
    return LayerKnobs(expert_bias=bias if bias.get(model) is not None else None)


def _extract(stash: GateStash):
    def extract(module: nn.Module, args: tuple, output: Any) -> Routing:
        _, topk_expert_ids_BLK, scores_BLE = output
        logits = stash.take()
        if logits is None:
            # Gate not called as a module (a subclass): the router's own scores are the probabilities.
            scores_TE = scores_BLE.reshape(-1, scores_BLE.shape[-1]).float()
            probs_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True) if module.score_func == "sigmoid" else scores_TE
        else:
            probs_TE = sigmoid_probs(logits.reshape(-1, logits.shape[-1])) if module.score_func == "sigmoid" else None
        return Routing.from_topk(topk_expert_ids_BLK, logits_TE=logits, probs_TE=probs_TE)

    return extract


def describe(name: str, module: nn.Module, model: nn.Module) -> RouterLayer | None:
    """The layer of a torchtitan router, else ``None``.

    Example:
        >>> describe("0", nn.Linear(8, 4), nn.Sequential(nn.Linear(8, 4))) is None  # not a torchtitan router
        True
    """
    if not is_instance_of(module, _LIBRARY, _CLASSES):
        return None
    stash = GateStash(module, module.gate)
    meta = {"knobs": knobs, "logits": "gate output (forward hook)", "probs": module.score_func}
    num_experts, top_k = int(module.num_experts), int(module.top_k)
    return RouterLayer(name, module, num_experts, top_k, _extract(stash), adapter=NAME, meta=meta)


def discover(model: nn.Module) -> list[RouterLayer]:
    """Every torchtitan router in ``model``, in model order.

    Example:
        >>> discover(nn.Linear(2, 2))
        []
    """
    return find(model, _LIBRARY, describe)
