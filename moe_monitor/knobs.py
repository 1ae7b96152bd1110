"""Balancing knobs: where a router's aux-loss weight, noise and expert bias live, looked up live on every use.

Shape legend: ``E`` experts.

A knob is named by *where* it lives, never by the object found at setup: a :class:`KnobRef` holds a module path
(as in ``model.named_modules()``) and an attribute, and resolves both each time a controller reads or writes it.
``Module._apply`` (``model.to(device)``, a precision conversion, a strategy's move) replaces parameters and buffers
with new tensors, so a tensor kept from ``setup`` would silently stop reaching the router; a path does not.

Which knobs a router has is the business of its model family (``moe_monitor.families``): each family says, per
router layer, where its knobs are (:class:`LayerKnobs`). :func:`generic_knobs` is the fallback for layers whose
family says nothing: it looks for the usual attribute names on the router, its submodules and its ancestors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

KNOB_KINDS: tuple[str, ...] = ("aux_loss_coef", "noise", "jitter", "expert_bias")
"""What a :class:`LayerKnobs` can hold: a float load-balancing loss weight, the reference router's noise
(kind + std attributes), a multiplicative input jitter (Mixtral's ``jitter_noise``), an ``[E]`` selection bias."""


@dataclass(frozen=True)
class KnobRef:
    """An attribute of a submodule, resolved from the model on every access.

    Args:
        path: module path in the model, as in ``model.named_modules()``; ``""`` is the model itself.
        attr: attribute name on that module; a dotted name reaches into a plain object the module holds, e.g.
            ``"config.router_aux_loss_coef"``.

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 2))
        >>> ref = KnobRef("0", "bias")
        >>> model.double()  # replaces the parameter: a tensor kept from before would be stale
        Sequential(
          (0): Linear(in_features=2, out_features=2, bias=True)
        )
        >>> ref.get(model).dtype, ref.label
        (torch.float64, '0.bias')
    """

    path: str
    attr: str

    @property
    def label(self) -> str:
        """``path.attr`` (``attr`` alone for the model itself), for messages."""
        return f"{self.path}.{self.attr}" if self.path else self.attr

    def owner(self, model: nn.Module) -> Any:
        """The object that holds the last part of :attr:`attr`; raises ``AttributeError`` when it is gone."""
        obj: Any = model.get_submodule(self.path)
        *parents, _ = self.attr.split(".")
        for part in parents:
            obj = getattr(obj, part)
        return obj

    def get(self, model: nn.Module) -> Any:
        """The knob's current value (``None`` when the attribute is unset or gone)."""
        try:
            return getattr(self.owner(model), self.attr.split(".")[-1], None)
        except AttributeError:
            return None

    def set(self, model: nn.Module, value: Any) -> None:
        """Writes a value (a float attribute; tensors are changed in place by their controller, not replaced)."""
        setattr(self.owner(model), self.attr.split(".")[-1], value)


@dataclass(frozen=True)
class LayerKnobs:
    """The balancing knobs of one router layer, as its family reports them (empty fields: the layer lacks it).

    Attributes:
        aux_loss_coef: float attributes that together are the layer's load-balancing loss weight (one model-wide
            weight, e.g. Hugging Face's ``router_aux_loss_coef`` on the model and its config, serves every layer:
            the same refs then appear in every layer's knobs).
        noise: ``(kind, std)`` attributes of the reference router (``"none" | "jitter" | "gaussian"``, a float).
        jitter: a float multiplicative input jitter ``eps`` (``U(1 - eps, 1 + eps)``), e.g. Mixtral's
            ``jitter_noise``.
        expert_bias: an ``[E]`` float tensor added to the router scores for expert selection only.
        inert: why the aux-loss weight has no effect as the model is configured now (e.g. a Hugging Face model
            with ``config.output_router_logits=False``), or ``""``.

    Example:
        >>> knobs = LayerKnobs(aux_loss_coef=(KnobRef("blocks.0.moe.router", "aux_loss_coef"),))
        >>> [ref.label for ref in knobs.aux_loss_coef], knobs.expert_bias is None, knobs.inert
        (['blocks.0.moe.router.aux_loss_coef'], True, '')
    """

    aux_loss_coef: tuple[KnobRef, ...] = ()
    noise: tuple[KnobRef, KnobRef] | None = None
    jitter: KnobRef | None = None
    expert_bias: KnobRef | None = None
    inert: str = ""


def _owner_path(model: nn.Module, layer_path: str, attr: str, want_tensor: bool = False) -> str | None:
    """Module path of the holder of ``attr`` for one router: itself, a submodule, or the nearest ancestor."""
    modules = dict(model.named_modules())
    layer_module = modules.get(layer_path)
    if layer_module is None:
        return None

    def has(module: nn.Module) -> bool:
        value = getattr(module, attr, None)
        return isinstance(value, torch.Tensor) if want_tensor else value is not None

    if has(layer_module):
        return layer_path
    for sub_path, sub in layer_module.named_modules():
        if sub_path and has(sub):
            return f"{layer_path}.{sub_path}" if layer_path else sub_path
    parts = layer_path.split(".") if layer_path else []
    for cut in range(len(parts) - 1, -1, -1):
        path = ".".join(parts[:cut])
        parent = modules.get(path)
        if parent is not None and has(parent):
            return path
    return None


def generic_knobs(model: nn.Module, layer_path: str) -> LayerKnobs:
    """Knobs found by the usual attribute names around the router at ``layer_path`` (the fallback lookup).

    Looks for ``aux_loss_coef`` (the reference router; else a model-wide Hugging Face ``router_aux_loss_coef``
    and its config twin), ``noise`` + ``noise_std`` (the reference router),
    ``jitter_noise`` (Mixtral-style blocks), an ``expert_bias`` or ``e_score_correction_bias`` tensor, on the router,
    its submodules and its ancestors.

    Example:
        >>> from moe_monitor.reference import MoEConfig, MoETransformer
        >>> model = MoETransformer(MoEConfig(d_model=16, n_layers=1, n_heads=2, seq_len=8, n_experts=4, d_expert=8))
        >>> knobs = generic_knobs(model, "blocks.0.moe.router")
        >>> [ref.label for ref in knobs.aux_loss_coef], knobs.expert_bias
        (['blocks.0.moe.router.aux_loss_coef'], None)
    """
    aux = _owner_path(model, layer_path, "aux_loss_coef")
    noise = _owner_path(model, layer_path, "noise_std")
    jitter = _owner_path(model, layer_path, "jitter_noise")
    bias_ref = None
    for attr in ("expert_bias", "e_score_correction_bias"):
        path = _owner_path(model, layer_path, attr, want_tensor=True)
        if path is not None:
            bias_ref = KnobRef(path, attr)
            break
    aux_refs: tuple[KnobRef, ...] = () if aux is None else (KnobRef(aux, "aux_loss_coef"),)
    inert = ""
    if not aux_refs:
        # Hugging Face MoE causal LMs: one model-wide weight on the ...ForCausalLM module, mirrored in its config.
        for path, module in model.named_modules():
            value = getattr(module, "router_aux_loss_coef", None)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                config = getattr(module, "config", None)
                aux_refs = (KnobRef(path, "router_aux_loss_coef"),)
                if config is not None and hasattr(config, "router_aux_loss_coef"):
                    aux_refs += (KnobRef(path, "config.router_aux_loss_coef"),)
                if config is not None and not getattr(config, "output_router_logits", False):
                    inert = (
                        f"{type(module).__name__} only adds its aux loss when config.output_router_logits is True; "
                        "set `model.config.output_router_logits = True`"
                    )
                break
    noise_refs = None
    if noise is not None and hasattr(model.get_submodule(noise), "noise"):
        noise_refs = (KnobRef(noise, "noise"), KnobRef(noise, "noise_std"))
    return LayerKnobs(
        aux_loss_coef=aux_refs,
        noise=noise_refs,
        jitter=None if jitter is None else KnobRef(jitter, "jitter_noise"),
        expert_bias=bias_ref,
        inert=inert,
    )


def layer_knobs(model: nn.Module, layer: Any) -> LayerKnobs:
    """The knobs of one monitored router layer (a ``RouterMonitor.layers`` record).

    Its family's answer when the family registered one (``layer.meta["knobs"]``, a function
    ``fn(model, layer_path) -> LayerKnobs``), else :func:`generic_knobs`.

    Example:
        >>> from moe_monitor.monitor import RouterMonitor
        >>> from moe_monitor.reference import MoEConfig, MoETransformer
        >>> model = MoETransformer(MoEConfig(d_model=16, n_layers=1, n_heads=2, seq_len=8, n_experts=4, d_expert=8))
        >>> layer_knobs(model, RouterMonitor(model).layers[0]).noise[1].label
        'blocks.0.moe.router.noise_std'
    """
    path = getattr(layer, "path", layer.name)  # where the router is in this process's model
    family_knobs = getattr(layer, "meta", {}).get("knobs")
    if family_knobs is not None:
        return family_knobs(model, path)
    return generic_knobs(model, path)
