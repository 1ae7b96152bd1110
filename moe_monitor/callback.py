r"""MoE Monitor
===========

Watches every Mixture-of-Experts router of a Lightning module while it trains: windowed routing statistics to
every logger, rich TensorBoard / W&B views, collapse alerts, optional controllers, all saved in checkpoints.

Shape legend: ``L`` router layers, ``E`` experts, ``B`` batch, ``S`` sequence.
"""

from __future__ import annotations

import contextlib
import logging
import os
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict
from typing import Any, Literal

import lightning.pytorch as pl
import pandas as pd
import torch
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from moe_monitor.detect import EVENT_COLUMNS, CollapseDetector, CollapseEvent
from moe_monitor.monitor import NoRoutersFoundError, RouterMonitor
from moe_monitor.sinks.base import Sink
from moe_monitor.sinks.scalars import ScalarSink, scalar_metrics
from moe_monitor.snapshot import Snapshot

log = logging.getLogger(__name__)

_CONTROLLER_METHODS = ("setup", "on_train_step", "on_window", "metrics", "state_dict", "load_state_dict")
_STATE_VERSION = 1
# Forwards of the sanity-check validation go to a phase that is never collected, so they are never counted.
_SANITY_PHASE = "sanity_check"
_DISTRIBUTED_DIR = os.path.dirname(torch.distributed.__file__) + os.sep


class MoEMonitor(Callback):
    r"""Monitors the routers of a Mixture-of-Experts model during ``fit``, ``validate`` and ``test``.

    ``Trainer(callbacks=[MoEMonitor()])`` is all it takes: at ``setup`` a
    :class:`~moe_monitor.monitor.RouterMonitor` hooks every router of the LightningModule; every
    ``log_every_n_steps`` optimizer steps the training window is closed (all micro-batches of gradient accumulation
    and all processes included), checked by the collapse detector, shown to the controllers and logged; each
    validation run (sanity check excluded) and each test run is one window of phase ``"val"`` / ``"test"``. An
    ``attention_mask`` in a dict-like batch (``Mapping``, Hugging Face ``BatchEncoding``) excludes padding.

    Windows stay aligned to multiples of ``log_every_n_steps``, so some are shorter: the steps left when ``fit``
    ends, and the first window after resuming from a checkpoint written mid-window (its counts so far are not in
    the checkpoint). A training window of fewer than half of ``log_every_n_steps`` steps is logged but not shown to
    the detector, whose thresholds and patience are meant for full windows; the controllers still see it, with no
    new detector events (they act on the alerts of full windows).

    The hooks are removed at ``teardown`` and when the run raises. At the end of ``fit``, rank zero writes the
    history (``layers.csv``, ``experts.csv``, ``events.csv``) to ``<trainer.log_dir>/moe_monitor`` (or
    ``<default_root_dir>/moe_monitor`` without a logger); it stays in memory too: :meth:`layer_frame`,
    :meth:`expert_frame`, :meth:`event_frame`. A failing logger, detector, controller or missing optional
    package warns once and never stops training. An error raised inside ``torch.distributed`` (a broken process
    group) is not caught: swallowed on one process, it would leave the others waiting in the next collective.

    **Logged metrics** (through every logger of the trainer, at ``step=trainer.global_step``, rank zero only;
    ``<phase>`` is ``train``, ``val`` or ``test``; ``<LL>`` is the router's index in model order, ``L00``, ``L01``,
    ...; the module path of each label is the ``layer`` column of :meth:`layer_frame`, its index ``layer_index``):

    - ``moe/<phase>/<stat>/<LL>`` for each statistic of SPEC §3: ``dropped_fraction``, ``load_entropy``,
      ``max_violation``, ``cv``, ``gini``, ``dead_experts``, ``aux_loss``, ``z_loss``, ``router_entropy``,
      ``top1_confidence`` (NaN values, e.g. for a router without logits, are not logged).
    - ``moe/<phase>/all/min_load_entropy``, ``moe/<phase>/all/max_max_violation``: the worst layer.
    - ``moe/<phase>/all/dropped_fraction``: dropped / selected assignments over all layers.
    - ``moe/<phase>/all/layers_with_dead_experts``: layers with an expert that got no token in the window.
    - ``moe/<phase>/load/<LL>/E<EE>``: each expert's share of its layer's assignments, only with
      ``log_expert_loads=True``.
    - Each controller's ``metrics()``, e.g. ``controller/aux_loss/max_coef``, per training window.

    TensorBoard also gets ``moe/<phase>/expert_load/<LL>`` histograms (one bucket per expert),
    ``moe/<phase>/load_heatmap`` images, a CUSTOM SCALARS layout with one chart per statistic across layers,
    and ``moe/events`` text; W&B gets the same histograms and heatmaps plotted against ``trainer/global_step``,
    ``wandb.alert`` for warning and critical alerts, and ``moe/layer_frame`` / ``moe/events`` tables at the end
    of ``fit``.

    Args:
        log_every_n_steps: optimizer steps per training window; ``None`` uses the trainer's
            ``log_every_n_steps``.
        log_expert_loads: also log one scalar per (layer, expert).
        log_histograms: write expert-load histograms to TensorBoard and W&B.
        log_heatmaps: write layer x expert load heatmaps to TensorBoard and W&B (needs matplotlib:
            ``pip install "moe-monitor[plots]"``).
        routers: manual router registration, passed to :class:`~moe_monitor.monitor.RouterMonitor`.
        detector: a :class:`~moe_monitor.detect.CollapseDetector`; ``"default"`` builds one with its default
            thresholds; ``None`` disables detection.
        controllers: controllers from :mod:`moe_monitor.controllers` that adjust the model from the statistics.
        on_alert: called on rank zero with each new alert (``CollapseEvent`` of kind ``"alert"``).
        stop_on_collapse: set ``trainer.should_stop`` on the first critical alert. The alert comes from
            statistics reduced over all processes, so every process stops at the same step.
        save_frames: write the history to ``<log_dir>/moe_monitor`` at the end of ``fit``.

    Raises:
        MisconfigurationException: an argument is of the wrong type or out of range; the message lists what is
            allowed.
        NoRoutersFoundError: at ``setup``, when the module has no router it can recognise; the message says how to
            name routers in ``MoEMonitor(routers=[...])``, relative to the LightningModule.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> monitor = MoEMonitor(log_every_n_steps=10)
        >>> trainer = Trainer(callbacks=[monitor], logger=False, enable_progress_bar=False)
        >>> monitor.state_key
        "MoEMonitor{'log_every_n_steps': 10, 'routers': None, 'controllers': ()}"
        >>> MoEMonitor(log_every_n_steps=0)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        lightning.fabric.utilities.exceptions.MisconfigurationException: log_every_n_steps=0 is not valid; ...
    """

    def __init__(
        self,
        log_every_n_steps: int | None = None,
        log_expert_loads: bool = False,
        log_histograms: bool = True,
        log_heatmaps: bool = True,
        routers: Sequence[Any] | None = None,
        detector: CollapseDetector | Literal["default"] | None = "default",
        controllers: Iterable[Any] = (),
        on_alert: Callable[[CollapseEvent], Any] | None = None,
        stop_on_collapse: bool = False,
        save_frames: bool = True,
    ) -> None:
        if log_every_n_steps is not None and (
            isinstance(log_every_n_steps, bool) or not isinstance(log_every_n_steps, int) or log_every_n_steps < 1
        ):
            raise MisconfigurationException(
                f"log_every_n_steps={log_every_n_steps!r} is not valid; choose a positive integer or None (the"
                " trainer's log_every_n_steps)."
            )
        flags = {
            "log_expert_loads": log_expert_loads,
            "log_histograms": log_histograms,
            "log_heatmaps": log_heatmaps,
            "stop_on_collapse": stop_on_collapse,
            "save_frames": save_frames,
        }
        for name, value in flags.items():
            if not isinstance(value, bool):
                raise MisconfigurationException(f"{name}={value!r} is not valid; choose True or False.")
        if isinstance(routers, (str, bytes)) or (routers is not None and not isinstance(routers, Sequence)):
            raise MisconfigurationException(
                f"routers={routers!r} is not valid; choose None (find routers automatically) or a list of module"
                " names, modules or `moe_monitor.RouterSpec`s."
            )
        if isinstance(detector, str) and detector == "default":
            detector = CollapseDetector()
        elif detector is not None and not all(
            callable(getattr(detector, m, None)) for m in ("update", "state_dict", "load_state_dict")
        ):
            raise MisconfigurationException(
                f"detector={detector!r} is not valid; choose 'default', None (no detection) or a"
                " `moe_monitor.CollapseDetector`."
            )
        controllers = tuple(controllers)
        for controller in controllers:
            missing = [m for m in _CONTROLLER_METHODS if not callable(getattr(controller, m, None))]
            if missing:
                raise MisconfigurationException(
                    f"controllers contains {controller!r}, which lacks {', '.join(missing)}; choose controllers from"
                    " `moe_monitor.controllers` (AuxLossController, RouterNoiseController, ExpertBiasController)."
                )
        names = [_controller_name(c) for c in controllers]
        if len(set(names)) != len(names):
            raise MisconfigurationException(
                f"controllers have repeated names {names}; give each controller a distinct `name` so their"
                " checkpoint states do not collide."
            )
        if on_alert is not None and not callable(on_alert):
            raise MisconfigurationException(f"on_alert={on_alert!r} is not valid; choose None or a callable(event).")

        self.log_every_n_steps = log_every_n_steps
        self.log_expert_loads = log_expert_loads
        self.log_histograms = log_histograms
        self.log_heatmaps = log_heatmaps
        self.routers = routers
        self.detector: CollapseDetector | None = detector
        self.controllers: tuple[Any, ...] = controllers
        self.on_alert = on_alert
        self.stop_on_collapse = stop_on_collapse
        self.save_frames = save_frames

        self.monitor: RouterMonitor | None = None
        self.events: list[CollapseEvent] = []
        self.stopped_by_collapse = False
        self._sinks: list[Sink] = []
        self._interval = 1
        self._seen_step = 0
        self._window_steps = 0  # optimizer steps in the open training window
        self._pending_state: dict[str, Any] | None = None
        self._pending_controller_state: dict[str, Any] = {}
        self._controllers_ready = False
        self._phase_scope = contextlib.ExitStack()
        self._hooked = False
        self._deferred = False
        self._stage: str | None = None
        self._warned: set[str] = set()

    # ------------------------------------------------------------------------------------------------- state
    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            log_every_n_steps=self.log_every_n_steps,
            routers=None if self.routers is None else tuple(_router_name(r) for r in self.routers),
            controllers=tuple(_controller_name(c) for c in self.controllers),
        )

    def state_dict(self) -> dict[str, Any]:
        """History of the monitor, detector and controllers, and the window bookkeeping (plain Python types)."""
        if self._pending_state is not None:  # restored but not applied yet: hand it on unchanged
            return dict(self._pending_state)
        controllers = {_controller_name(c): c.state_dict() for c in self.controllers}
        controllers.update(self._pending_controller_state)
        return {
            "version": _STATE_VERSION,
            "monitor": None if self.monitor is None else self.monitor.state_dict(),
            "detector": None if self.detector is None else self.detector.state_dict(),
            "controllers": controllers,
            "events": [_event_record(e) for e in self.events],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`; what belongs to the monitor waits for ``setup`` if it has not run yet.

        Only ``fit`` resumes from a checkpoint: Lightning also restores callbacks for ``validate`` / ``test`` /
        ``predict`` with a ``ckpt_path``, and those runs keep the current history, detector and controllers.
        """
        if self._stage not in (None, "fit"):
            return
        if state_dict.get("version") != _STATE_VERSION:
            raise ValueError(f"Unsupported MoEMonitor state version {state_dict.get('version')!r}.")
        self._pending_state = state_dict
        if self.monitor is not None:  # Lightning restores checkpoints after `setup`
            self._apply_pending_state()

    def _apply_pending_state(self) -> None:
        state, self._pending_state = self._pending_state, None
        if state is None:
            return
        if self.monitor is not None and state.get("monitor") is not None:
            self.monitor.load_state_dict(state["monitor"])
        if self.detector is not None and state.get("detector") is not None:
            self.detector.load_state_dict(state["detector"])
        self.events = [CollapseEvent(**{**e, "experts": tuple(e["experts"])}) for e in state.get("events", [])]
        # Controllers re-apply their knobs on load, which needs their `setup` (done at the start of fit) first.
        self._pending_controller_state = dict(state.get("controllers", {}))
        if self._controllers_ready:
            self._load_controller_state()

    def _load_controller_state(self) -> None:
        for controller in self.controllers:
            controller_state = self._pending_controller_state.pop(_controller_name(controller), None)
            if controller_state is not None:
                controller.load_state_dict(controller_state)

    # ------------------------------------------------------------------------------------------------- frames
    def layer_frame(self) -> pd.DataFrame:
        """Per (window, layer) statistics so far; see :meth:`RouterMonitor.layer_frame` (empty before setup)."""
        if self.monitor is None:
            return pd.DataFrame()
        return self.monitor.layer_frame()

    def expert_frame(self) -> pd.DataFrame:
        """Per (window, layer, expert) counts and loads so far (empty before setup)."""
        if self.monitor is None:
            return pd.DataFrame()
        return self.monitor.expert_frame()

    def event_frame(self) -> pd.DataFrame:
        """Every alert, recovery and control event so far, one row each."""
        return pd.DataFrame([_event_record(e) for e in self.events], columns=list(EVENT_COLUMNS))

    # ------------------------------------------------------------------------------------------------- setup
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._stage = stage  # Lightning restores a checkpoint after `setup`: `load_state_dict` reads it
        if stage not in ("fit", "validate", "test"):
            return
        self._interval = self.log_every_n_steps or max(1, int(trainer.log_every_n_steps))
        self._sinks = self._make_sinks(trainer) if trainer.is_global_zero else []
        try:
            self._attach(pl_module)
        except NoRoutersFoundError:
            # Routers built in `configure_model` only exist after `setup`; look again when the stage starts.
            if not is_overridden("configure_model", pl_module):
                raise
            self._deferred = True
            return
        if stage == "fit":
            self._setup_controllers(pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._deferred:
            self._attach(pl_module)
            self._setup_controllers(pl_module)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._deferred:
            self._attach(pl_module)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._deferred:
            self._attach(pl_module)
        self._enter_phase("test")

    def _attach(self, pl_module: pl.LightningModule) -> None:
        previous = self.monitor
        try:
            monitor = RouterMonitor(pl_module, routers=self.routers)
        except NoRoutersFoundError as err:
            hint = "" if "MoEMonitor(routers=" in str(err) else "\n" + _routers_hint(pl_module)
            raise NoRoutersFoundError(f"{err}{hint}") from err
        if previous is not None:
            # A second fit / validate / test with the same callback continues the same history.
            previous.remove()
            monitor.load_state_dict(previous.state_dict())
        self.monitor = monitor
        self._hooked, self._deferred = True, False
        self._apply_pending_state()

    def _setup_controllers(self, pl_module: pl.LightningModule) -> None:
        assert self.monitor is not None
        for controller in self.controllers:
            controller.setup(pl_module, self.monitor)
        self._controllers_ready = True
        self._load_controller_state()

    def _make_sinks(self, trainer: pl.Trainer) -> list[Sink]:
        from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

        if not trainer.loggers:
            rank_zero_warn(
                "MoEMonitor: the Trainer has no logger, so routing statistics go to no dashboard. The history is kept"
                " in memory (`MoEMonitor.layer_frame()`) and written to `<default_root_dir>/moe_monitor` at the end"
                " of fit.",
                category=RuntimeWarning,
            )
        sinks: list[Sink] = [ScalarSink(trainer.loggers)]
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                from moe_monitor.sinks.tensorboard import TensorBoardSink

                sinks.append(TensorBoardSink(logger, self.log_histograms, self.log_heatmaps))
            elif isinstance(logger, WandbLogger):
                from moe_monitor.sinks.wandb import WandbSink

                sinks.append(WandbSink(logger, self.log_histograms, self.log_heatmaps))
        return sinks

    # ------------------------------------------------------------------------------------------------- train
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._seen_step = trainer.global_step
        # The window opens with this fit: counts of a window left open by an earlier fit or a checkpoint are gone.
        self._window_steps = 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, *args: Any) -> None:
        self._set_mask(batch)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if not self._hooked or trainer.global_step == self._seen_step:
            return  # a micro-batch of gradient accumulation: the window keeps counting
        self._seen_step = step = trainer.global_step
        self._window_steps += 1
        for controller in self.controllers:
            self._safely(
                f"run {_controller_name(controller)}.on_train_step", controller.on_train_step, self.monitor, step
            )
        if step % self._interval == 0:
            self._train_window(trainer, step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._hooked and self._window_steps > 0:
            self._train_window(trainer, trainer.global_step)  # the steps since the last full window

    def _train_window(self, trainer: pl.Trainer, step: int) -> None:
        assert self.monitor is not None
        # Too few steps for the detector's thresholds and patience, which assume full windows (see class doc).
        short = 2 * self._window_steps < self._interval
        self._window_steps = 0
        snapshot = self._safely("close the training window", self.monitor.collect, step, "train")
        if snapshot is None:
            return
        events: list[CollapseEvent] = []
        if self.detector is not None and not short:
            events += self._safely("run the collapse detector", self.detector.update, snapshot) or []
        detected = list(events)
        for controller in self.controllers:
            name = _controller_name(controller)
            events += self._safely(f"run {name}.on_window", controller.on_window, snapshot, detected) or []
        self.events.extend(events)
        critical = [e for e in events if e.kind == "alert" and e.severity == "critical"]
        if self.stop_on_collapse and critical and not trainer.should_stop:
            trainer.should_stop = True
            self.stopped_by_collapse = True
            rank_zero_info(f"MoEMonitor: stopping at step {step} on a critical alert: {critical[0].message}")
        if not trainer.is_global_zero:
            return
        metrics = self._safely("compute scalars", scalar_metrics, snapshot, self.log_expert_loads) or {}
        for controller in self.controllers:
            metrics.update(self._safely(f"read {_controller_name(controller)}.metrics", controller.metrics) or {})
        self._publish(snapshot, metrics, events)
        for event in events:
            if event.kind == "alert":
                level = logging.WARNING if event.severity in ("warning", "critical") else logging.INFO
                log.log(level, "MoEMonitor %s alert at step %d: %s", event.severity, event.step, event.message)
                if self.on_alert is not None:
                    self._safely("call on_alert", self.on_alert, event)

    # ------------------------------------------------------------------------------------------ validation/test
    def on_sanity_check_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._enter_phase(_SANITY_PHASE)

    def on_sanity_check_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._phase_scope.close()

    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, *args: Any
    ) -> None:
        self._set_mask(batch)

    def on_test_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, *args: Any) -> None:
        self._set_mask(batch)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._hooked or trainer.sanity_checking:
            return
        self._eval_window(trainer, "val")

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._phase_scope.close()
        if self._hooked:
            self._eval_window(trainer, "test")

    def _eval_window(self, trainer: pl.Trainer, phase: str) -> None:
        assert self.monitor is not None
        self._set_mask(None)
        snapshot = self._safely(f"close the {phase} window", self.monitor.collect, trainer.global_step, phase)
        if snapshot is not None and trainer.is_global_zero:
            metrics = self._safely("compute scalars", scalar_metrics, snapshot, self.log_expert_loads) or {}
            self._publish(snapshot, metrics, [])

    # ------------------------------------------------------------------------------------------------- end
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._phase_scope.close()
        if stage == "fit" and self.monitor is not None:
            # `trainer.log_dir` is a broadcast: every process must ask for it, not only the one that writes.
            root = (trainer.log_dir or trainer.default_root_dir) if self.save_frames else None
            if trainer.is_global_zero:
                layer_frame, event_frame = self.layer_frame(), self.event_frame()
                for sink in self._sinks:
                    self._safely(f"finish the {sink.name} sink", sink.finish, layer_frame, event_frame)
                if root is not None:
                    self._safely("save the history", self._save, os.path.join(root, "moe_monitor"))
        self._detach()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._phase_scope.close()
        self._detach()

    def _detach(self) -> None:
        if self.monitor is not None:
            self.monitor.set_token_mask(None)
            self.monitor.remove()
        self._hooked = self._controllers_ready = False
        self._sinks = []

    def _save(self, path: str) -> None:
        assert self.monitor is not None
        self.monitor.save(path)
        self.event_frame().to_csv(os.path.join(path, "events.csv"), index=False)

    # ------------------------------------------------------------------------------------------------- helpers
    def _set_mask(self, batch: Any) -> None:
        if not self._hooked:
            return
        mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
        self.monitor.set_token_mask(mask if isinstance(mask, torch.Tensor) else None)

    def _enter_phase(self, phase: str) -> None:
        if self._hooked:
            self._phase_scope.close()
            self._phase_scope.enter_context(self.monitor.phase(phase))

    def _publish(self, snapshot: Snapshot, metrics: dict[str, float], events: Sequence[CollapseEvent]) -> None:
        for sink in self._sinks:
            self._safely(f"write to the {sink.name} sink", sink.log_window, snapshot, metrics, events)

    def _safely(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Runs one step of the monitor's own work; on error warns once per ``what`` and lets training go on.

        Errors raised inside ``torch.distributed`` (a collective on a broken process group) are re-raised: a
        process that carried on would leave the others waiting in their next collective.
        """
        try:
            return fn(*args)
        except Exception as err:  # the monitor must never kill the run it watches
            if _raised_in_distributed(err):
                raise
            if what not in self._warned:
                self._warned.add(what)
                rank_zero_warn(
                    f"MoEMonitor could not {what} ({type(err).__name__}: {err}); training goes on. Further failures"
                    " of this kind are not reported.",
                    category=RuntimeWarning,
                )
            return None


def _routers_hint(pl_module: pl.LightningModule) -> str:
    return (
        f"MoEMonitor looks for routers in the LightningModule ({type(pl_module).__name__}): register them with"
        " MoEMonitor(routers=[...]), names relative to the LightningModule as in `pl_module.named_modules()`, e.g."
        " MoEMonitor(routers=['model.blocks.0.moe.router']) when the network is its attribute `model`."
    )


def _raised_in_distributed(err: BaseException) -> bool:
    if isinstance(err, getattr(torch.distributed, "DistError", ())):
        return True
    # Gloo reports a lost peer as a plain RuntimeError: look for a torch.distributed frame where it was raised.
    return any(f.f_code.co_filename.startswith(_DISTRIBUTED_DIR) for f, _ in traceback.walk_tb(err.__traceback__))


def _controller_name(controller: Any) -> str:
    return str(getattr(controller, "name", type(controller).__name__))


def _router_name(router: Any) -> str:
    if isinstance(router, str):
        return router
    return str(getattr(router, "name", type(router).__name__))


def _event_record(event: CollapseEvent) -> dict[str, Any]:
    # Plain types only, so checkpoints load with `torch.load(weights_only=True)`.
    return {**asdict(event), "experts": list(event.experts)}
