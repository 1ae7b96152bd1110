"""Family: st-moe-pytorch (``st_moe_pytorch.TopNGating``, inside its ``MoE`` / ``SparseMoEBlock``).

Shape legend: ``B`` groups (batches), ``N`` tokens per group, ``T = B * N``, ``E`` experts, ``K`` = ``top_n``,
``C`` capacity per expert and group.

The gate returns ``(dispatch_BNEC, combine_BNEC, balance_loss, router_z_loss)``. The chosen experts are the top-``K``
of its ``to_gates`` Linear's logits (kept by a forward hook on that Linear, no second product); the dispatch tensor
says which ran. Its later choices are routed with probability ``min(1, gate / threshold)``: a choice that did not run
is *skipped* when that probability was below 1 and its expert had room, and *dropped* (capacity) otherwise
(:func:`~moe_monitor.families.grouped.capacity_outcome`). The dispatch tensor is never read as scores, whatever ``C``.

``noise_gates=True`` (Gumbel noise on the logits before the choice) makes the choice unrecoverable from the logits; the
family then warns once and counts the noiseless top-``K``.

Knobs: the ``MoE``'s ``balance_loss_coef`` (aux-loss weight).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from moe_monitor.families.base import GateStash, RouterLayer, find, is_instance_of
from moe_monitor.families.grouped import MAYBE, ROUTED, capacity_outcome
from moe_monitor.knobs import KnobRef, LayerKnobs
from moe_monitor.routing import Routing

NAME = "st-moe"
SEARCHED = "st-moe-pytorch: st_moe_pytorch.TopNGating (inside its MoE)"
_CLASSES = ("TopNGating",)
_LIBRARY = "st_moe_pytorch"


def knobs(model: nn.Module, layer_path: str) -> LayerKnobs:
    """The balance-loss weight of the ``MoE`` holding the gate, when it has one.

    Example:
        >>> moe = nn.Module()
        >>> moe.gate, moe.balance_loss_coef = nn.Module(), 0.01
        >>> [ref.label for ref in knobs(nn.Sequential(moe), "0.gate").aux_loss_coef]
        ['0.balance_loss_coef']
    """
    ref = KnobRef(layer_path.rpartition(".")[0], "balance_loss_coef")
    return LayerKnobs(aux_loss_coef=(ref,) if ref.get(model) is not None else ())


def _extract(name: str, stash: GateStash, noise: dict):
    def extract(module: nn.Module, args: tuple, output: Any) -> Routing:
        logits_BNE = stash.take()
        if logits_BNE is None:
            raise ValueError(f"the gate's to_gates Linear did not run; register {name!r} with an extract function")
        if noise.pop("on", False) and not noise.get("warned"):
            noise["warned"] = True
            warnings.warn(
                f"moe_monitor: st-moe gate {name!r} ran with noise_gates=True: its choice used Gumbel-noised logits "
                "that it does not return, so the counts are of the noiseless top-n choice; call the MoE with "
                "noise_gates=False (its default) for exact counts",
                RuntimeWarning,
                stacklevel=2,
            )
        dispatch_BNEC = output[0].detach()
        ran_BNE = (dispatch_BNEC != 0).any(dim=-1).reshape(-1, *dispatch_BNEC.shape[-3:-1])
        logits_BNE = logits_BNE.reshape(ran_BNE.shape)
        top_BNK, topk_idx_BNK = logits_BNE.float().softmax(dim=-1).topk(int(module.top_n), dim=-1)
        # Routing probability min(1, gate / threshold) of each choice, gate normalised over the top-n.
        gate_BNK = top_BNK / top_BNK.sum(dim=-1, keepdim=True).clamp_min(module.eps)
        threshold_K = module.threshold_train if module.training else module.threshold_eval
        policy_BNK = torch.where(gate_BNK >= threshold_K, ROUTED, MAYBE)
        policy_BNK[..., 0] = ROUTED
        kept_BNK, skipped_BNK = capacity_outcome(topk_idx_BNK, ran_BNE, dispatch_BNEC.shape[-1], policy_BNK)
        return Routing.from_topk(topk_idx_BNK, logits_TE=logits_BNE, kept_TK=kept_BNK, skipped_TK=skipped_BNK)

    return extract


def describe(name: str, module: nn.Module, model: nn.Module) -> RouterLayer | None:
    """The layer of an st-moe gate, else ``None``.

    Example:
        >>> describe("0", nn.Linear(8, 4), nn.Sequential(nn.Linear(8, 4))) is None  # not an st-moe TopNGating
        True
    """
    if not is_instance_of(module, _LIBRARY, _CLASSES):
        return None
    stash = GateStash(module, module.to_gates)
    noise: dict = {}

    def note_noise(gate: nn.Module, args: tuple, kwargs: dict) -> None:
        if not gate._forward_hooks:  # the monitor was removed
            handle.remove()
            return
        if kwargs.get("noise_gates", args[1] if len(args) > 1 else False):
            noise["on"] = True

    handle = module.register_forward_pre_hook(note_noise, with_kwargs=True)
    meta = {"knobs": knobs, "logits": "to_gates output (forward hook)", "probs": "softmax"}
    return RouterLayer(
        name,
        module,
        int(module.num_gates),
        int(module.top_n),
        _extract(name, stash, noise),
        "token_choice",
        False,
        NAME,
        meta,
    )


def discover(model: nn.Module) -> list[RouterLayer]:
    """Every st-moe gate in ``model``, in model order.

    Example:
        >>> discover(nn.Linear(2, 2))
        []
    """
    return find(model, _LIBRARY, describe)
