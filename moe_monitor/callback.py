r"""MoE Monitor
===========

Watches every Mixture-of-Experts router of a Lightning module while it trains: windowed routing statistics to
every logger, rich TensorBoard / W&B views, collapse alerts, optional controllers, all saved in checkpoints.

Shape legend: ``L`` router layers, ``E`` experts, ``B`` batch, ``S`` sequence.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import pandas as pd
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from moe_monitor.detect import CollapseDetector, CollapseEvent, event_frame
from moe_monitor.monitor import NoRoutersFoundError, RouterMonitor
from moe_monitor.options import OptionsAccess, TrainerOptions, controller_name
from moe_monitor.sinks.console import ConsoleSink
from moe_monitor.watcher import STATE_VERSION, Watcher, console_sink

# Forwards of the sanity-check validation go to a phase that is never collected, so they are never counted.
_SANITY_PHASE = "sanity_check"
# Validation forwards of a domain count here first; at validation end they move to "val/<domain>" and to "val".
_DOMAIN_COUNTING = "validating:"
# Without a logger the history goes to <default_root_dir>/<_NO_LOGGER_DIR>/run_<N>/, one folder per fit.
_NO_LOGGER_DIR = "moe_runs"


class MoEMonitor(OptionsAccess, Callback):
    r"""Monitors the routers of a Mixture-of-Experts model during ``fit``, ``validate`` and ``test``.

    ``Trainer(callbacks=[MoEMonitor()])`` is all it takes: at ``setup`` a :class:`~moe_monitor.watcher.Watcher`
    hooks every router of the LightningModule; every ``log_every_n_steps`` optimizer steps the training window is
    closed (all micro-batches of gradient accumulation and all processes included), checked by the collapse
    detector, shown to the controllers and logged; each validation run (sanity check excluded) and each test run is
    one window of phase ``"val"`` / ``"test"``. An ``attention_mask`` in a dict-like batch (``Mapping``, Hugging Face
    ``BatchEncoding``) excludes padding. The callback only translates Lightning's hooks into the watcher's
    ``step`` / ``end_phase`` / ``flush``, so it behaves exactly like :class:`~moe_monitor.watcher.Watcher` in a
    plain loop and :class:`~moe_monitor.integrations.transformers.MoETrainerCallback` under the HF ``Trainer``.

    Windows stay aligned to multiples of ``log_every_n_steps``, so some are shorter: the steps left when ``fit``
    ends, and the first window after resuming from a checkpoint written mid-window (its counts so far are not in
    the checkpoint). A training window of fewer than half of ``log_every_n_steps`` steps is logged but not shown to
    the detector, whose thresholds and patience are meant for full windows; the controllers still see it, with no
    new detector events (they act on the alerts of full windows).

    Under DDP a process with no validation batch skips Lightning's whole validation loop, hooks included; so the
    validation window is reduced at the next point every process reaches (the next training window, the end of
    ``fit``, or ``teardown`` for ``validate`` / ``test``), still logged at the step it ran at. In one process it
    closes at once.

    The hooks are removed at ``teardown`` and when the run raises. Rank zero appends each window's rows to
    ``layers.csv``, ``experts.csv`` and ``events.csv`` beside the run of the trainer's first logger as the window
    closes: ``<trainer.log_dir>/moe_monitor`` for TensorBoard / CSV loggers, ``<W&B run dir>/files/moe_monitor``
    (the W&B run's own folder, ``run.dir``) for a ``WandbLogger``, and without a logger a new
    ``<default_root_dir>/moe_runs/run_<N>`` per fit, printed at setup (``.../<name>`` when named). So an exception,
    Ctrl-C or a killed process keeps every finished window; at the end of ``fit`` the files are rewritten in full
    with parquet twins and ``summary.json``. The history stays in memory too: :meth:`layer_frame`,
    :meth:`expert_frame`, :meth:`event_frame`. A failing logger, detector, controller or missing optional
    package warns once and never stops training. An error raised inside ``torch.distributed`` (a broken process
    group) is not caught: swallowed on one process, it would leave the others waiting in the next collective.

    Several monitors on one trainer (say, one every step and one every 100 steps) need distinct ``name`` s: each
    then logs under ``moe/<name>/<phase>/...`` and writes its own files; two with the same name (or two without)
    are refused at ``setup``.

    **Console** (rank zero, ``console=True``): one line per new incident (a layer breaking, every rule involved)
    with a hint, a line when it turns critical or recovers, a line when a controller moves a knob materially, and
    at the end of ``fit`` a summary naming the files and the ``moe-monitor report`` command; through ``tqdm.write``
    under Lightning's TQDM progress bar (the bar stays whole), else Lightning's ``rank_zero_info``. The progress
    bar shows ``moe`` (``ok``, ``2/4 collapsed``, ``1/4 alert``) and ``moe_entropy`` (the worst layer's load
    entropy) of the latest training window, like ``lr`` of ``LearningRateMonitor`` (``moe_<name>`` and
    ``moe_<name>_entropy`` when named).

    **Logged metrics** (through every logger of the trainer, at ``step=trainer.global_step``, rank zero only;
    ``<phase>`` is ``train``, ``val`` or ``test``; ``<LL>`` is the router's index in model order, ``L00``, ``L01``,
    ...; the module path of each label is the ``layer`` column of :meth:`layer_frame`, its index ``layer_index``):

    - ``moe/<phase>/<stat>/<LL>`` for each statistic of the metric reference (docs/metrics.md):
      ``dropped_fraction``, ``load_entropy``, ``max_violation``, ``cv``, ``gini``, ``dead_experts``, ``aux_loss``,
      ``z_loss``, ``router_entropy``, ``top1_confidence``, ``unrouted_fraction``, ``skipped_fraction`` (NaN
      values, e.g. for a router without logits, are not logged).
    - ``moe/<phase>/all/min_load_entropy``, ``moe/<phase>/all/max_max_violation``: the worst layer.
    - ``moe/<phase>/all/dropped_fraction``: dropped / selected assignments over all layers.
    - ``moe/<phase>/all/layers_with_dead_experts``: layers with an expert that got no token in the window.
    - ``moe/<phase>/load/<LL>/E<EE>``: each expert's share of its layer's assignments, only with
      ``log_expert_loads=True``.
    - Each controller's ``metrics()``, e.g. ``controller/aux_loss/max_coef``, per training window; module paths in
      its keys become ``<LL>`` labels (``controller/bias/L00/range``).
    - With ``name="fast"``, every key above becomes ``moe/fast/<phase>/...`` and ``controller/fast/...``.

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
        save_frames: write the history files to ``<log_dir>/moe_monitor`` during ``fit``.
        name: distinguishes several monitors of one trainer: key prefix ``moe/<name>/<phase>/...`` (and
            ``controller/<name>/...``), files in ``<log_dir>/moe_monitor/<name>``, and part of :attr:`state_key`.
        console: ``True`` prints incidents, recoveries, knob changes and the run summary (hints name
            ``MoEMonitor`` arguments); ``"cli"`` words the hints as ``moe-monitor train`` flags; a
            :class:`~moe_monitor.sinks.console.ConsoleSink` is used as given; ``False`` prints nothing (the
            progress bar fields stay).
        process_group: the ``torch.distributed`` group the windows and controllers reduce over; ``None``: the
            default group (see :class:`~moe_monitor.monitor.RouterMonitor` and docs/distributed.md).
        val_domains: one name per validation dataloader, e.g. ``("english", "python")`` for
            ``CorpusDataModule(val_loader_per_domain=True)``: each validation run also gives one window per
            domain, phase ``"val/<name>"`` (keys ``moe/val/<name>/...``), of the batches of dataloader ``i``
            (named ``val_domains[i]``), shown by ``moe-monitor report`` as expert use per domain; the ``"val"``
            window still counts every batch. ``None``: only ``"val"``.
        sinks: where the windows go instead of the sinks chosen from the trainer's loggers (``None``, the default:
            every logger's scalars, plus the rich views of a ``TensorBoardLogger`` or ``WandbLogger``). The kinds
            :class:`~moe_monitor.watcher.Watcher` takes: your own :class:`~moe_monitor.sinks.base.Sink` (see
            docs/sinks.md), built-in sinks, Lightning loggers (``sinks=[logger, MySink()]`` keeps the logger's
            sinks and adds yours), ``SummaryWriter``\ s, W&B runs, directory paths. The history files
            (``save_frames``) are written beside the run either way.

    Raises:
        MisconfigurationException: an argument is of the wrong type or out of range (the message lists what is
            allowed), or, at ``setup``, two monitors of the trainer share a ``name``.
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
        name: str | None = None,
        console: bool | Literal["library", "cli"] | ConsoleSink = True,
        process_group: Any = None,
        val_domains: Sequence[str] | None = None,
        sinks: Iterable[Any] | None = None,
    ) -> None:
        self.options: TrainerOptions = TrainerOptions.check(
            locals(), owner="MoEMonitor", error=MisconfigurationException, every_name="log_every_n_steps"
        )
        self.val_domains = _check_domains(val_domains)

        self.watcher: Watcher | None = None
        self.stopped_by_collapse = False
        self._pending_state: dict[str, Any] | None = None
        self._phase_scope = contextlib.ExitStack()
        self._hooked = False
        self._deferred = False
        self._stage: str | None = None
        self._files_dir: str | None = None
        self._bar: tuple[Any, Callable[..., Any]] | None = None  # the progress bar and its own get_metrics
        self._domains_seen: dict[int, None] = {}  # dataloader indices of the running validation, in order

    # ------------------------------------------------------------------------------------------------- state
    @property
    def monitor(self) -> RouterMonitor | None:
        """The :class:`~moe_monitor.monitor.RouterMonitor` of the current (or last) stage; ``None`` before setup."""
        return None if self.watcher is None else self.watcher.monitor

    @property
    def events(self) -> list[CollapseEvent]:
        """Every alert, recovery and control event so far (the watcher's one event history)."""
        return [] if self.watcher is None else self.watcher.events

    @property
    def state_key(self) -> str:
        keys: dict[str, Any] = dict(
            log_every_n_steps=self.options.log_every,
            routers=None if self.options.routers is None else tuple(_router_name(r) for r in self.options.routers),
            controllers=tuple(controller_name(c) for c in self.controllers),
        )
        if self.name is not None:  # unnamed instances keep the key of checkpoints written before `name` existed
            keys["name"] = self.name
        return self._generate_state_key(**keys)

    def state_dict(self) -> dict[str, Any]:
        """History of the monitor, detector and controllers, and the events (plain Python types)."""
        if self._pending_state is not None:  # restored but not applied yet: hand it on unchanged
            return dict(self._pending_state)
        if self.watcher is not None:
            return self.watcher.state_dict()
        return {
            "version": STATE_VERSION,
            "monitor": None,
            "detector": None if self.detector is None else self.detector.state_dict(),
            "controllers": {controller_name(c): c.state_dict() for c in self.controllers},
            "events": [],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`; what belongs to the monitor waits for ``setup`` if it has not run yet.

        Only ``fit`` resumes from a checkpoint: Lightning also restores callbacks for ``validate`` / ``test`` /
        ``predict`` with a ``ckpt_path``, and those runs keep the current history, detector and controllers.

        Raises:
            ValueError: the checkpoint holds a state of another version; the message says what to do.
        """
        if self._stage not in (None, "fit"):
            return
        if state_dict.get("version") != STATE_VERSION:
            raise ValueError(
                f"Unsupported MoEMonitor state version {state_dict.get('version')!r} in the checkpoint: this"
                f" moe_monitor reads version {STATE_VERSION}. Resume with the moe_monitor release that wrote it, or"
                " resume without the monitor's state: Trainer.fit(..., ckpt_path=...) with a MoEMonitor whose `name`"
                " differs, so Lightning finds no state for it."
            )
        self._pending_state = state_dict
        if self.watcher is not None:  # Lightning restores checkpoints after `setup`
            self._apply_pending_state()

    def _apply_pending_state(self) -> None:
        state, self._pending_state = self._pending_state, None
        if state is not None and self.watcher is not None:
            self.watcher.load_state_dict(state)

    # ------------------------------------------------------------------------------------------------- frames
    def layer_frame(self) -> pd.DataFrame:
        """Per (window, layer) statistics so far; see :meth:`RouterMonitor.layer_frame` (empty before setup)."""
        return pd.DataFrame() if self.watcher is None else self.watcher.layer_frame()

    def expert_frame(self) -> pd.DataFrame:
        """Per (window, layer, expert) counts and loads so far (empty before setup)."""
        return pd.DataFrame() if self.watcher is None else self.watcher.expert_frame()

    def event_frame(self) -> pd.DataFrame:
        """Every alert, recovery and control event so far, one row each."""
        return event_frame([]) if self.watcher is None else self.watcher.event_frame()

    # ------------------------------------------------------------------------------------------------- setup
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._stage = stage  # Lightning restores a checkpoint after `setup`: `load_state_dict` reads it
        if stage not in ("fit", "validate", "test"):
            return
        _check_distinct(trainer)
        # `trainer.log_dir` is a broadcast: every process must ask for it, not only the one that writes.
        saving = stage == "fit" and self.options.save_frames
        self._files_dir = _files_dir(trainer, trainer.log_dir) if saving else None
        try:
            self._attach(trainer, pl_module, stage)
        except NoRoutersFoundError:
            # Routers built in `configure_model` only exist after `setup`; look again when the stage starts.
            if not is_overridden("configure_model", pl_module):
                raise
            self._deferred = True

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._deferred:
            self._attach(trainer, pl_module, "fit")

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._deferred:
            self._attach(trainer, pl_module, "validate")

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._deferred:
            self._attach(trainer, pl_module, "test")
        self._enter_phase("test")

    def _attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        previous = self.watcher
        sinks: list[Any] = []
        console: Any = False
        if trainer.is_global_zero:
            if self.options.sinks is not None:
                sinks = list(self.options.sinks)
            elif trainer.loggers:
                sinks = list(trainer.loggers)
            else:
                rank_zero_warn(
                    "MoEMonitor: the Trainer has no logger, so routing statistics go to no dashboard. The history is"
                    " kept in memory (`MoEMonitor.layer_frame()`) and written, as each window closes, to a new"
                    " folder `<default_root_dir>/moe_runs/run_<N>` per fit (named on the console). Add a logger to"
                    " the Trainer, or name dashboards with MoEMonitor(sinks=[...]).",
                    category=RuntimeWarning,
                )
            if not trainer.loggers and self._files_dir:
                rank_zero_info(f"MoEMonitor: history files of this run: {self._files_dir}")
            sinks += [self._files_dir] if self._files_dir else []
            console = console_sink(self.options.console, self.controllers, "MoEMonitor", _console_out(trainer))
        arguments = self.options.watcher_arguments(
            log_every=self.options.log_every or max(1, int(trainer.log_every_n_steps)),
            sinks=sinks,
            console=False if console is None else console,
        )
        try:
            watcher = Watcher(pl_module, **arguments, control=stage == "fit", is_global_zero=trainer.is_global_zero)
        except NoRoutersFoundError as err:
            hint = "" if "MoEMonitor(routers=" in str(err) else "\n" + _routers_hint(pl_module)
            raise NoRoutersFoundError(f"{err}{hint}") from err
        if previous is not None:
            # A second fit / validate / test with the same callback continues the same history.
            previous.detach()
            watcher.continue_from(previous)
        if self.val_domains:
            watcher.deferrable_phases += tuple(f"val/{domain}" for domain in self.val_domains)
        self.watcher = watcher
        self._hooked, self._deferred = True, False
        self._apply_pending_state()
        if trainer.is_global_zero:
            self._show_status(trainer)

    # ------------------------------------------------------------------------------------------ progress bar
    def status(self) -> dict[str, str | float]:
        """The progress-bar fields of the latest training window (empty before the first one).

        ``{"moe": "ok" | "2/4 collapsed" | "1/4 alert", "moe_entropy": worst load entropy}``; keys
        ``moe_<name>`` and ``moe_<name>_entropy`` for a named monitor.
        """
        if self.watcher is None:
            return {}
        fields = self.watcher.status("train")
        if self.name is None:
            return fields
        return {f"moe_{self.name}" + key[len("moe") :]: value for key, value in fields.items()}

    def _show_status(self, trainer: pl.Trainer) -> None:
        """Adds :meth:`status` to what the trainer's progress bar shows (its ``get_metrics``), until detach."""
        bar = trainer.progress_bar_callback
        if bar is None or self._bar is not None:
            return
        own = bar.get_metrics

        def get_metrics(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
            metrics = own(trainer, pl_module)
            fields = self.watcher._safely("show the progress bar status", self.status) if self.watcher else None
            return {**metrics, **(fields or {})}

        bar.get_metrics = get_metrics
        self._bar = (bar, get_metrics)

    def _hide_status(self) -> None:
        if self._bar is None:
            return
        bar, ours = self._bar
        self._bar = None
        if bar.__dict__.get("get_metrics") is ours:
            del bar.get_metrics  # the class' own method again

    # ------------------------------------------------------------------------------------------------- train
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The window opens with this fit: counts of a window left open by an earlier fit or a checkpoint are gone.
        if self._hooked:
            self.watcher.begin(trainer.global_step)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, *args: Any) -> None:
        if self._hooked:
            self.watcher.batch(batch)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if not self._hooked:
            return
        self.watcher.step(trainer.global_step)  # a micro-batch of gradient accumulation keeps the same step
        self._maybe_stop(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._hooked:
            self.watcher.flush()  # the steps since the last full window, and a validation window left waiting
            self._maybe_stop(trainer)

    def _maybe_stop(self, trainer: pl.Trainer) -> None:
        if self.watcher.should_stop and not self.stopped_by_collapse:
            self.stopped_by_collapse = True
            trainer.should_stop = True

    # ------------------------------------------------------------------------------------------ validation/test
    def on_sanity_check_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._enter_phase(_SANITY_PHASE)

    def on_sanity_check_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._phase_scope.close()

    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if not self._hooked:
            return
        self.watcher.batch(batch)
        if self.val_domains and not trainer.sanity_checking and dataloader_idx not in self._domains_seen:
            if dataloader_idx < len(self.val_domains):
                self._domains_seen[dataloader_idx] = None
                self._enter_phase(_DOMAIN_COUNTING + self.val_domains[dataloader_idx])
            else:
                self._phase_scope.close()  # counted to "val" only
                self._domains_seen[dataloader_idx] = None
                rank_zero_warn(
                    f"MoEMonitor(val_domains={list(self.val_domains)}) names {len(self.val_domains)} validation"
                    f" dataloaders, but there is a validation dataloader {dataloader_idx}: its batches count only to"
                    " the 'val' window. Give val_domains one name per validation dataloader.",
                    category=RuntimeWarning,
                )

    def on_test_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, *args: Any) -> None:
        if self._hooked:
            self.watcher.batch(batch)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._hooked and not trainer.sanity_checking:
            if self.val_domains:
                self._phase_scope.close()
                for index in [i for i in self._domains_seen if i < len(self.val_domains)]:
                    domain = self.val_domains[index]
                    self.watcher.monitor.move_window(_DOMAIN_COUNTING + domain, ["val", f"val/{domain}"])
                    self.watcher.end_phase(f"val/{domain}", trainer.global_step, now=False)
                self._domains_seen = {}
            # A process with no validation batch skips the whole loop (and this hook): under DDP the window waits
            # for a point every process reaches, the next training window or the end of the stage.
            self.watcher.end_phase("val", trainer.global_step, now=False)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._phase_scope.close()
        if self._hooked:
            self.watcher.end_phase("test", trainer.global_step, now=False)

    # ------------------------------------------------------------------------------------------------- end
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._phase_scope.close()
        if self._hooked:
            self.watcher.flush()  # every process reaches teardown: the evaluation windows left waiting close here
            if stage == "fit":
                self.watcher.finish()
        self._detach()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # The finished windows are on disk already (appended as they closed); no collective here, whose peers
        # may be gone.
        self._phase_scope.close()
        self._detach()

    def _detach(self) -> None:
        if self.watcher is not None:
            self.watcher.detach()
        self._hooked = False
        self._hide_status()

    def _enter_phase(self, phase: str) -> None:
        if self._hooked:
            self._phase_scope.close()
            self._phase_scope.enter_context(self.watcher.phase(phase, close=False))


def _check_domains(val_domains: Sequence[str] | None) -> tuple[str, ...] | None:
    """``val_domains`` as a tuple of distinct, non-empty names without ``/``; else a MisconfigurationException."""
    if val_domains is None:
        return None
    # A string is a sequence of letters, not of names.
    names = tuple(val_domains) if isinstance(val_domains, Sequence) and not isinstance(val_domains, str) else ()
    if not names or len(set(names)) < len(names) or not all(isinstance(n, str) and n and "/" not in n for n in names):
        raise MisconfigurationException(
            f"val_domains={val_domains!r} is not valid; give one distinct, non-empty name without '/' per validation"
            " dataloader, e.g. MoEMonitor(val_domains=('english', 'python')), or None for one 'val' window."
        )
    return names


def _files_dir(trainer: pl.Trainer, log_dir: str | None) -> str | None:
    """Where rank zero writes the history of this fit: beside the first logger's run, never shared by two runs.

    TensorBoard / CSV: ``<log_dir>/moe_monitor`` (``version_N`` is the run's own). W&B: the run's own folder
    (``run.dir``, ``wandb/<run>/files``), as ``trainer.log_dir`` of a ``WandbLogger`` is the ``save_dir`` every run
    shares. No logger: a new ``<default_root_dir>/moe_runs/run_<N>``.
    """
    if not trainer.is_global_zero:
        return None
    logger = trainer.loggers[0] if trainer.loggers else None
    if logger is None:
        root = os.path.join(trainer.default_root_dir, _NO_LOGGER_DIR)
        taken = set(os.listdir(root)) if os.path.isdir(root) else set()
        number = next(n for n in range(len(taken) + 1) if f"run_{n}" not in taken)
        return os.path.join(root, f"run_{number}")
    if type(logger).__name__ == "WandbLogger":
        run_dir = getattr(logger.experiment, "dir", None)
        if isinstance(run_dir, str) and run_dir:
            return os.path.join(run_dir, "moe_monitor")
    return os.path.join(log_dir or trainer.default_root_dir, "moe_monitor")


def _console_out(trainer: pl.Trainer) -> Callable[[str], Any]:
    """``tqdm.write`` under Lightning's TQDM bar (which then redraws whole), else ``rank_zero_info``."""
    from lightning.pytorch.callbacks import TQDMProgressBar

    if isinstance(trainer.progress_bar_callback, TQDMProgressBar):
        from tqdm import tqdm

        return tqdm.write
    return rank_zero_info


def _check_distinct(trainer: pl.Trainer) -> None:
    """Two monitors of one trainer must differ in ``name``, or they write the same files and the same keys."""
    names = [callback.name for callback in trainer.callbacks if isinstance(callback, MoEMonitor)]
    repeated = sorted({"without a name" if n is None else f"named {n!r}" for n in names if names.count(n) > 1})
    if repeated:
        raise MisconfigurationException(
            f"The Trainer has {len(names)} MoEMonitor callbacks, more than one {' and '.join(repeated)}: they would"
            " log the same keys and write the same history files. Give each a distinct name, e.g."
            " MoEMonitor(log_every_n_steps=10, name='fast') and MoEMonitor(log_every_n_steps=100, name='slow'); keys"
            " become moe/<name>/<phase>/... and files <log_dir>/moe_monitor/<name>/."
        )


def _routers_hint(pl_module: pl.LightningModule) -> str:
    return (
        f"MoEMonitor looks for routers in the LightningModule ({type(pl_module).__name__}): register them with"
        " MoEMonitor(routers=[...]), names relative to the LightningModule as in `pl_module.named_modules()`, e.g."
        " MoEMonitor(routers=['model.blocks.0.moe.router']) when the network is its attribute `model`."
    )


def _router_name(router: Any) -> str:
    if isinstance(router, str):
        return router
    return str(getattr(router, "name", type(router).__name__))
