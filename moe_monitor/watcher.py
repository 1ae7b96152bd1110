r"""Watcher: the whole monitoring loop for any training loop, and the one engine under every integration.

A :class:`Watcher` owns a :class:`~moe_monitor.monitor.RouterMonitor` (the hooks and counters), the windows of
``log_every`` optimizer steps, the collapse detector, the controllers, the one event history, the sinks
(dashboards) and the crash-safe history files. The Lightning callback :class:`~moe_monitor.callback.MoEMonitor`
and the Hugging Face :class:`~moe_monitor.integrations.transformers.MoETrainerCallback` only translate their
framework's hooks into :meth:`Watcher.step`, :meth:`Watcher.end_phase` and :meth:`Watcher.close`, so the three
give the same statistics, keys, alerts and decisions.

Shape legend: ``L`` router layers, ``E`` experts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import torch
from torch import nn

from moe_monitor.controllers import share_across_stages
from moe_monitor.detect import CollapseDetector, CollapseEvent
from moe_monitor.detect.events import event_frame, event_from_record, event_record, write_events_csv
from moe_monitor.faults import Faults
from moe_monitor.incidents import IncidentTracker, progress_status
from moe_monitor.monitor import RouterMonitor
from moe_monitor.options import OptionsAccess, WatchOptions, controller_name
from moe_monitor.sinks.base import Sink, relabel_controller_metrics
from moe_monitor.sinks.console import ConsoleSink
from moe_monitor.sinks.scalars import scalar_metrics
from moe_monitor.sinks.targets import make_sinks
from moe_monitor.snapshot import Snapshot

__all__ = ["Watcher", "console_sink"]

log = logging.getLogger(__name__)

STATE_VERSION = 1
# Evaluation phases whose windows may wait for a point every process reaches (see `Watcher.end_phase`).
DEFERRABLE_PHASES = ("val", "test")


def console_sink(
    console: bool | str | ConsoleSink, controllers: Iterable[Any], owner: str, out: Any = None
) -> ConsoleSink | None:
    """The console sink a ``console=`` option asks for (checked by :meth:`WatchOptions.check`), or ``None``.

    ``True`` is the library interface (hints name Python arguments of ``owner``), ``"cli"`` the ``moe-monitor
    train`` flags; a :class:`~moe_monitor.sinks.console.ConsoleSink` is used as it is.

    Example:
        >>> sink = console_sink("cli", ["bias"], "MoEMonitor")
        >>> sink.interface, sink.running, console_sink(False, [], "MoEMonitor")
        ('cli', ['bias'], None)
    """
    if isinstance(console, ConsoleSink):
        return console
    if console is False:
        return None
    interface = console if isinstance(console, str) else "library"
    return ConsoleSink(interface=interface, controllers=controllers, out=out, owner=owner)


class Watcher(OptionsAccess):
    r"""Watches the routers of ``model`` in any training loop: windows, detection, control, dashboards, files.

    ``watcher.step(global_step)`` after every optimizer step is the whole protocol; micro-batches of gradient
    accumulation in between just add to the window. Every ``log_every`` steps (``global_step % log_every == 0``)
    the training window is closed: reduced over all processes (one ``all_reduce`` when ``torch.distributed`` is
    initialised), checked by the detector, shown to the controllers, sent to the sinks, appended to the history
    files. A window of fewer than half of ``log_every`` steps (the last one, or the first after a resume) is logged
    but not shown to the detector. :meth:`close` (or leaving the ``with`` block) closes the last partial window,
    writes the final files and removes the hooks.

    Evaluation: ``with watcher.phase("val"):`` counts every router forward inside to phase ``"val"`` and closes
    that window at the end of the block (logged under ``moe/val/...``, never shown to the detector or the
    controllers). Router forwards in eval mode outside such a block count to ``"val"`` too; close them with
    :meth:`end_phase`.

    Padding: :meth:`batch` reads the ``attention_mask`` of a dict-like batch (:meth:`set_token_mask` sets one).

    Fault isolation: a failing sink, detector, controller or ``on_alert`` warns once per kind of failure (on the
    main process) and training goes on. An error raised inside ``torch.distributed`` (a broken process group) is
    re-raised: swallowed on one process, it would leave the others waiting in their next collective.

    Distributed: every process must call :meth:`step` with the same steps and :meth:`close` (the window
    reductions are collectives); only the main process writes to sinks and files. ``stop_on_collapse`` decisions
    come from reduced statistics, so :attr:`should_stop` is the same on every process.

    Args:
        model: the model whose routers to watch (any ``nn.Module``).
        log_every: optimizer steps per training window.
        detector: a :class:`~moe_monitor.detect.CollapseDetector`, ``"default"``, or ``None`` (no detection).
        controllers: controllers from :mod:`moe_monitor.controllers`.
        sinks: where windows go: ``torch.utils.tensorboard.SummaryWriter``\ s (scalars, expert-load histograms,
            heatmaps, custom-scalars layout, event text), W&B runs (scalars, histograms, heatmaps, alerts, tables),
            directory paths (``str`` / ``os.PathLike``: crash-safe ``layers.csv``, ``experts.csv``, ``events.csv``
            appended as each window closes, plus parquet twins at :meth:`close`), Lightning loggers, or
            :class:`~moe_monitor.sinks.base.Sink` objects (built-in or your own: docs/sinks.md).
        routers: manual router registration, passed to :class:`~moe_monitor.monitor.RouterMonitor`.
        name: distinguishes several watchers of one run: keys become ``moe/<name>/<phase>/...`` and
            ``controller/<name>/...``, and files go to ``<dir>/<name>/``.
        log_expert_loads: also log one scalar per (layer, expert).
        log_histograms: expert-load histograms in TensorBoard / W&B sinks.
        log_heatmaps: layer x expert heatmaps in TensorBoard / W&B sinks (needs matplotlib).
        on_alert: called on the main process with each new alert.
        stop_on_collapse: set :attr:`should_stop` at the first critical alert.
        control: set up and run the controllers (``False`` for evaluation-only use: their state is kept).
        is_global_zero: whether this process writes to sinks and files; ``None`` asks ``torch.distributed``
            (rank 0, or the only process).
        console: what a person watching the terminal sees (main process only): ``True`` (default) prints one line
            per new incident with a hint, recoveries, material knob changes and, at :meth:`close`, a summary with
            the ``moe-monitor report`` command (also written as ``summary.json`` beside the history files);
            ``"cli"`` words the hints as ``moe-monitor train`` flags; a
            :class:`~moe_monitor.sinks.console.ConsoleSink` (e.g. with ``out=tqdm.write``); ``False``: silent.
        process_group: the ``torch.distributed`` group every reduction of the Watcher (windows, controllers,
            pending evaluation windows) runs over; ``None``: the default group (see
            :class:`~moe_monitor.monitor.RouterMonitor`).

    Raises:
        ValueError: an argument is of the wrong type or out of range; the message lists what is allowed.
        NoRoutersFoundError: ``model`` has no router it can recognise; the message says how to register one.

    Example:
        >>> import tempfile, torch
        >>> from moe_monitor.reference import MoEConfig, MoETransformer
        >>> model = MoETransformer(MoEConfig(d_model=16, n_layers=1, n_heads=2, n_experts=4, top_k=2, d_expert=16))
        >>> run_dir = tempfile.mkdtemp()
        >>> with Watcher(model, log_every=2, sinks=[run_dir]) as watcher:
        ...     for step in range(1, 5):
        ...         _ = model(torch.randint(0, 256, (2, 8)))  # forward, backward, optimizer step ...
        ...         events = watcher.step(step)
        ...     with watcher.phase("val"):
        ...         _ = model(torch.randint(0, 256, (2, 8)))
        >>> frame = watcher.layer_frame()
        >>> list(zip(frame.step, frame.phase, frame.tokens))
        [(2, 'train', 32), (4, 'train', 32), (4, 'val', 16)]
        >>> len(pd.read_csv(os.path.join(run_dir, "layers.csv")))
        3
    """

    def __init__(
        self,
        model: nn.Module,
        log_every: int = 50,
        detector: CollapseDetector | Literal["default"] | None = "default",
        controllers: Iterable[Any] = (),
        sinks: Iterable[Any] = (),
        *,
        routers: Sequence[Any] | None = None,
        name: str | None = None,
        log_expert_loads: bool = False,
        log_histograms: bool = True,
        log_heatmaps: bool = True,
        on_alert: Callable[[CollapseEvent], Any] | None = None,
        stop_on_collapse: bool = False,
        control: bool = True,
        is_global_zero: bool | None = None,
        console: bool | Literal["library", "cli"] | ConsoleSink = True,
        process_group: Any = None,
    ) -> None:
        options = WatchOptions.check(locals(), owner="Watcher")
        if not isinstance(control, bool):
            raise ValueError(f"control={control!r} is not valid; choose True or False.")
        self.options = options
        self.log_every = options.log_every  # a trainer callback resolves its interval late and sets it here
        self._is_global_zero = is_global_zero
        # One fault-isolation layer for the watcher's own work and every sink's guarded calls.
        self.faults = Faults(loud=lambda: self.is_global_zero)
        self._views = (options.log_histograms, options.log_heatmaps)
        self.sinks: list[Sink] = []
        self._files: list[_HistoryFiles] = []
        self.console = console_sink(console, self.controllers, "Watcher") if self.is_global_zero else None
        if self.console is not None:
            self.console.faults = self.faults
            self.sinks.append(self.console)
        self.add_sinks(options.sinks)
        self.tracker = IncidentTracker()  # every window's events folded into incidents, for `status`
        self._latest: dict[str, Snapshot] = {}

        self.events: list[CollapseEvent] = []
        if self.detector is not None:
            self.detector.share_events(self.events)  # the one event history: the detector reads it, holds no copy
        self.should_stop = False
        self._seen_step = 0  # the last optimizer step seen: `step(0)` before any step is no step
        self._window_steps = 0
        self._pending_eval: dict[str, int] = {}
        # The phases `end_phase(now=False)` may defer; the same on every process (their pending steps are reduced
        # in this order). Add more, e.g. per-domain "val/<domain>" windows, before the first evaluation.
        self.deferrable_phases: tuple[str, ...] = DEFERRABLE_PHASES
        self._pending_controller_state: dict[str, Any] = {}
        self._closed = False
        self._coactivation_LEE: torch.Tensor | None = None  # training windows' co-activation, summed
        self.monitor = RouterMonitor(model, routers=options.routers, process_group=options.process_group)
        if not self.is_global_zero:
            # Only the main process writes the history files; the others keep the recent windows, silently.
            self.monitor.history.recent_only()
        self._controllers_ready = False
        if control:
            self._setup_controllers(model)
            self._controllers_ready = True

    def _setup_controllers(self, model: nn.Module) -> None:
        """Sets every controller up. On pipeline stages (each holds other knobs) a setup error of one stage is
        raised on every process of the group, by one ``all_gather_object``, rather than leaving the others to wait
        for it in the first collective."""
        failure: Exception | None = None
        try:
            for controller in self.controllers:
                controller.setup(model, self.monitor)
        except Exception as error:  # noqa: BLE001 - the other stages must hear of it, or they wait for this one
            if not self.monitor.pipelined:
                raise
            failure = error
        if not self.monitor.pipelined:
            return
        dist = torch.distributed
        group = self.monitor.process_group
        gathered: list[Any] = [None] * dist.get_world_size(group)
        report = None if failure is None else f"{type(failure).__name__}: {failure}"
        dist.all_gather_object(gathered, report, group=group)
        if failure is not None:
            raise failure
        ranks = dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)
        for rank, report in zip(ranks, gathered):
            if report is not None:
                raise ValueError(
                    f"a controller's setup failed on process {rank} of the process group ({report}); every "
                    "pipeline stage stops here rather than wait for it. Fix the error that process reports."
                )

    # --------------------------------------------------------------------------------------------- the loop
    @property
    def is_global_zero(self) -> bool:
        """Whether this process writes to the sinks and files."""
        if self._is_global_zero is not None:
            return self._is_global_zero
        dist = torch.distributed
        return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0

    def begin(self, global_step: int) -> None:
        """Starts counting steps at ``global_step`` (a new fit, or a resume): the open window has no step yet."""
        self._seen_step = int(global_step)
        self._window_steps = 0

    def step(self, global_step: int) -> list[CollapseEvent]:
        """Call after every optimizer step; closes the training window when ``global_step % log_every == 0``.

        Calls with the step already seen (micro-batches of gradient accumulation) only keep counting.

        Returns:
            The window's new events (alerts, recoveries, control events); empty between windows.
        """
        global_step = int(global_step)
        if global_step == self._seen_step:
            return []
        self._seen_step = global_step
        self._window_steps += 1
        if self._controllers_ready:
            for controller in self.controllers:
                self._safely(
                    f"run {controller_name(controller)}.on_train_step",
                    controller.on_train_step,
                    self.monitor,
                    global_step,
                )
        if global_step % self.log_every:
            return []
        events = self._train_window(global_step)
        self._close_pending_eval()
        return events

    def flush(self) -> list[CollapseEvent]:
        """Closes the partial training window (if it has steps) and any evaluation window left pending.

        Every process must call it (a collective when distributed). Returns the partial window's events.
        """
        events: list[CollapseEvent] = []
        if self._window_steps > 0:
            events = self._train_window(self._seen_step)
        self._close_pending_eval()
        return events

    def _train_window(self, step: int) -> list[CollapseEvent]:
        # Too few steps for the detector's thresholds and patience, which assume full windows.
        short = 2 * self._window_steps < self.log_every
        self._window_steps = 0
        snapshot = self._safely("close the training window", self.monitor.collect, step, "train")
        if snapshot is None:
            return []
        events: list[CollapseEvent] = []
        if self.detector is not None and not short:
            events += self._safely("run the collapse detector", self.detector.update, snapshot) or []
        detected = list(events)
        shared = None
        if self._controllers_ready:
            for controller in self.controllers:
                name = controller_name(controller)
                events += self._safely(f"run {name}.on_window", controller.on_window, snapshot, detected) or []
            # Pipeline stages turn different knobs: every process gets every stage's control events and metrics.
            share = share_across_stages, self.controllers, self.monitor, events, self._read_metrics
            events, shared = self._safely("share the controllers' window across stages", *share) or (events, None)
        self.events.extend(events)
        self._track(snapshot, events)
        critical = [e for e in events if e.kind == "alert" and e.severity == "critical"]
        if self.options.stop_on_collapse and critical and not self.should_stop:
            self.should_stop = True
            if self.is_global_zero:
                log.warning("moe_monitor: stopping at step %d on a critical alert: %s", step, critical[0].message)
        if self.is_global_zero:
            metrics = self._scalars(snapshot)
            for index, controller in enumerate(self.controllers):
                read = self._read_metrics(controller) if shared is None else shared[index]
                metrics.update({self._controller_key(key): value for key, value in read.items()})
            # Controllers name per-layer knobs by module path; every dashboard tags layers `L00`, `L01`, ...
            metrics = relabel_controller_metrics(metrics, snapshot.layer_names)
            self._publish(snapshot, metrics, events)  # the console sink prints the alerts, once per incident
            if self.options.on_alert is not None:
                for event in events:
                    if event.kind == "alert":
                        self._safely("call on_alert", self.options.on_alert, event)
        return events

    def _read_metrics(self, controller: Any) -> dict[str, float]:
        return self._safely(f"read {controller_name(controller)}.metrics", controller.metrics) or {}

    def _track(self, snapshot: Snapshot, events: Sequence[CollapseEvent]) -> None:
        self._latest[snapshot.phase] = snapshot
        self._safely("track incidents", self.tracker.update, events, snapshot.layer_names)

    def status(self, phase: str = "train") -> dict[str, str | float]:
        """The progress-bar fields of the latest ``phase`` window: ``moe`` (``"ok"``, ``"2/4 collapsed"``, ...)
        and ``moe_entropy`` (the worst layer's load entropy); see :func:`~moe_monitor.incidents.progress_status`.
        Empty before the first window of ``phase``.

        Example:
            >>> import torch
            >>> from moe_monitor.reference import MoEConfig, MoETransformer
            >>> model = MoETransformer(MoEConfig(d_model=16, n_layers=1, n_heads=2, n_experts=4, top_k=2,
            ...     d_expert=16))
            >>> watcher = Watcher(model, log_every=1, console=False)
            >>> watcher.status()
            {}
            >>> _ = model(torch.randint(0, 256, (2, 8))); _ = watcher.step(1)
            >>> sorted(watcher.status())
            ['moe', 'moe_entropy']
        """
        if phase not in self._latest:
            return {}
        return progress_status(self._latest[phase], self.tracker, phase)

    # --------------------------------------------------------------------------------------------- evaluation
    @contextlib.contextmanager
    def phase(self, name: str, close: bool = True) -> Iterator[None]:
        """Counts every router forward inside the block to phase ``name``; closes its window at the end.

        Args:
            name: the phase, e.g. ``"val"`` or ``"test"`` (keys ``moe/<name>/...``).
            close: close (reduce, log, write) the window when the block ends; ``False`` only counts, e.g. for
                forwards that should count nowhere (a phase that is never closed).
        """
        with self.monitor.phase(name):
            yield
        if close:
            self.end_phase(name)

    def end_phase(self, phase: str, step: int | None = None, now: bool = True) -> Snapshot | None:
        """Closes the evaluation window of ``phase`` at ``step`` (default: the last step seen) and logs it.

        Args:
            phase: the evaluation phase (``"val"``, ``"test"``, ...).
            step: the step recorded with the window.
            now: ``False`` lets a window of ``deferrable_phases`` (``"val"``, ``"test"``) of a distributed run wait
                for the next training window (or :meth:`flush` / :meth:`close`), where every process agrees in one
                small collective which evaluation windows to close: a process that saw no evaluation batch (and
                never called this) then still joins the reduction instead of leaving the others waiting. Without
                ``torch.distributed`` the window closes at once either way.

        Returns:
            The closed window's snapshot, or ``None`` when it waits or could not be closed.
        """
        step = self._seen_step if step is None else int(step)
        if not now and phase in self.deferrable_phases and _distributed():
            self._pending_eval[phase] = step
            return None
        return self._eval_window(phase, step)

    def _close_pending_eval(self) -> None:
        if not _distributed():
            return
        phases = self.deferrable_phases
        steps = torch.tensor([float(self._pending_eval.get(p, -1)) for p in phases], dtype=torch.float64)
        group = self.monitor.process_group
        if torch.distributed.get_backend(group) == "nccl":
            steps = steps.to(torch.device("cuda", torch.cuda.current_device()))
        torch.distributed.all_reduce(steps, op=torch.distributed.ReduceOp.MAX, group=group)
        self._pending_eval = {}
        for phase, step in zip(phases, steps.tolist()):
            if step >= 0:
                self._eval_window(phase, int(step))

    def _eval_window(self, phase: str, step: int) -> Snapshot | None:
        self.monitor.set_token_mask(None)
        snapshot = self._safely(f"close the {phase} window", self.monitor.collect, step, phase)
        if snapshot is not None:
            self._latest[phase] = snapshot
        if snapshot is not None and self.is_global_zero:
            self._publish(snapshot, self._scalars(snapshot), [])
        return snapshot

    def add_sinks(self, targets: Iterable[Any]) -> None:
        """Sends the windows closed from now on also to ``targets`` (the kinds ``sinks=`` takes).

        For dashboards that exist only after the watcher, e.g. a trainer's SummaryWriter opened at training start.
        """
        sinks, directories = make_sinks(targets, *self._views, detector=self.detector)
        for sink in sinks:
            sink.faults = self.faults
        self.sinks += sinks
        self._files += [_HistoryFiles(d if self.name is None else os.path.join(d, self.name)) for d in directories]

    # --------------------------------------------------------------------------------------------- inputs
    def set_token_mask(self, mask: torch.Tensor | None) -> None:
        """Which tokens of the next forwards count (``None``: all); see :meth:`RouterMonitor.set_token_mask`."""
        self.monitor.set_token_mask(mask)

    def batch(self, batch: Any) -> None:
        """Reads the ``attention_mask`` of a dict-like batch (``Mapping``, ``BatchEncoding``) as the token mask.

        A batch without one (or not dict-like) clears the mask: every token counts.
        """
        mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
        self.monitor.set_token_mask(mask if isinstance(mask, torch.Tensor) else None)

    # --------------------------------------------------------------------------------------------- history
    def layer_frame(self) -> pd.DataFrame:
        """Per (window, layer) statistics so far; see :meth:`RouterMonitor.layer_frame`."""
        return self.monitor.layer_frame()

    def expert_frame(self) -> pd.DataFrame:
        """Per (window, layer, expert) counts and loads so far."""
        return self.monitor.expert_frame()

    def event_frame(self) -> pd.DataFrame:
        """Every alert, recovery and control event so far, one row each (columns ``EVENT_COLUMNS``)."""
        return event_frame(self.events)

    # --------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """History, detector, controllers and events, as plain Python types (``torch.load(weights_only=True)``)."""
        controllers = {controller_name(c): c.state_dict() for c in self.controllers}
        controllers.update(self._pending_controller_state)
        return {
            "version": STATE_VERSION,
            "monitor": self.monitor.state_dict(),
            "detector": None if self.detector is None else self.detector.state_dict(),
            "controllers": controllers,
            "events": [event_record(e) for e in self.events],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`: history, detector, events, and each controller's knobs and alerts.

        Raises:
            ValueError: the state is of another version; the message says what to do.
        """
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"Unsupported moe_monitor state version {state.get('version')!r}: this moe_monitor reads version"
                f" {STATE_VERSION}. Resume with the moe_monitor release that wrote the checkpoint, or start without"
                " the monitor's state (a fresh history)."
            )
        if state.get("monitor") is not None:
            self.monitor.load_state_dict(state["monitor"])
        if self.detector is not None and state.get("detector") is not None:
            self.detector.load_state_dict(state["detector"])
        self.events = [event_from_record(record) for record in state.get("events", [])]
        if self.detector is not None:
            self.detector.share_events(self.events)
        # The incidents still open at the checkpoint stay open: the progress bar and the console know them.
        names = self.monitor.layer_names
        self.tracker = IncidentTracker()
        self._safely("track incidents", self.tracker.update, self.events, names)
        if self.console is not None:
            self._safely("track incidents", self.console.tracker.update, self.events, names)
        pending = dict(state.get("controllers", {}))
        if self._controllers_ready:
            for controller in self.controllers:
                controller_state = pending.pop(controller_name(controller), None)
                if controller_state is not None:
                    controller.load_state_dict(controller_state)
        self._pending_controller_state = pending

    def continue_from(self, previous: Watcher) -> None:
        """Carries on from another watcher of the same model (a second fit / validate / test of one callback).

        Takes its detector and controller state and events, and its history itself: the same windows in memory and
        the same open history files, so the run's files go on without a gap or a copy.
        """
        state = previous.state_dict()
        state["monitor"] = None
        self.load_state_dict(state)
        self.monitor.history = previous.monitor.history

    # --------------------------------------------------------------------------------------------- lifetime
    def detach(self) -> None:
        """Removes the hooks without closing anything (the history stays readable)."""
        self.monitor.set_token_mask(None)
        self.monitor.remove()

    def close(self) -> None:
        """Closes the last windows (:meth:`flush`), finishes the sinks, writes the final files, removes the hooks.

        Idempotent. Every process must call it when distributed.
        """
        if self._closed:
            return
        self._closed = True
        try:
            self.flush()
            self.finish()
        finally:
            self.detach()

    def finish(self) -> None:
        """Finishes the sinks (end-of-run views), rewrites the history files in full (CSV and parquet), then
        prints the console summary, which lists those files and writes ``summary.json`` beside them."""
        if not self.is_global_zero:
            return
        layers, events = self.layer_frame(), self.event_frame()
        for sink in self.sinks:
            if sink is not self.console:
                self._safely(f"finish the {sink.name} sink", sink.finish, layers, events)
        coactivation = coactivation_frame(self.monitor, self._coactivation_LEE)
        for files in self._files:
            self._safely("save the history", files.finish, self.monitor, self.events, coactivation)
        if self.console is not None:
            if self.console.history_dir is None and self._files:
                self.console.history_dir = Path(self._files[0].path)
            self._safely("finish the console sink", self.console.finish, layers, events)

    @property
    def files(self) -> list[str]:
        """The directories the history files are written to."""
        return [files.path for files in self._files]

    def __enter__(self) -> Watcher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if exc_info[0] is None:
            self.close()
        else:  # the finished windows are on disk already; a collective now could hang the other processes
            self._closed = True
            self.detach()

    # --------------------------------------------------------------------------------------------- helpers
    def _published(self, snapshot: Snapshot) -> Snapshot:
        """The snapshot as the sinks see it: ``name/phase`` as its phase, so every key carries the name."""
        if self.name is None:
            return snapshot
        return dataclasses.replace(snapshot, phase=f"{self.name}/{snapshot.phase}")

    def _scalars(self, snapshot: Snapshot) -> dict[str, float]:
        published = self._published(snapshot)
        return self._safely("compute scalars", scalar_metrics, published, self.options.log_expert_loads) or {}

    def _controller_key(self, key: str) -> str:
        if self.name is None or not key.startswith("controller/"):
            return key
        return f"controller/{self.name}/{key[len('controller/') :]}"

    def _publish(self, snapshot: Snapshot, metrics: dict[str, float], events: Sequence[CollapseEvent]) -> None:
        coactivation_LEE = snapshot.extras.get("coactivation")
        if snapshot.phase == "train" and coactivation_LEE is not None:
            total = self._coactivation_LEE
            self._coactivation_LEE = coactivation_LEE.clone() if total is None else total + coactivation_LEE
        published = self._published(snapshot)
        for sink in self.sinks:
            self._safely(f"write to the {sink.name} sink", sink.log_window, published, metrics, events)
        for files in self._files:
            self._safely("append to the history files", files.append, self.monitor, snapshot, events, self.events)

    def _safely(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Runs one step of the watcher's own work through its one fault-isolation layer (:attr:`faults`)."""
        return self.faults.run(what, fn, *args)


class _HistoryFiles:
    """The history files of one directory, written as each window closes, so a killed run leaves them on disk.

    ``layers.csv`` and the Parquet parts of the layer and expert rows are the monitor's
    :class:`~moe_monitor.history.History`: the first directory to see a window opens it there (the windows still in
    memory first; a restored checkpoint's files are continued without the replayed windows). ``events.csv`` is
    written here: every event so far at the first window, then each window's new events. A further directory (a
    second logger's folder) gets a full copy at :meth:`finish`.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        self._started = False

    def append(
        self, monitor: RouterMonitor, snapshot: Snapshot, new: Sequence[CollapseEvent], every: Sequence[CollapseEvent]
    ) -> None:
        """Writes one closed window: its rows, and its ``new`` events (``every`` event so far on the first write)."""
        if not self._started:
            self._started = True
            os.makedirs(self.path, exist_ok=True)
            if monitor.history.directory is None:
                monitor.history.open(self.path)
            write_events_csv(self._events, every)
            return
        if new:
            write_events_csv(self._events, new, append=True)

    def finish(
        self, monitor: RouterMonitor, events: Sequence[CollapseEvent], coactivation: pd.DataFrame | None
    ) -> None:
        monitor.save(self.path)  # the history's own directory: flushed; any other: a full copy
        write_events_csv(self._events, events)
        if coactivation is not None:
            coactivation.to_csv(os.path.join(self.path, "coactivation.csv"), index=False)

    @property
    def _events(self) -> str:
        return os.path.join(self.path, "events.csv")


def coactivation_frame(monitor: RouterMonitor, coactivation_LEE: torch.Tensor | None) -> pd.DataFrame | None:
    """``coactivation.csv``: tokens that chose both experts, summed over the training windows this watcher closed.

    One row per (layer, expert_a, expert_b) of the layers that count co-activation (top-k >= 2); the diagonal is
    each expert's count. ``None`` when no window had co-activation counts. A resumed run sums from the resume on
    (the sums are not part of the checkpoint, which stays small).

    Example:
        >>> from torch import nn
        >>> from moe_monitor.families import RouterSpec
        >>> monitor = RouterMonitor(nn.Sequential(nn.Linear(4, 3)), routers=[RouterSpec(name="0", top_k=2)])
        >>> frame = coactivation_frame(monitor, torch.tensor([[[2.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]]))
        >>> pairs = frame[(frame.expert_a != frame.expert_b) & (frame["count"] > 0)]
        >>> pairs[["expert_a", "expert_b", "count"]].values.tolist()
        [[0, 1, 1], [1, 0, 1]]
    """
    if coactivation_LEE is None:
        return None
    rows = []
    # Every layer of the snapshots (on a pipeline stage, the other stages' too), not only this process's routers.
    for index, (name, experts) in enumerate(zip(monitor.layer_names, monitor.history.num_experts)):
        block_EE = coactivation_LEE[index, :experts, :experts]
        if torch.isnan(block_EE).all():
            continue  # a top-1 layer: no co-activation
        for a, row in enumerate(block_EE.round().long().tolist()):
            rows += [(name, index, a, b, count) for b, count in enumerate(row)]
    if not rows:
        return None
    return pd.DataFrame(rows, columns=["layer", "layer_index", "expert_a", "expert_b", "count"])


# ------------------------------------------------------------------------------------------------- helpers
def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()



