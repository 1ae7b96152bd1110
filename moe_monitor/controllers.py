"""Automatic repair: controllers that turn a router's balancing knobs while the model trains.

Shape legend: ``L`` monitored router layers, ``E`` experts.

As in torchtitan, the balancing logic lives outside the model: a controller turns a knob the model already reads
at every forward (an attribute or a buffer) between steps. Where each layer's knobs live is its model family's
business (:func:`moe_monitor.knobs.layer_knobs`); a controller keeps only their *paths* and resolves them from the
model at every use, so ``model.to(device)``, a precision conversion or a strategy's move (which replace parameters
and buffers with new tensors) never leave it turning a stale copy. The knobs it knows:

- :class:`AuxLossController`: ``Router.aux_loss_coef`` of the reference model (per layer); on Hugging Face MoE
  causal LMs (Mixtral, Qwen2-MoE, OLMoE, ...) ``router_aux_loss_coef`` of the ``...ForCausalLM`` module and its
  config (one knob for all layers; needs ``config.output_router_logits=True``).
- :class:`RouterNoiseController`: ``Router.noise`` / ``Router.noise_std`` of the reference model; ``jitter_noise``
  of Hugging Face Mixtral MoE blocks.
- :class:`ExpertBiasController`: the ``Router.expert_bias`` buffer of the reference model built with
  ``MoEConfig(expert_bias=True)`` and token choice; ``e_score_correction_bias`` of Hugging Face DeepSeek-V3 routers.

Setup errors (``ValueError`` at :meth:`Controller.setup`): a knob the model lacks (the message names the knob and
the models that have it), and a knob another live controller already turns. A knob that stops reaching the router
mid-run (its attribute deleted or set to ``None``, a tensor replaced by a non-tensor or by one of the wrong shape)
warns once (``RuntimeWarning``), emits one ``control`` event with rule ``"knob_lost"``, and the controller leaves
that knob alone from then on; its metrics stop reporting the knob's value and count it out of ``active_knobs``.

Every decision comes from the window snapshot (already reduced across processes) or, for the per-step expert
bias, from counts all-reduced on the device, so every process applies the same change.

Pipeline parallelism: a controller turns only the knobs of the routers on its own process (``monitor.layers``),
deciding from the snapshot of every layer. A layer another stage holds is not a knob this process lost: it warns
nothing and emits no ``knob_lost``. A controller's own :meth:`~Controller.metrics` (``active_knobs`` included) and
control events are its process's; :func:`share_across_stages` (the ``Watcher`` calls it at every window) gathers
them from every stage, so the dashboards and every process's event history cover every stage's knobs.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moe_monitor.detect import CollapseEvent
from moe_monitor.knobs import KnobRef, LayerKnobs, layer_knobs
from moe_monitor.snapshot import Snapshot

# Rules of :class:`~moe_monitor.detect.CollapseDetector` that mean "the load is collapsing" to a controller.
COLLAPSE_RULES: tuple[str, ...] = ("load_entropy", "max_violation", "dead_experts", "saturation")

GROW, HOLD, DECAY, REST = "grow", "hold", "decay", "rest"


def knob_policy(firing: bool, quiet: int, at_base: bool, hold: int) -> tuple[str, str]:
    """The shared policy of the alert-driven knobs: grow on alert, hold, decay after recovery.

    A pure decision, kept apart from its effect on the model (as Lightning's early stopping does).

    Args:
        firing: a trigger alert fires on a layer the knob serves.
        quiet: windows since a trigger last fired (0 while one fires).
        at_base: the knob is at its original value.
        hold: quiet windows to wait before decaying.

    Returns:
        ``(decision, reason)``: ``"grow"`` while an alert fires; ``"rest"`` at the original value; ``"hold"`` for
        the first ``hold`` quiet windows; ``"decay"`` after them.

    Example:
        >>> [knob_policy(False, quiet, False, hold=2)[0] for quiet in (1, 2, 3)]
        ['hold', 'hold', 'decay']
        >>> knob_policy(True, 0, True, hold=2)
        ('grow', 'a collapse alert is firing')
    """
    if firing:
        return GROW, "a collapse alert is firing"
    if at_base:
        return REST, "the knob is at its original value"
    if quiet <= hold:
        return HOLD, f"no collapse alert for {quiet} of the {hold} windows held before decaying"
    return DECAY, f"no collapse alert for {quiet} windows; decaying back to the original value"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _layers(monitor: Any) -> list[Any]:
    """The monitor's routers on this process: none on a pipeline stage without MoE layers, whose monitor still
    has the other stages' layers in its layout."""
    layers = list(getattr(monitor, "layers", []))
    if not layers and not getattr(monitor, "layer_names", None):
        raise ValueError("the monitor has no router layers; build the controller's monitor with RouterMonitor(model).")
    return layers


def _attached(monitor: Any) -> bool:
    # A RouterMonitor gone, or whose hooks were removed (the callback's teardown), no longer drives its controllers.
    return monitor is not None and bool(getattr(monitor, "_handles", True))


# Which live controller turns which knob of a model: model -> knob identity -> (controller, its monitor).
_CLAIMS: weakref.WeakKeyDictionary[nn.Module, dict[tuple, tuple[weakref.ref, weakref.ref]]] = (
    weakref.WeakKeyDictionary()
)


@dataclass
class _Knob:
    """One knob a controller turns: where it lives (paths, never tensors), what it was and what it is now."""

    label: str  # the layer it serves, or "all" for one model-wide knob
    layers: tuple[str, ...]
    refs: tuple[KnobRef, ...]
    base: Any
    value: Any
    quiet: int = 0  # windows since a trigger last fired on one of ``layers``
    lost: str = ""  # why the knob no longer reaches the router; "" while it does
    size: int = 0  # experts of a per-expert knob


class Controller:
    """Base class: reacts to detector events per window and, optionally, to every optimizer step.

    Subclasses find their knobs in :meth:`_bind` (from :func:`moe_monitor.knobs.layer_knobs`) and check them in
    :meth:`_problem` before every use. The base class resolves nothing itself; it keeps track of which
    ``(layer, rule)`` alerts of the training phase are firing, refuses a knob another live controller turns,
    handles a knob lost mid-run, and handles a state restored before or after :meth:`setup`.

    Args:
        triggers: detector rules that count as a collapse for this controller.

    Example:
        >>> ctl = AuxLossController()
        >>> isinstance(ctl, Controller), ctl.active, ctl.firing(["blocks.0.moe.router"])  # before setup
        (True, False, False)
    """

    name: str = "controller"
    rule: str = "knob"  # the ``rule`` of this controller's control events

    def __init__(self, triggers: Iterable[str] = COLLAPSE_RULES) -> None:
        self.triggers = tuple(triggers)
        self.knobs: list[_Knob] = []
        self._firing: set[tuple[str, str]] = set()
        self._pending: dict[str, Any] | None = None
        self._model: nn.Module | None = None
        self._lost_events: list[CollapseEvent] = []
        self._step = 0  # the latest step seen, for the event of a knob found lost

    def setup(self, model: nn.Module, monitor: Any) -> None:
        """Finds the knobs in ``model`` for every layer of ``monitor`` (their paths; values are read live).

        Raises:
            ValueError: when the model lacks the knob (the message names it and the models that have it), or when
                another controller set up on this model and still attached turns the same knob.
        """
        knobs = list(self._bind(model, [(layer, layer_knobs(model, layer)) for layer in _layers(monitor)]) or ())
        self._claim(model, monitor, knobs)
        self._model, self.knobs = model, knobs
        self._lost_events = []
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
        self._step = snapshot.step
        for event in events:
            if event.phase != "train" or event.rule not in self.triggers:
                continue
            if event.kind == "alert":
                self._firing.add((event.layer, event.rule))
            elif event.kind == "recovery":
                self._firing.discard((event.layer, event.rule))
        for knob in self.knobs:
            self._verify(knob, snapshot.step)
        out, self._lost_events = self._lost_events, []
        return out + self._decide(snapshot)

    def metrics(self) -> dict[str, float]:
        """Current knob values, keys ``controller/<name>/...``, and ``controller/<name>/active_knobs``."""
        return {f"controller/{self.name}/active_knobs": float(sum(not knob.lost for knob in self.knobs))}

    def state_dict(self) -> dict[str, Any]:
        """Knob values and the firing alerts, as plain Python values and CPU tensors."""
        return {"firing": sorted([layer, rule] for layer, rule in self._firing), **self._knob_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`; after :meth:`setup` it also writes the knob values back into the model."""
        self._firing = {(layer, rule) for layer, rule in state["firing"]}
        if self._model is None:
            self._pending = state
            return
        self._load_knob_state(state)

    def firing(self, layers: Iterable[str]) -> bool:
        """Whether any trigger alert is firing on one of ``layers``."""
        layers = set(layers)
        return any(layer in layers for layer, _ in self._firing)

    @property
    def active(self) -> bool:
        """Whether the controller still turns at least one knob that reaches its router."""
        return any(not knob.lost for knob in self.knobs)

    # Knob checks.
    def _verify(self, knob: _Knob, step: int | None = None) -> bool:
        """Whether ``knob`` still reaches its router; the first time it does not, warns and marks it lost."""
        if knob.lost:
            return False
        assert self._model is not None
        problem = self._problem(knob)
        if not problem:
            return True
        knob.lost = problem
        where = ", ".join(ref.label for ref in knob.refs)
        text = (
            f"{type(self).__name__} ({self.name!r}) stopped turning {where}: {problem}, so it no longer reaches "
            f"the router of {knob.label}. The controller leaves this knob alone from now on and its metrics no "
            "longer report it. Keep the knob in place (change a tensor knob in place, e.g. `bias.zero_()`, rather "
            "than deleting it or setting it to None), or set the controller up again on the new model (a new fit "
            "with MoEMonitor(controllers=[...]) does)."
        )
        warnings.warn(f"moe_monitor: {text}", RuntimeWarning, stacklevel=3)
        step = self._step if step is None else step
        self._lost_events.append(
            CollapseEvent(step, "train", knob.label, "knob_lost", math.nan, math.nan, "warning", text, (), "control")
        )
        return False

    def _claim(self, model: nn.Module, monitor: Any, knobs: list[_Knob]) -> None:
        claims = _CLAIMS.setdefault(model, {})
        for knob in knobs:
            for ref in knob.refs:
                holder = claims.get(_identity(model, ref))
                other = None if holder is None else holder[0]()
                other_monitor = None if holder is None else holder[1]()
                if other is None or other is self or other._model is not model or not _attached(other_monitor):
                    continue
                raise ValueError(
                    f"{type(self).__name__} ({self.name!r}): knob {ref.label} is already turned by "
                    f"{type(other).__name__} ({other.name!r}), set up on this model and still attached; two "
                    "controllers on one knob would both step it. Give each knob one controller: one controller of "
                    "each kind in MoEMonitor(controllers=[...]), and no second MoEMonitor with the same kind of "
                    "controller on the same model."
                )
        for knob in knobs:
            for ref in knob.refs:
                claims[_identity(model, ref)] = (weakref.ref(self), weakref.ref(monitor))

    # Subclass hooks.
    def _bind(self, model: nn.Module, layers: list[tuple[Any, LayerKnobs]]) -> list[_Knob]:
        raise NotImplementedError

    def _problem(self, knob: _Knob) -> str:
        """Why ``knob`` no longer reaches its router as it is in the model now, or ``""``."""
        raise NotImplementedError

    def _decide(self, snapshot: Snapshot) -> list[CollapseEvent]:
        return []

    def _knob_state(self) -> dict[str, Any]:
        return {}

    def _load_knob_state(self, state: dict[str, Any]) -> None:
        pass


def _describe(value: Any) -> str:
    if value is None:
        return "gone (None)"
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {list(value.shape)}"
    return f"a {type(value).__name__}"


def _event(step: int, label: str, rule: str, new: float, old: float, text: str) -> CollapseEvent:
    return CollapseEvent(step, "train", label, rule, float(new), float(old), "info", text, (), "control")


def _identity(model: nn.Module, ref: KnobRef) -> tuple[int, str]:
    """What a ref points at: two paths to one object's attribute (e.g. every Megatron-Core router's shared
    ``config.moe_aux_loss_coeff``) are one knob."""
    try:
        return id(ref.owner(model)), ref.attr.split(".")[-1]
    except AttributeError:
        return id(None), ref.label


def _group(
    model: nn.Module, layers: list[tuple[Any, tuple[KnobRef, ...]]]
) -> list[tuple[tuple[KnobRef, ...], tuple[str, ...]]]:
    """Layers that share one knob (a model-wide weight) grouped together, in model order."""
    groups: dict[tuple, tuple[tuple[KnobRef, ...], list[str]]] = {}
    for layer, refs in layers:
        key = tuple(_identity(model, ref) for ref in refs)
        groups.setdefault(key, (refs, []))[1].append(layer.name)
    return [(refs, tuple(names)) for refs, names in groups.values()]


class _AlertKnobController(Controller):
    """A controller whose knobs follow :func:`knob_policy` per window; subclasses say how a value grows and decays.

    Values are what the subclass reads and writes (a float, a ``(kind, std)`` pair); ``_grow`` / ``_decay`` are
    the arithmetic, ``_read`` / ``_write`` the model access (live, through the knob's refs).
    """

    hold: int

    def _decide(self, snapshot: Snapshot) -> list[CollapseEvent]:
        events = []
        for knob in self.knobs:
            if knob.lost:
                continue
            firing = self.firing(knob.layers)
            knob.quiet = 0 if firing else knob.quiet + 1
            decision, why = knob_policy(firing, knob.quiet, knob.value == knob.base, self.hold)
            if decision not in (GROW, DECAY):
                continue
            old = knob.value
            new = self._grow(knob) if decision == GROW else self._decay(knob)
            if new == old:
                continue
            self._set(knob, new)
            text = f"[train step {snapshot.step}] {knob.label}: {self._change(old, new)} because {why}"
            events.append(_event(snapshot.step, knob.label, self.rule, self._number(new), self._number(old), text))
        return events

    def _set(self, knob: _Knob, value: Any) -> None:
        knob.value = value
        assert self._model is not None
        self._write(self._model, knob, value)

    def _knob_state(self) -> dict[str, Any]:
        return {"knobs": {k.label: {**self._encode(k.base, k.value), "quiet": k.quiet} for k in self.knobs}}

    def _load_knob_state(self, state: dict[str, Any]) -> None:
        for knob in self.knobs:
            saved = state.get("knobs", {}).get(knob.label)
            if saved is not None and self._verify(knob):
                knob.base, value = self._decode(saved)
                knob.quiet = int(saved["quiet"])
                self._set(knob, value)

    # Subclass hooks.
    def _grow(self, knob: _Knob) -> Any:
        raise NotImplementedError

    def _decay(self, knob: _Knob) -> Any:
        raise NotImplementedError

    def _write(self, model: nn.Module, knob: _Knob, value: Any) -> None:
        raise NotImplementedError

    def _change(self, old: Any, new: Any) -> str:
        raise NotImplementedError

    def _number(self, value: Any) -> float:
        raise NotImplementedError

    def _encode(self, base: Any, value: Any) -> dict[str, Any]:
        raise NotImplementedError

    def _decode(self, saved: dict[str, Any]) -> tuple[Any, Any]:
        raise NotImplementedError


class AuxLossController(_AlertKnobController):
    """Multiplies the load-balancing loss coefficient while a collapse alert fires, then decays it back.

    Per window (see :func:`knob_policy`): if an alert in ``triggers`` fires on a layer the knob serves,
    ``coef <- min(max(coef * growth, floor), max_coef)`` (the floor lets it start from a model trained without aux
    loss). Once no trigger has fired for ``hold`` windows, the coefficient decays geometrically toward its original
    value, ``coef <- base + (coef - base) * decay``, and snaps to ``base`` once within 5 % of ``max(base, floor)``
    (or, for a base below the floor, once under the floor). If the collapse returns, the alert fires again and the
    coefficient grows again.

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
        ``controller/aux_loss/<layer>/coef`` per knob that still reaches its router (``<layer>`` is ``all`` for one
        model-wide knob), ``controller/aux_loss/max_coef`` and ``controller/aux_loss/active_knobs``.

    Example:
        >>> from moe_monitor.monitor import RouterMonitor
        >>> from moe_monitor.reference import MoEConfig, MoETransformer
        >>> from moe_monitor.detect import make_snapshot
        >>> model = MoETransformer(MoEConfig(d_model=16, n_layers=1, n_heads=2, seq_len=8, n_experts=4, d_expert=8))
        >>> ctl = AuxLossController()
        >>> ctl.setup(model, RouterMonitor(model))
        >>> alert = CollapseEvent(5, "train", "blocks.0.moe.router", "load_entropy", 0.2, 0.6, "critical", "...")
        >>> [e.value for e in ctl.on_window(make_snapshot([[9, 1, 0, 0]], step=5), [alert])]
        [0.02]
        >>> model.blocks[0].moe.router.aux_loss_coef
        0.02
    """

    name = "aux_loss"
    rule = "aux_loss_coef"

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

    def _bind(self, model: nn.Module, layers: list[tuple[Any, LayerKnobs]]) -> list[_Knob]:
        missing = [layer.name for layer, knobs in layers if not knobs.aux_loss_coef]
        if missing:
            raise ValueError(
                f"AuxLossController needs an aux-loss coefficient to turn, but layers {missing} have no "
                "`aux_loss_coef` and no module has `router_aux_loss_coef`. Models that have one: the reference "
                "model (Router.aux_loss_coef) and Hugging Face MoE causal LMs such as Mixtral, Qwen2-MoE, OLMoE "
                "(`router_aux_loss_coef`)."
            )
        inert = next((knobs.inert for _, knobs in layers if knobs.inert), "")
        if inert:
            raise ValueError(f"AuxLossController: {inert} (or leave AuxLossController out of the controllers).")
        out = []
        for refs, names in _group(model, [(layer, knobs.aux_loss_coef) for layer, knobs in layers]):
            value = refs[0].get(model)
            if not _is_number(value):
                raise ValueError(f"AuxLossController: {refs[0].label} is {value!r}, not a number.")
            label = names[0] if len(names) == 1 else "all"
            out.append(_Knob(label, names, refs, float(value), float(value)))
        return out

    def _problem(self, knob: _Knob) -> str:
        assert self._model is not None
        for ref in knob.refs:
            value = ref.get(self._model)
            if not _is_number(value):
                return f"{ref.label} is {'gone' if value is None else repr(value)}, not a number"
        return ""

    def _grow(self, knob: _Knob) -> float:
        return min(max(knob.value * self.growth, self.floor), max(self.max_coef, knob.base))

    def _decay(self, knob: _Knob) -> float:
        new = knob.base + (knob.value - knob.base) * self.decay
        if new - knob.base < 0.05 * max(knob.base, self.floor) or (knob.base < self.floor > new):
            return knob.base
        return new

    def _write(self, model: nn.Module, knob: _Knob, value: float) -> None:
        for ref in knob.refs:
            ref.set(model, value)

    def _change(self, old: float, new: float) -> str:
        return f"aux_loss_coef {old:.4g} -> {new:.4g} (cap {self.max_coef:.3g})"

    def _number(self, value: float) -> float:
        return value

    def _encode(self, base: float, value: float) -> dict[str, Any]:
        return {"base": base, "value": value}

    def _decode(self, saved: dict[str, Any]) -> tuple[float, float]:
        return float(saved["base"]), float(saved["value"])

    def metrics(self) -> dict[str, float]:
        live = [k for k in self.knobs if not k.lost]
        out = {f"controller/{self.name}/{k.label}/coef": k.value for k in live}
        if live:
            out[f"controller/{self.name}/max_coef"] = max(k.value for k in live)
        return {**out, **super().metrics()}


NOISE_DEFAULTS: dict[str, tuple[float, float]] = {"gaussian": (0.05, 0.5), "jitter": (0.05, 0.5)}


class RouterNoiseController(_AlertKnobController):
    """Raises router noise while a collapse alert fires and anneals it back afterwards.

    Noise makes the router try experts it has stopped choosing, so they get gradient again. Per window on a
    collapsing layer (see :func:`knob_policy`) ``std <- min(max(std * growth, start_std), max_std)`` with the noise
    switched to ``kind``; after ``hold`` windows without a trigger, ``std <- std * decay`` until it falls below
    ``start_std`` (or the original level), when the layer's original noise setting is restored.

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
        ``controller/noise/<layer>/std`` per layer whose knob still reaches its router, ``controller/noise/max_std``
        and ``controller/noise/active_knobs``.

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
    rule = "router_noise"

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
        if hold < 0:
            raise ValueError(f"hold={hold} must be a non-negative number of windows.")
        self.kind, self.start_std, self.max_std = kind, start_std, max_std
        self.growth, self.decay, self.hold = growth, decay, hold

    def _bind(self, model: nn.Module, layers: list[tuple[Any, LayerKnobs]]) -> list[_Knob]:
        out = []
        for layer, knobs in layers:
            if knobs.noise is not None:
                kind_ref, std_ref = knobs.noise
                value = (kind_ref.get(model), float(std_ref.get(model)))
                out.append(_Knob(layer.name, (layer.name,), knobs.noise, value, value))
                continue
            if knobs.jitter is None:
                raise ValueError(
                    f"RouterNoiseController needs a router noise knob, but layer {layer.name!r} has neither "
                    "`noise`/`noise_std` (reference model Router) nor `jitter_noise` (Hugging Face Mixtral "
                    "MoE block). Leave RouterNoiseController out of the controllers for this model."
                )
            if self.kind == "gaussian":
                raise ValueError(
                    f"RouterNoiseController(kind='gaussian'): layer {layer.name!r} only has `jitter_noise` "
                    "(Mixtral); use kind='jitter' or None."
                )
            std = float(knobs.jitter.get(model))
            value = ("jitter" if std else "none", std)
            out.append(_Knob(layer.name, (layer.name,), (knobs.jitter,), value, value))
        return out

    def _problem(self, knob: _Knob) -> str:
        assert self._model is not None
        *kind_refs, std_ref = knob.refs
        std = std_ref.get(self._model)
        if not _is_number(std):
            return f"{std_ref.label} is {'gone' if std is None else repr(std)}, not a number"
        for ref in kind_refs:
            kind = ref.get(self._model)
            if kind not in ("none", *NOISE_DEFAULTS):
                return f"{ref.label} is {kind!r}, not one of 'none', {', '.join(map(repr, NOISE_DEFAULTS))}"
        return ""

    def _kind_for(self, knob: _Knob) -> str:
        if self.kind is not None:
            return self.kind
        if knob.base[0] != "none":
            return knob.base[0]
        return "gaussian" if len(knob.refs) == 2 else "jitter"

    def _levels(self, kind: str) -> tuple[float, float]:
        start, cap = NOISE_DEFAULTS[kind]
        start = self.start_std if self.start_std is not None else start
        cap = self.max_std if self.max_std is not None else cap
        return start, max(cap, start)

    def _grow(self, knob: _Knob) -> tuple[str, float]:
        kind = self._kind_for(knob)
        start, cap = self._levels(kind)
        level = knob.value[1] if knob.value[0] == kind else 0.0
        return kind, min(max(level * self.growth, start), cap)

    def _decay(self, knob: _Knob) -> tuple[str, float]:
        (kind, std), (base_kind, base_std) = knob.value, knob.base
        floor = max(self._levels(self._kind_for(knob))[0], base_std if kind == base_kind else 0.0)
        return knob.base if std * self.decay < floor else (kind, std * self.decay)

    def _write(self, model: nn.Module, knob: _Knob, value: tuple[str, float]) -> None:
        kind, std = value
        if len(knob.refs) == 2:
            knob.refs[0].set(model, kind)
            knob.refs[1].set(model, std)
        else:
            knob.refs[0].set(model, std if kind != "none" else 0.0)

    def _change(self, old: tuple[str, float], new: tuple[str, float]) -> str:
        return f"router noise {old[0]} {old[1]:.3g} -> {new[0]} {new[1]:.3g}"

    def _number(self, value: tuple[str, float]) -> float:
        return value[1]

    def _encode(self, base: tuple[str, float], value: tuple[str, float]) -> dict[str, Any]:
        return {"base_kind": base[0], "base_std": base[1], "kind": value[0], "std": value[1]}

    def _decode(self, saved: dict[str, Any]) -> tuple[tuple[str, float], tuple[str, float]]:
        return (saved["base_kind"], float(saved["base_std"])), (saved["kind"], float(saved["std"]))

    def metrics(self) -> dict[str, float]:
        out = {
            f"controller/{self.name}/{k.label}/std": (k.value[1] if k.value[0] != "none" else 0.0)
            for k in self.knobs
            if not k.lost
        }
        if out:
            out[f"controller/{self.name}/max_std"] = max(out.values())
        return {**out, **super().metrics()}


class ExpertBiasController(Controller):
    """Auxiliary-loss-free balancing (Wang et al. 2024, DeepSeek-V3): a per-expert selection bias.

    After every optimizer step, with ``count_E`` that step's assignments per expert of a layer (summed over
    processes),
    ``bias_E += rate * sign(mean(count_E) - count_E)`` and then ``bias_E -= mean(bias_E)``. The bias is added to
    the router scores for choosing experts only, never to the combine weights, so it steers load without a
    gradient that competes with the language-model loss.

    The controller owns its step counter: a step's counts are the growth of ``monitor.window_counts("train")``
    since the counts it read at the previous step. When the monitor's window has restarted since (a ``collect``),
    the counts are that step's alone: :meth:`on_window` says so for the window it is shown, and a layer whose
    counts fell (a ``collect`` no window was shown for) is read as restarted too, never as a negative step.
    Everything stays on the device: one ``all_reduce`` of the ``[L, E]`` counts when ``torch.distributed`` is
    initialised, no host sync, and every process applies the identical update. The bias tensor is looked up in the
    model at every step, so a device move or precision conversion after :meth:`setup` changes nothing.

    It acts every step, but it tells the user (a ``kind="control"`` event) only when something material happened:
    at the first window with updates, and whenever a layer's bias range (max - min) has doubled or halved since the
    last event of that layer. A run of a thousand windows thus gets a handful of events per layer, not one per
    window; the per-window values are in :meth:`metrics`.

    Args:
        rate: bias step per optimizer step, in units of the router scores (softmax probabilities on the reference
            model, sigmoid scores on DeepSeek-V3). 1e-3 as in Wang et al. 2024.
        triggers: deprecated and ignored (the controller acts at every step, whatever the detector says); giving
            it warns.

    Logged metrics:
        ``controller/bias/<layer>/max_abs`` (largest ``|bias|``) and ``controller/bias/<layer>/range`` (max - min)
        per layer whose bias still reaches its router, ``controller/bias/updates`` and
        ``controller/bias/active_knobs``.

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
        >>> model = model.double()  # replaces the bias buffer: the controller follows it
        >>> _ = model(torch.randint(0, 256, (2, 8)))  # one training step's forward
        >>> ctl.on_train_step(monitor, step=1)
        >>> count_E, bias_E = monitor.window_counts()[0], model.blocks[0].moe.router.expert_bias
        >>> step_E = 0.01 * torch.sign(count_E.mean() - count_E)  # the update, then mean-centred
        >>> torch.allclose(bias_E, step_E - step_E.mean())
        True
    """

    name = "bias"
    rule = "expert_bias"

    def __init__(self, rate: float = 1e-3, triggers: Iterable[str] | None = None) -> None:
        super().__init__(())
        if triggers is not None:
            warnings.warn(
                "ExpertBiasController(triggers=...) is deprecated and ignored: the bias controller acts at every "
                "optimizer step, whatever the detector says. Drop the argument.",
                FutureWarning,
                stacklevel=2,
            )
        if not rate > 0:
            raise ValueError(f"rate={rate} must be positive.")
        self.rate = rate
        self.updates = 0
        self._last_reported = 0
        # Bias range (max - min) of each layer at its last event; a layer without an event yet is absent.
        self._reported_range: dict[str, float] = {}
        self._prev_counts_LE: torch.Tensor | None = None

    @property
    def layer_names(self) -> list[str]:
        """The router layers whose bias this controller steers, in model order."""
        return [knob.label for knob in self.knobs]

    def _bind(self, model: nn.Module, layers: list[tuple[Any, LayerKnobs]]) -> list[_Knob]:
        out = []
        for layer, knobs in layers:
            ref = knobs.expert_bias
            if ref is None:
                raise ValueError(
                    f"ExpertBiasController needs a per-expert selection bias, but layer {layer.name!r} has none. "
                    "Build the reference model with MoEConfig(expert_bias=True) (router buffer `expert_bias`), or "
                    "use a model whose family has one: Hugging Face DeepSeek-V3 (`e_score_correction_bias`), "
                    "torchtitan (`expert_bias_E`), OLMo-core (`score_bias`), Megatron-Core (`expert_bias`)."
                )
            if getattr(model.get_submodule(ref.path), "kind", "token_choice") == "expert_choice":
                raise ValueError(
                    f"ExpertBiasController: layer {layer.name!r} uses expert-choice routing, which ignores "
                    "expert_bias (a per-expert shift cannot change an expert's top-C tokens); use token choice, or "
                    "leave ExpertBiasController out of the controllers."
                )
            bias = ref.get(model)
            if not isinstance(bias, torch.Tensor) or bias.shape != (layer.num_experts,):
                raise ValueError(
                    f"ExpertBiasController: layer {layer.name!r} has {layer.num_experts} experts but its bias "
                    f"{ref.label} is {_describe(bias)}; it must be a float tensor of shape [{layer.num_experts}]."
                )
            out.append(_Knob(layer.name, (layer.name,), (ref,), None, None, size=int(layer.num_experts)))
        self._prev_counts_LE = None
        return out

    def _problem(self, knob: _Knob) -> str:
        assert self._model is not None
        (ref,) = knob.refs
        bias = ref.get(self._model)
        if not isinstance(bias, torch.Tensor) or not bias.is_floating_point() or bias.shape != (knob.size,):
            return f"{ref.label} is {_describe(bias)}, not a float tensor of shape [{knob.size}]"
        return ""

    def _biases(self, step: int | None = None) -> list[tuple[int, torch.Tensor]]:
        """``(layer index, bias tensor)`` of every knob that still reaches its router, resolved now."""
        assert self._model is not None
        return [(i, knob.refs[0].get(self._model)) for i, knob in enumerate(self.knobs) if self._verify(knob, step)]

    def on_train_step(self, monitor: Any, step: int) -> None:
        """Applies one step's update to every layer's bias (device ops only, no host sync).

        Across processes the step's counts are all-reduced even where no bias is left to update (a pipeline stage
        without routers, knobs lost on this process only): the collective must not depend on what one process holds.
        """
        self._step = step
        biases = self._biases()
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if not biases and not distributed:
            return
        counts_LE = monitor.window_counts("train")
        prev_LE = self._prev_counts_LE
        if prev_LE is None:
            step_counts_LE = counts_LE.clone(memory_format=torch.contiguous_format)
        else:
            # A layer whose counts fell had its window restarted: this step's counts are all it has.
            restarted_L1 = (counts_LE < prev_LE).any(dim=1, keepdim=True)
            step_counts_LE = torch.where(restarted_L1, counts_LE, counts_LE - prev_LE)
        # A fresh tensor: the live window view must stay untouched (and the collective needs a contiguous one).
        self._prev_counts_LE = counts_LE.clone()
        if distributed:
            torch.distributed.all_reduce(step_counts_LE, group=monitor.process_group)
        rows = getattr(monitor, "rows", None)
        with torch.no_grad():
            for i, bias_E in biases:
                # The knobs follow monitor.layers; their counts sit in the layer's snapshot row.
                row = i if rows is None else rows[i]
                count_E = step_counts_LE[row, : self.knobs[i].size].to(bias_E.device, torch.float32)
                bias_E.add_(torch.sign(count_E.mean() - count_E).to(bias_E.dtype), alpha=self.rate)
                bias_E.sub_(bias_E.mean())
        self.updates += 1

    def on_window(self, snapshot: Snapshot, events: Sequence[CollapseEvent]) -> list[CollapseEvent]:
        if snapshot.phase != "train":
            return []
        # The window shown has just been closed: the next step's counts start from zero.
        self._prev_counts_LE = None
        self._step = snapshot.step
        biases = dict(self._biases())
        out, self._lost_events = self._lost_events, []
        if self.updates == self._last_reported or not biases:
            return out
        self._last_reported = self.updates
        for i, bias_E in biases.items():
            name = self.knobs[i].label
            b = bias_E.detach().double().cpu()
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
                    self.rule,
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
        for i, bias_E in self._biases():
            b = bias_E.detach().double().cpu()
            out[f"controller/{self.name}/{self.knobs[i].label}/max_abs"] = float(b.abs().max())
            out[f"controller/{self.name}/{self.knobs[i].label}/range"] = float(b.max() - b.min())
        out[f"controller/{self.name}/updates"] = float(self.updates)
        return {**out, **super().metrics()}

    def _knob_state(self) -> dict[str, Any]:
        return {
            "bias": {self.knobs[i].label: bias_E.detach().cpu().clone() for i, bias_E in self._biases()},
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
            for i, bias_E in self._biases():
                saved = state.get("bias", {}).get(self.knobs[i].label)
                if saved is not None:
                    bias_E.copy_(torch.as_tensor(saved).to(bias_E.device, bias_E.dtype))


def merge_metrics(per_process: Sequence[dict[str, float]]) -> dict[str, float]:
    """One controller's :meth:`~Controller.metrics` of every process, merged: ``active_knobs`` summed (each process
    counts its own knobs), every other key the largest value (a per-layer key comes from the one process that holds
    the layer; ``max_*`` keys are maxima; ``updates`` is the same everywhere).

    Example:
        >>> stage0 = {"controller/bias/active_knobs": 0.0, "controller/bias/updates": 3.0}  # no routers here
        >>> stage1 = {"controller/bias/active_knobs": 2.0, "controller/bias/updates": 3.0, "controller/bias/b/max": 0.1}
        >>> merge_metrics([stage0, stage1])
        {'controller/bias/active_knobs': 2.0, 'controller/bias/updates': 3.0, 'controller/bias/b/max': 0.1}
    """
    merged: dict[str, float] = {}
    for metrics in per_process:
        for key, value in metrics.items():
            if key not in merged:
                merged[key] = value
            elif key.endswith("/active_knobs"):
                merged[key] += value
            else:
                merged[key] = max(merged[key], value)
    return merged


def share_across_stages(
    controllers: Sequence[Controller],
    monitor: Any,
    events: Sequence[CollapseEvent],
    read_metrics: Callable[[Controller], dict[str, float]],
) -> tuple[list[CollapseEvent], list[dict[str, float]] | None]:
    """Every pipeline stage's control events and controller metrics of one window, on every process.

    A collective over ``monitor.process_group`` (one ``all_gather_object``) when ``monitor.pipelined``: every
    process must call it at the same window; otherwise it returns ``(events, None)`` at once.

    Args:
        controllers: the controllers, the same kinds in the same order on every process.
        monitor: their :class:`~moe_monitor.monitor.RouterMonitor`.
        events: this window's events on this process (the detector's, then the controllers').
        read_metrics: reads one controller's metrics (``{}`` when that fails).

    Returns:
        The events with every process's control events in process order (the detector's are the same everywhere),
        and per controller its metrics merged by :func:`merge_metrics` (``None`` when not pipelined).

    Example:
        >>> from moe_monitor.monitor import RouterMonitor
        >>> from moe_monitor.reference import MoEConfig, MoETransformer
        >>> model = MoETransformer(MoEConfig(d_model=16, n_layers=1, n_heads=2, seq_len=8, n_experts=4, d_expert=8))
        >>> share_across_stages([], RouterMonitor(model), [], lambda c: c.metrics())  # one process: nothing to share
        ([], None)
    """
    if not getattr(monitor, "pipelined", False):
        return list(events), None
    local = ([e for e in events if e.kind == "control"], [read_metrics(c) for c in controllers])
    gathered: list[Any] = [None] * torch.distributed.get_world_size(monitor.process_group)
    torch.distributed.all_gather_object(gathered, local, group=monitor.process_group)
    shared = [e for e in events if e.kind != "control"] + [e for control, _ in gathered for e in control]
    return shared, [merge_metrics([metrics[i] for _, metrics in gathered]) for i in range(len(controllers))]


CONTROLLERS: dict[str, type[Controller]] = {
    "aux": AuxLossController,
    "noise": RouterNoiseController,
    "bias": ExpertBiasController,
}


def make_controllers(names: str | Iterable[str] | None) -> list[Controller]:
    """Controllers by short name: ``"aux"``, ``"noise"``, ``"bias"`` (a comma-separated string or a list).

    An empty string, ``"none"`` or ``None`` means no controller.

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
