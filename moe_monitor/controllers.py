"""Automatic repair: controllers that turn a router's balancing knobs while the model trains.

Shape legend: ``L`` monitored router layers, ``E`` experts.

As in torchtitan, the balancing logic lives outside the model: a controller finds a knob the model already reads
at every forward (an attribute or a buffer) and changes it between steps. The knobs it knows:

- :class:`AuxLossController`: ``Router.aux_loss_coef`` of the reference model (per layer); on Hugging Face MoE
  causal LMs (Mixtral, Qwen2-MoE, OLMoE, ...) ``router_aux_loss_coef`` of the ``...ForCausalLM`` module and its
  config (one knob for all layers; needs ``config.output_router_logits=True``).
- :class:`RouterNoiseController`: ``Router.noise`` / ``Router.noise_std`` of the reference model; ``jitter_noise``
  of Hugging Face Mixtral MoE blocks.
- :class:`ExpertBiasController`: the ``Router.expert_bias`` buffer of the reference model built with
  ``MoEConfig(expert_bias=True)`` and token choice; ``e_score_correction_bias`` of Hugging Face DeepSeek-V3 routers.

A controller whose knob the model lacks raises ``ValueError`` at :meth:`Controller.setup`, naming the knob and the
models that have it. Every decision comes from the window snapshot (already reduced across processes) or, for the
per-step expert bias, from counts all-reduced on the device, so every process applies the same change.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from moe_monitor.detect import CollapseEvent
from moe_monitor.snapshot import Snapshot

# Rules of :class:`~moe_monitor.detect.CollapseDetector` that mean "the load is collapsing" to a controller.
COLLAPSE_RULES: tuple[str, ...] = ("load_entropy", "max_violation", "dead_experts", "saturation")


def _module_names(model: nn.Module) -> dict[int, str]:
    return {id(module): name for name, module in model.named_modules()}


def _find_owner(model: nn.Module, layer_module: nn.Module, attr: str) -> nn.Module | None:
    """The module that holds ``attr`` for one router layer: itself, a submodule, or the nearest ancestor."""
    if getattr(layer_module, attr, None) is not None:
        return layer_module
    for sub in layer_module.modules():
        if getattr(sub, attr, None) is not None:
            return sub
    names = _module_names(model)
    path = names.get(id(layer_module))
    if path is None:
        return None
    by_name = dict(model.named_modules())
    parts = path.split(".")
    for cut in range(len(parts) - 1, -1, -1):
        parent = by_name.get(".".join(parts[:cut]))
        if parent is not None and getattr(parent, attr, None) is not None:
            return parent
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _layers(monitor: Any) -> list[Any]:
    layers = list(getattr(monitor, "layers", []))
    if not layers:
        raise ValueError("the monitor has no router layers; build the controller's monitor with RouterMonitor(model).")
    return layers


class Controller:
    """Base class: reacts to detector events per window and, optionally, to every optimizer step.

    Subclasses bind their knobs in :meth:`_bind` and decide in :meth:`_decide`. The base class keeps track of
    which ``(layer, rule)`` alerts of the training phase are firing (from the alert and recovery events it is
    shown), and handles a state restored before or after :meth:`setup`.

    Args:
        triggers: detector rules that count as a collapse for this controller.
    """

    name: str = "controller"

    def __init__(self, triggers: Iterable[str] = COLLAPSE_RULES) -> None:
        self.triggers = tuple(triggers)
        self._firing: set[tuple[str, str]] = set()
        self._pending: dict[str, Any] | None = None
        self._bound = False

    def setup(self, model: nn.Module, monitor: Any) -> None:
        """Finds the knobs in ``model`` for every layer of ``monitor``.

        Raises:
            ValueError: when the model lacks the knob; the message names it and the models that have it.
        """
        self._bind(model, monitor)
        self._bound = True
        if self._pending is not None:
            state, self._pending = self._pending, None
            self.load_state_dict(state)

    def on_train_step(self, monitor: Any, step: int) -> None:
        """Called after every optimizer step (default: nothing)."""

    def on_window(self, snapshot: Snapshot, events: Sequence[CollapseEvent]) -> list[CollapseEvent]:
        """Reacts to one closed window and its detector events; returns ``kind="control"`` events.

        Validation (any phase but ``"train"``) windows are ignored.
        """
        if snapshot.phase != "train":
            return []
        for event in events:
            if event.phase != "train" or event.rule not in self.triggers:
                continue
            if event.kind == "alert":
                self._firing.add((event.layer, event.rule))
            elif event.kind == "recovery":
                self._firing.discard((event.layer, event.rule))
        return self._decide(snapshot)

    def metrics(self) -> dict[str, float]:
        """Current knob values, keys ``controller/<name>/...``."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Knob values and the firing alerts, as plain Python values and CPU tensors."""
        return {"firing": sorted([layer, rule] for layer, rule in self._firing), **self._knob_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`; after :meth:`setup` it also writes the knob values back into the model."""
        self._firing = {(layer, rule) for layer, rule in state["firing"]}
        if not self._bound:
            self._pending = state
            return
        self._load_knob_state(state)

    def firing(self, layers: Iterable[str]) -> bool:
        """Whether any trigger alert is firing on one of ``layers``."""
        layers = set(layers)
        return any(layer in layers for layer, _ in self._firing)

    # Subclass hooks.
    def _bind(self, model: nn.Module, monitor: Any) -> None:
        raise NotImplementedError

    def _decide(self, snapshot: Snapshot) -> list[CollapseEvent]:
        return []

    def _knob_state(self) -> dict[str, Any]:
        return {}

    def _load_knob_state(self, state: dict[str, Any]) -> None:
        pass


@dataclass
class _ScalarKnob:
    """One float knob, written to every ``(object, attribute)`` target, that serves the router ``layers``."""

    label: str
    targets: list[tuple[Any, str]]
    layers: tuple[str, ...]
    base: float
    value: float
    quiet: int = 0  # windows since a trigger last fired on one of ``layers``

    def write(self, value: float) -> None:
        self.value = value
        for owner, attr in self.targets:
            setattr(owner, attr, value)


def _event(step: int, label: str, rule: str, new: float, old: float, text: str) -> CollapseEvent:
    return CollapseEvent(step, "train", label, rule, float(new), float(old), "info", text, (), "control")


class AuxLossController(Controller):
    """Multiplies the load-balancing loss coefficient while a collapse alert fires, then decays it back.

    Per window: if an alert in ``triggers`` fires on a layer the knob serves, ``coef <- min(max(coef * growth,
    floor), max_coef)`` (the floor lets it start from a model trained without aux loss). Once no trigger has fired
    for ``hold`` windows, the coefficient decays geometrically toward its original value, ``coef <- base +
    (coef - base) * decay``, and snaps to ``base`` once within 5 % of ``max(base, floor)`` (or, for a base below
    the floor, once under the floor). If the collapse returns, the alert fires again and the coefficient grows again.

    Args:
        growth: factor per collapsing window. 2.0 reaches the cap from 1e-2 in 4 windows.
        decay: factor on the excess per healthy window. 0.8 halves it in about 3 windows, slow enough not to
            re-trigger the collapse the higher coefficient just cured.
        floor: coefficient used when the base is 0 (or smaller). 1e-2, the Switch Transformer value.
        max_coef: cap. 0.1: beyond it the balancing term starts to dominate the language-model loss.
        hold: healthy windows before the decay starts. 10: the router needs time to settle on the balanced
            routing the higher coefficient produced; decaying at once brings the collapse straight back.
        triggers: detector rules that count as collapse.

    Logged metrics:
        ``controller/aux_loss/<layer>/coef`` per knob (``<layer>`` is ``all`` for one model-wide knob) and
        ``controller/aux_loss/max_coef``.

    Example:
        >>> from moe_monitor.reference import MoEConfig, MoETransformer
        >>> from moe_monitor.detect import make_snapshot
        >>> model = MoETransformer(MoEConfig(d_model=16, n_layers=1, n_heads=2, seq_len=8, n_experts=4, d_expert=8))
        >>> class Layer:  # what RouterMonitor.layers holds
        ...     name, num_experts, top_k, module = "blocks.0.moe.router", 4, 2, model.blocks[0].moe.router
        >>> class Monitor:
        ...     layers = [Layer()]
        >>> ctl = AuxLossController()
        >>> ctl.setup(model, Monitor())
        >>> alert = CollapseEvent(5, "train", "blocks.0.moe.router", "load_entropy", 0.2, 0.6, "critical", "...")
        >>> [e.value for e in ctl.on_window(make_snapshot([[9, 1, 0, 0]], step=5), [alert])]
        [0.02]
        >>> model.blocks[0].moe.router.aux_loss_coef
        0.02
    """

    name = "aux_loss"

    def __init__(
        self,
        growth: float = 2.0,
        decay: float = 0.8,
        floor: float = 1e-2,
        max_coef: float = 0.1,
        hold: int = 10,
        triggers: Iterable[str] = (*COLLAPSE_RULES, "dropped_fraction"),
    ) -> None:
        super().__init__(triggers)
        if growth <= 1:
            raise ValueError(f"growth={growth} must exceed 1.")
        if hold < 0:
            raise ValueError(f"hold={hold} must be a non-negative number of windows.")
        if not 0 <= decay < 1:
            raise ValueError(f"decay={decay} must be in [0, 1).")
        if floor <= 0 or max_coef < floor:
            raise ValueError(f"need 0 < floor <= max_coef, got floor={floor}, max_coef={max_coef}.")
        self.growth, self.decay, self.floor, self.max_coef, self.hold = growth, decay, floor, max_coef, hold
        self.knobs: list[_ScalarKnob] = []

    def _bind(self, model: nn.Module, monitor: Any) -> None:
        layers = _layers(monitor)
        knobs = []
        for layer in layers:
            owner = _find_owner(model, layer.module, "aux_loss_coef")
            if owner is not None:
                value = float(owner.aux_loss_coef)
                knobs.append(_ScalarKnob(layer.name, [(owner, "aux_loss_coef")], (layer.name,), value, value))
        if len(knobs) == len(layers):
            self.knobs = knobs
            return
        hf = next((m for m in model.modules() if _is_number(getattr(m, "router_aux_loss_coef", None))), None)
        if hf is None:
            missing = [layer.name for layer in layers if _find_owner(model, layer.module, "aux_loss_coef") is None]
            raise ValueError(
                f"AuxLossController needs an aux-loss coefficient to turn, but layers {missing} have no "
                "`aux_loss_coef` and no module has `router_aux_loss_coef`. Models that have one: the reference "
                "model (Router.aux_loss_coef) and Hugging Face MoE causal LMs such as Mixtral, Qwen2-MoE, OLMoE "
                "(`router_aux_loss_coef`)."
            )
        config = getattr(hf, "config", None)
        if config is not None and not getattr(config, "output_router_logits", False):
            raise ValueError(
                f"AuxLossController: {type(hf).__name__} only adds its aux loss when config.output_router_logits is "
                "True; set `model.config.output_router_logits = True` (or drop the controller)."
            )
        targets = [(hf, "router_aux_loss_coef")]
        if config is not None and hasattr(config, "router_aux_loss_coef"):
            targets.append((config, "router_aux_loss_coef"))
        value = float(hf.router_aux_loss_coef)
        self.knobs = [_ScalarKnob("all", targets, tuple(layer.name for layer in layers), value, value)]

    def _decide(self, snapshot: Snapshot) -> list[CollapseEvent]:
        events = []
        for knob in self.knobs:
            old = knob.value
            knob.quiet = 0 if self.firing(knob.layers) else knob.quiet + 1
            if knob.quiet == 0:
                new = min(max(old * self.growth, self.floor), max(self.max_coef, knob.base))
                why = "a collapse alert is firing"
            elif old != knob.base and knob.quiet > self.hold:
                new = knob.base + (old - knob.base) * self.decay
                if new - knob.base < 0.05 * max(knob.base, self.floor) or (knob.base < self.floor > new):
                    new = knob.base
                why = f"no collapse alert for {knob.quiet} windows; decaying back to the original value"
            else:
                continue
            if new != old:
                knob.write(new)
                events.append(
                    _event(
                        snapshot.step,
                        knob.label,
                        "aux_loss_coef",
                        new,
                        old,
                        f"[train step {snapshot.step}] {knob.label}: aux_loss_coef {old:.4g} -> {new:.4g} because "
                        f"{why} (cap {self.max_coef:.3g}, base {knob.base:.3g}).",
                    )
                )
        return events

    def metrics(self) -> dict[str, float]:
        out = {f"controller/{self.name}/{k.label}/coef": k.value for k in self.knobs}
        if self.knobs:
            out[f"controller/{self.name}/max_coef"] = max(k.value for k in self.knobs)
        return out

    def _knob_state(self) -> dict[str, Any]:
        return {"knobs": {k.label: {"base": k.base, "value": k.value, "quiet": k.quiet} for k in self.knobs}}

    def _load_knob_state(self, state: dict[str, Any]) -> None:
        for knob in self.knobs:
            saved = state.get("knobs", {}).get(knob.label)
            if saved is not None:
                knob.base, knob.quiet = float(saved["base"]), int(saved["quiet"])
                knob.write(float(saved["value"]))


@dataclass
class _NoiseKnob:
    label: str
    owner: Any
    layers: tuple[str, ...]
    style: str  # "reference" (noise + noise_std) or "jitter_attr" (Mixtral jitter_noise)
    base_kind: str
    base_std: float
    kind: str = field(default="none")
    std: float = 0.0
    quiet: int = 0

    def write(self, kind: str, std: float) -> None:
        self.kind, self.std = kind, std
        if self.style == "reference":
            self.owner.noise, self.owner.noise_std = kind, std
        else:
            self.owner.jitter_noise = std if kind != "none" else 0.0


NOISE_DEFAULTS: dict[str, tuple[float, float]] = {"gaussian": (0.05, 0.5), "jitter": (0.05, 0.5)}


class RouterNoiseController(Controller):
    """Raises router noise while a collapse alert fires and anneals it back afterwards.

    Noise makes the router try experts it has stopped choosing, so they get gradient again. Per window on a
    collapsing layer ``std <- min(max(std * growth, start_std), max_std)`` with the noise switched to ``kind``;
    after ``hold`` windows without a trigger, ``std <- std * decay`` until it falls below ``start_std`` (or the
    original level), when the layer's original noise setting is restored.

    Args:
        kind: ``"gaussian"`` (additive noise on the router logits; reference model) or ``"jitter"``
            (multiplicative noise ``U(1-eps, 1+eps)`` on the router input; reference model and Mixtral).
            ``None`` keeps the layer's own kind when it has one, else gaussian on the reference model and jitter
            on Mixtral.
        start_std: first level switched on. Default 0.05 for both kinds (gaussian on fp32 logits whose gaps
            are ~0.1 at initialisation and grow to units during a collapse; jitter 5 %).
        max_std: cap; default 0.5 for both kinds (a gaussian std of 0.5 reshuffles close top-k choices but not
            confident ones; jitter beyond 50 % would distort the token representation itself).
        growth: factor per collapsing window.
        decay: factor per healthy window after ``hold``.
        hold: healthy windows before the annealing starts (10, as for :class:`AuxLossController`).
        triggers: detector rules that count as collapse.

    Logged metrics:
        ``controller/noise/<layer>/std`` per layer and ``controller/noise/max_std``.

    Example:
        >>> from moe_monitor.monitor import RouterMonitor
        >>> from moe_monitor.reference import MoEConfig, MoETransformer
        >>> from moe_monitor.detect import make_snapshot
        >>> model = MoETransformer(MoEConfig(d_model=16, n_layers=1, n_heads=2, seq_len=8, n_experts=4, d_expert=8))
        >>> ctl = RouterNoiseController()
        >>> ctl.setup(model, RouterMonitor(model))
        >>> dead = CollapseEvent(5, "train", "blocks.0.moe.router", "dead_experts", 2, 0, "warning", "...", (2, 3))
        >>> _ = ctl.on_window(make_snapshot([[8, 8, 0, 0]], step=5), [dead])
        >>> model.blocks[0].moe.router.noise, model.blocks[0].moe.router.noise_std
        ('gaussian', 0.05)

    On Mixtral, ``jitter_noise`` scales the MoE block's input, which its experts see too (as in the original).
    """

    name = "noise"

    def __init__(
        self,
        kind: str | None = None,
        start_std: float | None = None,
        max_std: float | None = None,
        growth: float = 2.0,
        decay: float = 0.7,
        hold: int = 10,
        triggers: Iterable[str] = ("load_entropy", "dead_experts", "saturation"),
    ) -> None:
        super().__init__(triggers)
        if kind is not None and kind not in NOISE_DEFAULTS:
            raise ValueError(f"kind={kind!r} is not supported; choose one of {', '.join(NOISE_DEFAULTS)} or None.")
        if growth <= 1 or not 0 <= decay < 1:
            raise ValueError(f"need growth > 1 and 0 <= decay < 1, got growth={growth}, decay={decay}.")
        self.kind, self.start_std, self.max_std = kind, start_std, max_std
        if hold < 0:
            raise ValueError(f"hold={hold} must be a non-negative number of windows.")
        self.growth, self.decay, self.hold = growth, decay, hold
        self.knobs: list[_NoiseKnob] = []

    def _bind(self, model: nn.Module, monitor: Any) -> None:
        knobs = []
        for layer in _layers(monitor):
            ref = _find_owner(model, layer.module, "noise_std")
            if ref is not None and hasattr(ref, "noise"):
                knob = _NoiseKnob(layer.name, ref, (layer.name,), "reference", ref.noise, float(ref.noise_std))
                knob.kind, knob.std = knob.base_kind, knob.base_std
            else:
                mixtral = _find_owner(model, layer.module, "jitter_noise")
                if mixtral is None:
                    raise ValueError(
                        f"RouterNoiseController needs a router noise knob, but layer {layer.name!r} has neither "
                        "`noise`/`noise_std` (reference model Router) nor `jitter_noise` (Hugging Face Mixtral "
                        "MoE block). Drop --control noise for this model."
                    )
                if self.kind == "gaussian":
                    raise ValueError(
                        f"RouterNoiseController(kind='gaussian'): layer {layer.name!r} only has `jitter_noise` "
                        "(Mixtral); use kind='jitter' or None."
                    )
                std = float(mixtral.jitter_noise)
                knob = _NoiseKnob(layer.name, mixtral, (layer.name,), "jitter_attr", "jitter" if std else "none", std)
                knob.kind, knob.std = knob.base_kind, std
            knobs.append(knob)
        self.knobs = knobs

    def _kind_for(self, knob: _NoiseKnob) -> str:
        if self.kind is not None:
            return self.kind
        if knob.base_kind != "none":
            return knob.base_kind
        return "gaussian" if knob.style == "reference" else "jitter"

    def _decide(self, snapshot: Snapshot) -> list[CollapseEvent]:
        events = []
        for knob in self.knobs:
            old_kind, old_std = knob.kind, knob.std
            kind = self._kind_for(knob)
            start, cap = NOISE_DEFAULTS[kind]
            start = self.start_std if self.start_std is not None else start
            cap = self.max_std if self.max_std is not None else cap
            restored = (knob.base_kind, knob.base_std)
            knob.quiet = 0 if self.firing(knob.layers) else knob.quiet + 1
            if knob.quiet == 0:
                level = old_std if old_kind == kind else 0.0
                new = (kind, min(max(level * self.growth, start), max(cap, start)))
                why = "a collapse alert is firing"
            elif (old_kind, old_std) != restored and knob.quiet > self.hold:
                std = old_std * self.decay
                floor = max(start, knob.base_std if old_kind == knob.base_kind else 0.0)
                new = restored if std < floor else (old_kind, std)
                why = f"no collapse alert for {knob.quiet} windows; annealing"
            else:
                continue
            if new != (old_kind, old_std):
                knob.write(*new)
                events.append(
                    _event(
                        snapshot.step,
                        knob.label,
                        "router_noise",
                        new[1],
                        old_std,
                        f"[train step {snapshot.step}] {knob.label}: router noise {old_kind} {old_std:.3g} -> "
                        f"{new[0]} {new[1]:.3g} because {why}.",
                    )
                )
        return events

    def metrics(self) -> dict[str, float]:
        out = {f"controller/{self.name}/{k.label}/std": (k.std if k.kind != "none" else 0.0) for k in self.knobs}
        if self.knobs:
            out[f"controller/{self.name}/max_std"] = max(out.values())
        return out

    def _knob_state(self) -> dict[str, Any]:
        return {
            "knobs": {
                k.label: {
                    "base_kind": k.base_kind,
                    "base_std": k.base_std,
                    "kind": k.kind,
                    "std": k.std,
                    "quiet": k.quiet,
                }
                for k in self.knobs
            }
        }

    def _load_knob_state(self, state: dict[str, Any]) -> None:
        for knob in self.knobs:
            saved = state.get("knobs", {}).get(knob.label)
            if saved is not None:
                knob.base_kind, knob.base_std, knob.quiet = (
                    saved["base_kind"],
                    float(saved["base_std"]),
                    int(saved["quiet"]),
                )
                knob.write(saved["kind"], float(saved["std"]))


class ExpertBiasController(Controller):
    """Auxiliary-loss-free balancing (Wang et al. 2024, DeepSeek-V3): a per-expert selection bias.

    After every optimizer step, with ``count_E`` that step's assignments per expert of a layer (summed over
    processes),
    ``bias_E += rate * sign(mean(count_E) - count_E)`` and then ``bias_E -= mean(bias_E)``. The bias is added to
    the router scores for choosing experts only, never to the combine weights, so it steers load without a
    gradient that competes with the language-model loss.

    The step's counts are the difference of ``monitor.window_counts("train")`` since the previous step (the
    window restarts after every ``collect``, which :meth:`on_window` notes). Everything stays on the device: one
    ``all_reduce`` of the ``[L, E]`` counts when ``torch.distributed`` is initialised, no host sync, and every
    process applies the identical update.

    It acts every step, but it tells the user (a ``kind="control"`` event) only when something material happened:
    at the first window with updates, and whenever a layer's bias range (max - min) has doubled or halved since the
    last event of that layer. A run of a thousand windows thus gets a handful of events per layer, not one per
    window; the per-window values are in :meth:`metrics`.

    Args:
        rate: bias step per optimizer step, in units of the router scores (softmax probabilities on the reference
            model, sigmoid scores on DeepSeek-V3). 1e-3 as in Wang et al. 2024.
        triggers: unused for decisions (the controller always runs); kept for a uniform interface.

    Logged metrics:
        ``controller/bias/<layer>/max_abs`` (largest ``|bias|``), ``controller/bias/<layer>/range`` (max - min)
        and ``controller/bias/updates``.

    Events:
        ``rule="expert_bias"``, ``value`` the layer's bias range now, ``threshold`` the range at its previous event
        (0 for the first).

    Example:
        >>> from moe_monitor.monitor import RouterMonitor
        >>> from moe_monitor.reference import MoEConfig, MoETransformer
        >>> config = MoEConfig(d_model=16, n_layers=1, n_heads=2, seq_len=8, n_experts=4, d_expert=8, expert_bias=True)
        >>> model = MoETransformer(config)
        >>> monitor = RouterMonitor(model)
        >>> ctl = ExpertBiasController(rate=0.01)
        >>> ctl.setup(model, monitor)
        >>> _ = model(torch.randint(0, 256, (2, 8)))  # one training step's forward
        >>> ctl.on_train_step(monitor, step=1)
        >>> count_E, bias_E = monitor.window_counts()[0], model.blocks[0].moe.router.expert_bias
        >>> step_E = 0.01 * torch.sign(count_E.mean() - count_E)  # the update, then mean-centred
        >>> torch.allclose(bias_E, (step_E - step_E.mean()).float())
        True
    """

    name = "bias"

    def __init__(self, rate: float = 1e-3, triggers: Iterable[str] = COLLAPSE_RULES) -> None:
        super().__init__(triggers)
        if not rate > 0:
            raise ValueError(f"rate={rate} must be positive.")
        self.rate = rate
        self.layer_names: list[str] = []
        self.num_experts: list[int] = []
        self.biases: list[torch.Tensor] = []
        self.updates = 0
        self._last_reported = 0
        # Bias range (max - min) of each layer at its last event; a layer without an event yet is absent.
        self._reported_range: dict[str, float] = {}
        self._prev_counts_LE: torch.Tensor | None = None

    def _bind(self, model: nn.Module, monitor: Any) -> None:
        self.layer_names, self.num_experts, self.biases = [], [], []
        for layer in _layers(monitor):
            bias = None
            for attr in ("expert_bias", "e_score_correction_bias"):
                owner = _find_owner(model, layer.module, attr)
                if owner is not None and isinstance(getattr(owner, attr), torch.Tensor):
                    bias = getattr(owner, attr)
                    if getattr(owner, "kind", "token_choice") == "expert_choice":
                        raise ValueError(
                            f"ExpertBiasController: layer {layer.name!r} uses expert-choice routing, which ignores "
                            "expert_bias (a per-expert shift cannot change an expert's top-C tokens); use token "
                            "choice or drop --control bias."
                        )
                    break
            if bias is None:
                raise ValueError(
                    f"ExpertBiasController needs a per-expert selection bias, but layer {layer.name!r} has none. "
                    "Build the reference model with MoEConfig(expert_bias=True) (router buffer `expert_bias`), or "
                    "use a Hugging Face DeepSeek-V3 model (router buffer `e_score_correction_bias`)."
                )
            if bias.numel() != layer.num_experts:
                raise ValueError(
                    f"ExpertBiasController: layer {layer.name!r} has {layer.num_experts} experts but a bias of "
                    f"{bias.numel()} entries."
                )
            self.layer_names.append(layer.name)
            self.num_experts.append(int(layer.num_experts))
            self.biases.append(bias)
        self._prev_counts_LE = None

    def on_train_step(self, monitor: Any, step: int) -> None:
        counts_LE = monitor.window_counts("train")
        prev = self._prev_counts_LE
        step_counts_LE = counts_LE if prev is None else counts_LE - prev
        self._prev_counts_LE = counts_LE.clone()
        # A fresh contiguous tensor: the collective needs one, and the live window view must stay untouched.
        step_counts_LE = step_counts_LE.clone(memory_format=torch.contiguous_format)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(step_counts_LE)
        with torch.no_grad():
            for i, bias_E in enumerate(self.biases):
                count_E = step_counts_LE[i, : self.num_experts[i]].to(bias_E.device, torch.float32)
                bias_E.add_(torch.sign(count_E.mean() - count_E), alpha=self.rate)
                bias_E.sub_(bias_E.mean())
        self.updates += 1

    def on_window(self, snapshot: Snapshot, events: Sequence[CollapseEvent]) -> list[CollapseEvent]:
        if snapshot.phase != "train":
            return []
        # collect() has just restarted the window counters, so the next step's counts start from zero.
        self._prev_counts_LE = None
        if self.updates == self._last_reported:
            return []
        self._last_reported = self.updates
        out = []
        for name, bias_E in zip(self.layer_names, self.biases):
            b = bias_E.detach().float().cpu()
            lo, hi = int(b.argmin()), int(b.argmax())
            spread = float(b[hi] - b[lo])
            before = self._reported_range.get(name)
            if before is not None and (spread == before or before / 2 < spread < before * 2):
                continue
            self._reported_range[name] = spread
            change = "started" if before is None else f"range {before:.3g} -> {spread:.3g}"
            out.append(
                _event(
                    snapshot.step,
                    name,
                    "expert_bias",
                    spread,
                    0.0 if before is None else before,
                    f"[train step {snapshot.step}] {name}: expert_bias {change} after {self.updates} updates, now "
                    f"[{float(b[lo]):+.4f}, {float(b[hi]):+.4f}]; most boosted expert {hi}, most held back {lo}. "
                    "Next event when the range doubles or halves.",
                )
            )
        return out

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, bias_E in zip(self.layer_names, self.biases):
            b = bias_E.detach().float().cpu()
            out[f"controller/{self.name}/{name}/max_abs"] = float(b.abs().max())
            out[f"controller/{self.name}/{name}/range"] = float(b.max() - b.min())
        out[f"controller/{self.name}/updates"] = float(self.updates)
        return out

    def _knob_state(self) -> dict[str, Any]:
        return {
            "bias": {name: b.detach().cpu().clone() for name, b in zip(self.layer_names, self.biases)},
            "updates": self.updates,
            "last_reported": self._last_reported,
            "reported_range": dict(self._reported_range),
        }

    def _load_knob_state(self, state: dict[str, Any]) -> None:
        self.updates = int(state.get("updates", 0))
        self._last_reported = int(state.get("last_reported", self.updates))
        self._reported_range = {k: float(v) for k, v in state.get("reported_range", {}).items()}
        self._prev_counts_LE = None
        with torch.no_grad():
            for name, bias_E in zip(self.layer_names, self.biases):
                saved = state.get("bias", {}).get(name)
                if saved is not None:
                    bias_E.copy_(torch.as_tensor(saved).to(bias_E.device, bias_E.dtype))


CONTROLLERS: dict[str, type[Controller]] = {
    "aux": AuxLossController,
    "noise": RouterNoiseController,
    "bias": ExpertBiasController,
}


def make_controllers(names: str | Iterable[str] | None) -> list[Controller]:
    """Controllers for ``--control aux,noise,bias`` (a comma-separated string or a list; empty means none).

    Example:
        >>> [c.name for c in make_controllers("aux,bias")]
        ['aux_loss', 'bias']
        >>> make_controllers(["nope"])
        Traceback (most recent call last):
        ...
        ValueError: unknown controller 'nope'; choose from aux, noise, bias.
    """
    if names is None:
        return []
    if isinstance(names, str):
        names = names.split(",")
    out = []
    for raw in names:
        key = raw.strip().lower()
        if not key or key == "none":
            continue
        if key not in CONTROLLERS:
            raise ValueError(f"unknown controller {raw!r}; choose from {', '.join(CONTROLLERS)}.")
        out.append(CONTROLLERS[key]())
    return out
