"""Family: DeepSpeed MoE (``deepspeed.moe.sharded_moe.TopKGate``, inside ``MOELayer`` / ``deepspeed.moe.layer.MoE``).

Shape legend: ``S`` tokens, ``E`` experts, ``K`` experts chosen per token, ``C`` capacity, ``A = K * S``.

``MOELayer`` calls the gate with ``sparse_routes=True``; it returns ``(l_aux, capacity, E, indices_KS, locations_KS,
gates_KS, exp_counts_E)``: per slot the expert each token went to, ``-1`` where the assignment was dropped for
capacity, and ``exp_counts_E``, the assignments selected per expert before capacity. Called directly
(``sparse_routes=False``) the gate returns ``(l_aux, combine_SEC, dispatch_mask_SEC, exp_counts_E)``.

A dropped assignment's expert is not in the output, and may not be recomputable (the second expert of top-2 is
sampled with Gumbel noise by default, ``top2_2nd_expert_sampling``; ``RSample`` and ``Jitter`` add noise): its expert
is taken from ``exp_counts_E`` minus the kept assignments, so the per-expert counts and the dropped count equal
DeepSpeed's own exactly; only which dropped token went with which expert (the co-activation of dropped pairs) is
arbitrary. DeepSpeed skips no assignment by policy: its sampled second expert is a selection like any other.

The gate computes its logits with ``F.linear(x, self.wg.weight)`` and returns none, so the family recomputes them
from the gate's input (one ``[S, D] x [D, E]`` product; without ``Jitter`` they are DeepSpeed's logits exactly).

Knobs: none (DeepSpeed's aux loss is returned to the caller, who weighs it; ``noisy_gate_policy`` is a string).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moe_monitor.families.base import RouterLayer, find, is_instance_of
from moe_monitor.knobs import LayerKnobs
from moe_monitor.routing import Routing

NAME = "deepspeed"
SEARCHED = "DeepSpeed: deepspeed.moe.sharded_moe.TopKGate (inside MOELayer / deepspeed.moe.layer.MoE)"
_CLASSES = ("TopKGate",)
_LIBRARY = "deepspeed"


def knobs(model: nn.Module, layer_path: str) -> LayerKnobs:
    """No knob the controllers can turn (see the module docstring).

    Example:
        >>> knobs(nn.Sequential(nn.Linear(8, 4)), "0") == LayerKnobs()
        True
    """
    return LayerKnobs()


def routing_from_slots(chosen_KS: torch.Tensor, exp_counts_E: torch.Tensor, logits_SE: torch.Tensor | None) -> Routing:
    """The routing of ``[K, S]`` slots (``-1`` = dropped) whose selected counts per expert are ``exp_counts_E``.

    Example:
        >>> r = routing_from_slots(torch.tensor([[0, -1, 1]]), torch.tensor([2, 1]), None)
        >>> r.expert_idx_A.tolist(), r.kept_A.tolist()
        ([0, 0, 1], [True, False, True])
    """
    num_slots, num_tokens = chosen_KS.shape
    num_experts = exp_counts_E.shape[0]
    chosen_A = chosen_KS.T.reshape(-1).long()  # token-major, as Routing.from_topk lays them out
    dropped_A = chosen_A < 0
    kept_E = torch.zeros(num_experts + 1, dtype=torch.long, device=chosen_A.device)
    kept_E.index_add_(0, torch.where(dropped_A, num_experts, chosen_A), torch.ones_like(chosen_A))
    dropped_E = (exp_counts_E.long() - kept_E[:num_experts]).clamp_min(0)
    # One expert label per dropped assignment, sorted by expert, padded with E for the kept ones (output_size: no
    # host sync); then handed out to the dropped slots in token order.
    repeats = torch.cat([dropped_E, (chosen_A.numel() - dropped_E.sum()).reshape(1)])
    labels_A = torch.repeat_interleave(
        torch.arange(num_experts + 1, device=chosen_A.device), repeats, output_size=chosen_A.numel()
    )
    order_A = torch.argsort((~dropped_A).to(torch.int8), stable=True)
    filled_A = torch.empty_like(chosen_A).index_put_((order_A,), labels_A)
    expert_A = torch.where(dropped_A, filled_A, chosen_A)
    return Routing.from_topk(expert_A.reshape(num_tokens, num_slots), logits_TE=logits_SE, kept_TK=~dropped_A)


def extract(module: nn.Module, args: tuple, output: Any) -> Routing:
    """Maps either output layout of ``TopKGate`` to a :class:`Routing` (see the module docstring).

    Example:
        >>> gate = nn.Module()
        >>> gate.wg, gate.k = nn.Linear(4, 2, bias=False), 1
        >>> slots_KS, exp_counts_E = torch.tensor([[0, 1, -1]]), torch.tensor([1, 2])  # token 2 dropped from expert 1
        >>> r = extract(gate, (torch.randn(3, 4),), (None, None, None, slots_KS, None, None, exp_counts_E))
        >>> r.expert_idx_A.tolist(), r.kept_A.tolist(), tuple(r.logits_TE.shape)
        ([0, 1, 1], [True, True, False], (3, 2))
    """
    logits_SE = torch.nn.functional.linear(args[0].detach().float(), module.wg.weight.detach().float())
    logits_SE = logits_SE.reshape(-1, logits_SE.shape[-1])
    exp_counts_E = output[-1]
    if len(output) == 7:
        return routing_from_slots(output[3], exp_counts_E, logits_SE)
    dispatch_SE = output[2].any(dim=-1)
    # Experts a token ran on, first in each row, as K slots; a slot whose value is 0 ran nothing (dropped).
    ran_SK, chosen_SK = dispatch_SE.to(torch.int8).topk(int(module.k), dim=-1)
    chosen_KS = torch.where(ran_SK > 0, chosen_SK, -1).T
    return routing_from_slots(chosen_KS, exp_counts_E, logits_SE)


def describe(name: str, module: nn.Module, model: nn.Module) -> RouterLayer | None:
    """The layer of a DeepSpeed ``TopKGate``, else ``None``.

    Example:
        >>> describe("0", nn.Linear(8, 4), nn.Sequential(nn.Linear(8, 4))) is None  # not a DeepSpeed TopKGate
        True
    """
    if not is_instance_of(module, _LIBRARY, _CLASSES):
        return None
    meta = {"knobs": knobs, "logits": "recomputed from the gate input (F.linear with wg.weight)", "probs": "softmax"}
    num_experts, top_k, dropless = int(module.wg.out_features), int(module.k), not module.drop_tokens
    return RouterLayer(name, module, num_experts, top_k, extract, "token_choice", dropless, NAME, meta)


def discover(model: nn.Module) -> list[RouterLayer]:
    """Every DeepSpeed gate in ``model``, in model order.

    Example:
        >>> discover(nn.Linear(2, 2))
        []
    """
    return find(model, _LIBRARY, describe)
