"""Family: the reference model's router (``moe_monitor.reference.router.Router``).

Shape legend: ``T`` tokens in one forward, ``E`` experts, ``A`` assignments.

Its forward returns a ``RouterOutput`` named tuple that already is, field for field, a :class:`Routing`:
``logits_TE`` and ``probs_TE`` (fp32), ``token_idx_A``/``expert_idx_A`` (int64), ``kept_A`` (``False`` = dropped for
capacity). The router is matched by class name and module so that this family never imports the reference model.

Knobs: the router's ``aux_loss_coef``, its noise (``noise`` kind + ``noise_std``) and its ``expert_bias`` buffer.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from moe_monitor.families.base import RouterLayer
from moe_monitor.knobs import KnobRef, LayerKnobs
from moe_monitor.routing import Routing

NAME = "reference"
SEARCHED = "moe_monitor.reference.router.Router (the reference model)"
_CLASS = ("moe_monitor.reference.router", "Router")


def is_reference_router(module: nn.Module) -> bool:
    """Whether ``module`` is the reference model's router.

    Example:
        >>> is_reference_router(nn.Linear(2, 2))
        False
    """
    return (type(module).__module__, type(module).__name__) == _CLASS


def extract(module: nn.Module, args: tuple, output: Any) -> Routing:
    """Maps a ``RouterOutput`` to a :class:`Routing`.

    Example:
        >>> import torch
        >>> from moe_monitor.reference import MoEConfig, MoETransformer
        >>> config = MoEConfig(d_model=16, n_layers=1, n_heads=2, seq_len=8, n_experts=4, top_k=2, d_expert=8)
        >>> model = MoETransformer(config)
        >>> router, x_TD = model.get_submodule("blocks.0.moe.router"), torch.randn(6, 16)
        >>> r = extract(router, (x_TD,), router(x_TD))
        >>> r.num_tokens, r.expert_idx_A.numel(), r.kept_A is None  # dropless: no capacity
        (6, 12, True)
    """
    # The reference router reports kept_A all True when dropless; None tells the counters there is no capacity.
    kept_A = None if getattr(module, "capacity_factor", None) is None else output.kept_A
    return Routing(
        token_idx_A=output.token_idx_A,
        expert_idx_A=output.expert_idx_A,
        num_tokens=output.logits_TE.shape[0],
        logits_TE=output.logits_TE,
        # probs_TE is softmax(logits_TE) by the router's contract; leaving it out lets the counters derive it
        # from the exp they compute anyway, which is cheaper than reading a second [T, E] tensor.
        probs_TE=None,
        kept_A=kept_A,
    )


def live(module: nn.Module) -> tuple[str, bool]:
    """``(kind, dropless)`` of the reference router now: its contract lets both change between steps.

    Example:
        >>> from moe_monitor.reference import MoEConfig, MoETransformer
        >>> model = MoETransformer(MoEConfig(d_model=16, n_layers=1, n_heads=2, seq_len=8, n_experts=4, d_expert=8))
        >>> live(model.get_submodule("blocks.0.moe.router"))
        ('token_choice', True)
    """
    return getattr(module, "kind", "token_choice"), getattr(module, "capacity_factor", None) is None


def knobs(model: nn.Module, layer_path: str) -> LayerKnobs:
    """The reference router's balancing knobs.

    Example:
        >>> from moe_monitor.reference import MoEConfig, MoETransformer
        >>> config = MoEConfig(d_model=16, n_layers=1, n_heads=2, seq_len=8, n_experts=4, d_expert=8, expert_bias=True)
        >>> knobs(MoETransformer(config), "blocks.0.moe.router").expert_bias.label
        'blocks.0.moe.router.expert_bias'
    """
    router = model.get_submodule(layer_path)
    has_bias = getattr(router, "expert_bias", None) is not None
    return LayerKnobs(
        aux_loss_coef=(KnobRef(layer_path, "aux_loss_coef"),),
        noise=(KnobRef(layer_path, "noise"), KnobRef(layer_path, "noise_std")),
        expert_bias=KnobRef(layer_path, "expert_bias") if has_bias else None,
    )


def describe(name: str, module: nn.Module, model: nn.Module | None = None) -> RouterLayer | None:
    """The :class:`RouterLayer` of a reference router, else ``None``.

    Example:
        >>> from moe_monitor.reference import MoEConfig, MoETransformer
        >>> config = MoEConfig(d_model=16, n_layers=1, n_heads=2, seq_len=8, n_experts=4, top_k=2, d_expert=8)
        >>> model = MoETransformer(config)
        >>> layer = describe("blocks.0.moe.router", model.get_submodule("blocks.0.moe.router"))
        >>> layer.num_experts, layer.top_k, layer.adapter, describe("x", nn.Linear(2, 2))
        (4, 2, 'reference', None)
    """
    if not is_reference_router(module):
        return None
    kind, dropless = live(module)
    meta = {"knobs": knobs, "logits": "the router's output", "probs": "softmax"}
    return RouterLayer(
        name, module, int(module.n_experts), int(module.top_k), extract, kind, dropless, NAME, meta, live=live
    )


def discover(model: nn.Module) -> list[RouterLayer]:
    """Every reference router in ``model``, in model order.

    Example:
        >>> discover(nn.Linear(2, 2))
        []
    """
    return [layer for name, module in model.named_modules() if (layer := describe(name, module)) is not None]
