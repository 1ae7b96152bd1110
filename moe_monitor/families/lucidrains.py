"""Family: mixture-of-experts (lucidrains, PyPI ``mixture-of-experts``), ``mixture_of_experts.Top2Gating``.

Shape legend: ``B`` groups (batches), ``N`` tokens per group, ``T = B * N``, ``E`` experts, ``K = 2``, ``C`` capacity.

The gate returns ``(dispatch_BNEC, combine_BNEC, loss)``. Its scores are ``x @ w_gating`` (an ``einsum`` with a bare
parameter, no submodule to hook, and not returned), so the family recomputes the logits from the gate's input (one
``[T, D] x [D, E]`` product). The chosen experts are the top-2 of those logits; the dispatch tensor says which ran.
The second choice goes through ``second_policy_train`` / ``_eval`` (``"random"`` by default, also ``"threshold"``,
``"none"``): a second choice that did not run is *skipped* when the policy skips it for sure (``"none"``, or
``"threshold"`` below the threshold) or may have (``"random"`` below the threshold) with room at its expert, and
*dropped* (capacity) otherwise (:func:`~moe_monitor.families.grouped.capacity_outcome`). Hierarchical MoE
(``HeirarchicalMoE``, with ``outer_expert_dims``) is not supported: register its gates by hand.

Knobs: the ``MoE``'s ``loss_coef`` (aux-loss weight).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moe_monitor.families.base import RouterLayer, find, is_instance_of
from moe_monitor.families.grouped import MAYBE, NEVER, ROUTED, capacity_outcome
from moe_monitor.knobs import KnobRef, LayerKnobs
from moe_monitor.routing import Routing

NAME = "mixture-of-experts"
SEARCHED = "mixture-of-experts (lucidrains): mixture_of_experts.Top2Gating (inside its MoE)"
_CLASSES = ("Top2Gating",)
_LIBRARY = "mixture_of_experts"


def knobs(model: nn.Module, layer_path: str) -> LayerKnobs:
    """The loss weight of the ``MoE`` holding the gate, when it has one.

    Example:
        >>> moe = nn.Module()
        >>> moe.gate, moe.loss_coef = nn.Module(), 0.01
        >>> [ref.label for ref in knobs(nn.Sequential(moe), "0.gate").aux_loss_coef]
        ['0.loss_coef']
    """
    ref = KnobRef(layer_path.rpartition(".")[0], "loss_coef")
    return LayerKnobs(aux_loss_coef=(ref,) if ref.get(model) is not None else ())


def extract(module: nn.Module, args: tuple, output: Any) -> Routing:
    """Maps ``Top2Gating``'s output to a :class:`Routing` (see the module docstring).

    Example:
        >>> gate = nn.Module()  # the attributes extract reads from a Top2Gating
        >>> gate.w_gating, gate.eps = torch.eye(3), 1e-9
        >>> gate.second_policy_train, gate.second_threshold_train = "all", 0.2
        >>> x_BND = torch.tensor([[[2.0, 1.0, 0.0], [0.0, 2.0, 1.0]]])  # top-2: experts (0, 1) and (1, 2)
        >>> dispatch_BNEC = torch.zeros(1, 2, 3, 2)
        >>> dispatch_BNEC[0, 0, 0, 0] = dispatch_BNEC[0, 0, 1, 0] = dispatch_BNEC[0, 1, 1, 1] = 1  # (1, 2) dropped on 2
        >>> r = extract(gate, (x_BND,), (dispatch_BNEC, None, None))
        >>> r.expert_idx_A.tolist(), r.kept_A.tolist()
        ([0, 1, 1, 2], [True, True, True, False])
    """
    dispatch_BNEC = output[0].detach()
    ran_BNE = (dispatch_BNEC != 0).any(dim=-1).reshape(-1, *dispatch_BNEC.shape[-3:-1])
    logits_BNE = (args[0].detach() @ module.w_gating.detach()).reshape(ran_BNE.shape)
    top_BNK, topk_idx_BNK = logits_BNE.softmax(dim=-1).topk(2, dim=-1)
    policy = module.second_policy_train if module.training else module.second_policy_eval
    threshold = module.second_threshold_train if module.training else module.second_threshold_eval
    second_BN = {"all": ROUTED, "none": NEVER}.get(policy, MAYBE)
    policy_BNK = torch.full_like(topk_idx_BNK, ROUTED)
    if second_BN == MAYBE:
        # "random": routed with probability gate_2 / threshold (sure when >= 1); "threshold": when gate_2 > threshold.
        gate_BN = top_BNK[..., 1] / (top_BNK.sum(dim=-1) + module.eps)
        sure_BN = gate_BN >= max(threshold, module.eps) if policy == "random" else gate_BN > threshold
        policy_BNK[..., 1] = torch.where(sure_BN, ROUTED, NEVER if policy == "threshold" else MAYBE)
    else:
        policy_BNK[..., 1] = second_BN
    kept_BNK, skipped_BNK = capacity_outcome(topk_idx_BNK, ran_BNE, dispatch_BNEC.shape[-1], policy_BNK)
    return Routing.from_topk(topk_idx_BNK, logits_TE=logits_BNE, kept_TK=kept_BNK, skipped_TK=skipped_BNK)


def describe(name: str, module: nn.Module, model: nn.Module) -> RouterLayer | None:
    """The layer of a mixture-of-experts gate, else ``None``.

    Example:
        >>> describe("0", nn.Linear(8, 4), nn.Sequential(nn.Linear(8, 4))) is None  # not a Top2Gating
        True
    """
    # Top2Gating with outer_expert_dims (hierarchical MoE) has a 3-d w_gating and another output layout.
    if not is_instance_of(module, _LIBRARY, _CLASSES) or module.w_gating.dim() != 2:
        return None
    meta = {"knobs": knobs, "logits": "recomputed from the gate input (x @ w_gating)", "probs": "softmax"}
    return RouterLayer(name, module, int(module.num_gates), 2, extract, "token_choice", False, NAME, meta)


def discover(model: nn.Module) -> list[RouterLayer]:
    """Every mixture-of-experts gate in ``model``, in model order.

    Example:
        >>> discover(nn.Linear(2, 2))
        []
    """
    return find(model, _LIBRARY, describe)
