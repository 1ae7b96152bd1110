r"""MoETrainerCallback: the routing monitor for the Hugging Face ``Trainer`` (and TRL's trainers built on it).

``Trainer(..., callbacks=[MoETrainerCallback()])``: the same statistics, keys, alerts, controllers and checkpointed
state as the Lightning callback, because both are thin layers over :class:`~moe_monitor.watcher.Watcher`.

Shape legend: ``B`` batch, ``S`` sequence.
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import torch

from moe_monitor.detect import CollapseDetector, CollapseEvent
from moe_monitor.options import OptionsAccess, TrainerOptions
from moe_monitor.sinks.base import Sink
from moe_monitor.sinks.console import ConsoleSink
from moe_monitor.snapshot import Snapshot
from moe_monitor.watcher import Watcher, console_sink

try:
    from transformers import TrainerCallback
except ModuleNotFoundError as err:  # pragma: no cover - the import error names the extra
    raise ModuleNotFoundError(
        'MoETrainerCallback needs transformers: pip install "moe-monitor[hf]" (transformers and accelerate).'
    ) from err

__all__ = ["MoETrainerCallback", "STATE_FILE"]

STATE_FILE = "moe_monitor.pt"
"""File name of the monitor's state inside each ``checkpoint-<step>`` folder (``moe_monitor-<name>.pt`` when named)."""


class MoETrainerCallback(OptionsAccess, TrainerCallback):
    r"""Monitors the MoE routers of a ``transformers.Trainer`` run: statistics, alerts, controllers, checkpoints.

    ``Trainer(model, args, train_dataset=..., callbacks=[MoETrainerCallback()])`` is all it takes (TRL's
    ``SFTTrainer`` and other ``Trainer`` subclasses the same). The routers are hooked when the Trainer is built;
    every ``log_every`` optimizer steps (default: the Trainer's ``logging_steps``) the training window is closed;
    all micro-batches of gradient accumulation and all processes are in it. Each ``evaluate`` is one window of
    phase ``"val"`` (as are ``predict`` runs, closed at ``on_predict``). Padding is left out through the
    ``attention_mask`` the model is called with (a forward pre-hook on the model reads it from the call). The last
    partial window closes at the last optimizer step. Under DDP, an evaluation set that does not split evenly over
    the processes is evened out by accelerate with repeated samples; the window counts those repeats too.

    **Logged metrics** (keys as for :class:`~moe_monitor.callback.MoEMonitor`: ``moe/<phase>/<stat>/<LL>``,
    ``moe/<phase>/all/...``, controller metrics; at ``state.global_step``, main process only):

    - TensorBoard (``report_to="tensorboard"``): scalars, expert-load histograms, heatmaps, custom-scalars layout
      and event text, written to the Trainer's own SummaryWriter under the exact keys.
    - W&B (``report_to="wandb"``): scalars, histograms and heatmaps against ``trainer/global_step`` in the
      Trainer's run, alerts, tables at the end of training.
    - Every other ``report_to`` integration (MLflow, Comet, ...) receives the scalars through its own ``on_log``,
      and ``state.log_history`` (``trainer_state.json``) gets one entry per window.
    - Files: ``<output_dir>/moe_monitor/`` (``<output_dir>/moe_monitor/<name>/`` when named): ``layers.csv``,
      ``experts.csv``, ``events.csv`` appended as each window closes (so a crash or a kill keeps the finished
      windows), rewritten with parquet twins at the end of training.

    Checkpoints: at each save the watcher's state (history, detector, controllers, events) is written to
    ``checkpoint-<step>/moe_monitor.pt``; ``trainer.train(resume_from_checkpoint=...)`` restores it from the
    checkpoint folder of the resumed step under ``output_dir``. (The Trainer's ``ExportableState`` mechanism is
    not used: it rebuilds a callback from JSON arguments only, which would drop the controllers and detector the
    user passed.)

    Args:
        log_every: optimizer steps per training window; ``None`` uses the Trainer's ``logging_steps``.
        log_expert_loads: also log one scalar per (layer, expert).
        log_histograms: expert-load histograms in TensorBoard / W&B.
        log_heatmaps: layer x expert heatmaps in TensorBoard / W&B (needs matplotlib).
        routers: manual router registration (module names relative to the model the Trainer trains).
        detector: a :class:`~moe_monitor.detect.CollapseDetector`, ``"default"``, or ``None``.
        controllers: controllers from :mod:`moe_monitor.controllers`.
        on_alert: called on the main process with each new alert.
        stop_on_collapse: set ``control.should_training_stop`` at the first critical alert (on every process: the
            alert comes from statistics reduced over all of them).
        save_frames: write the history files under ``output_dir``.
        name: distinguishes several monitors of one Trainer (key prefix ``moe/<name>/...``, own files and
            checkpoint file).
        console: ``True`` prints (through ``tqdm.write``, so the Trainer's progress bar stays whole) one line per
            new incident with a hint, recoveries, knob changes and an end-of-run summary with the
            ``moe-monitor report`` command (``summary.json`` beside the history files); ``"cli"`` words hints as
            ``moe-monitor train`` flags; a :class:`~moe_monitor.sinks.console.ConsoleSink`; ``False``: silent.
        process_group: the ``torch.distributed`` group the windows and controllers reduce over; ``None``: the
            default group (see :class:`~moe_monitor.monitor.RouterMonitor` and docs/distributed.md).
        sinks: where the windows go instead of the dashboards found from ``report_to`` (``None``, the default: the
            Trainer's TensorBoard writer, W&B run and other integrations). The kinds
            :class:`~moe_monitor.watcher.Watcher` takes: your own :class:`~moe_monitor.sinks.base.Sink` (see
            docs/sinks.md), built-in sinks, ``SummaryWriter``\ s, W&B runs, directory paths. The history files
            (``save_frames``) and the ``state.log_history`` entries are written either way.

    Raises:
        ValueError: an argument is of the wrong type or out of range; the message lists what is allowed.
        NoRoutersFoundError: when the Trainer is built, if its model has no router the monitor recognises.

    Example:
        >>> callback = MoETrainerCallback(log_every=10, name="fast")
        >>> callback.state_file
        'moe_monitor-fast.pt'
        >>> MoETrainerCallback(log_every=0)
        Traceback (most recent call last):
        ...
        ValueError: log_every=0 is not valid; choose a positive integer or None (the trainer's logging interval).
    """

    def __init__(
        self,
        log_every: int | None = None,
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
        sinks: Iterable[Any] | None = None,
    ) -> None:
        self.options: TrainerOptions = TrainerOptions.check(locals(), owner="MoETrainerCallback")
        self.watcher: Watcher | None = None
        self.state: Any = None  # the Trainer's TrainerState and TrainerControl, for the log sinks
        self.control: Any = None
        self._mask_hook: Any = None
        self._dashboards_found = False

    @property
    def state_file(self) -> str:
        """The file name of this callback's state in a checkpoint folder."""
        return STATE_FILE if self.name is None else f"moe_monitor-{self.name}.pt"

    # --------------------------------------------------------------------------------------------- set-up
    def on_init_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self.state = state
        if model is None:
            raise ValueError(
                "MoETrainerCallback found no model when the Trainer was built; pass the model to the Trainer"
                " (Trainer(model=..., callbacks=[MoETrainerCallback()]))."
            )
        self._check_distinct()
        options = self.options
        files = [os.path.join(args.output_dir, "moe_monitor")] if options.save_frames and args.output_dir else []
        main = bool(state.is_world_process_zero)
        chosen = list(options.sinks or ())  # `None`: the dashboards of `report_to`, found at train start
        console = console_sink(options.console, self.controllers, "MoETrainerCallback", _tqdm_write()) or False
        arguments = options.watcher_arguments(
            log_every=options.log_every or _logging_steps(args, state),
            sinks=[*chosen, *files, _LogHistorySink(self)] if main else [],
            console=console,
        )
        self.watcher = Watcher(model, **arguments, is_global_zero=main)
        self._mask_hook = model.register_forward_pre_hook(self._read_mask, with_kwargs=True)

    def _read_mask(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        # Sees every batch the Trainer (or a subclass' compute_loss) feeds the model; reading the tensor is no sync.
        mask = kwargs.get("attention_mask")
        self.watcher.set_token_mask(mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None)

    def _check_distinct(self) -> None:
        handler = _callback_handler()
        if handler is None:
            return
        names = [cb.name for cb in handler.callbacks if isinstance(cb, MoETrainerCallback)]
        if names.count(self.name) > 1:
            which = "without a name" if self.name is None else f"named {self.name!r}"
            raise ValueError(
                f"The Trainer has {len(names)} MoETrainerCallbacks, more than one {which}: they would log the same"
                " keys and write the same files. Give each a distinct name, e.g. MoETrainerCallback(log_every=10,"
                " name='fast') and MoETrainerCallback(log_every=100, name='slow')."
            )

    def _find_dashboards(self, args: Any, state: Any, control: Any) -> None:
        """Adds the Trainer's TensorBoard writer, W&B run and other ``report_to`` loggers as sinks (once)."""
        if self._dashboards_found or self.options.sinks is not None or not state.is_world_process_zero:
            return
        handler = _callback_handler()
        if handler is None:
            warnings.warn(
                "MoETrainerCallback could not find the Trainer's callback handler, so routing statistics go only to"
                " the history files and trainer_state.json; add the dashboards by hand:"
                " MoETrainerCallback(sinks=[summary_writer or wandb_run]).",
                RuntimeWarning,
                stacklevel=3,
            )
            self._dashboards_found = True
            return
        self._dashboards_found = True
        targets: list[Any] = []
        for callback in handler.callbacks:
            kind = type(callback).__name__
            if not type(callback).__module__.startswith("transformers.integrations"):
                continue
            if kind == "TensorBoardCallback":
                if getattr(callback, "tb_writer", None) is None and hasattr(callback, "_init_summary_writer"):
                    callback._init_summary_writer(args)
                if getattr(callback, "tb_writer", None) is not None:
                    targets.append(callback.tb_writer)
            elif kind == "WandbCallback":
                run = getattr(getattr(callback, "_wandb", None), "run", None)
                if run is not None:
                    targets.append(run)
            else:
                targets.append(_IntegrationSink(callback, args, self))
        self.watcher.add_sinks(targets)

    # --------------------------------------------------------------------------------------------- training
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.state, self.control = state, control
        if self.options.log_every is None:  # `logging_steps` as a fraction of the run is resolved only now
            self.watcher.log_every = _logging_steps(args, state)
        self._find_dashboards(args, state, control)
        if state.global_step > 0:
            self._restore(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))
        # The window opens here: counts of a window left open by a checkpoint are not in it.
        self.watcher.begin(state.global_step)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self.watcher.step(state.global_step)
        if state.max_steps and state.global_step >= state.max_steps:
            # The last step: close the partial window while the Trainer's dashboards are still open.
            self.watcher.flush()
        if self.watcher.should_stop:
            control.should_training_stop = True
        return control

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.watcher.flush()
        self.watcher.finish()

    # --------------------------------------------------------------------------------------------- evaluation
    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.state, self.control = state, control
        self._find_dashboards(args, state, control)
        # Every process runs the whole evaluation loop (accelerate evens the batches), so this collective is safe.
        self.watcher.end_phase("val", state.global_step)

    def on_predict(self, args: Any, state: Any, control: Any, metrics: Any = None, **kwargs: Any) -> None:
        self.watcher.end_phase("val", state.global_step)

    # --------------------------------------------------------------------------------------------- checkpoints
    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if state.is_world_process_zero and os.path.isdir(folder):
            torch.save(self.watcher.state_dict(), os.path.join(folder, self.state_file))

    def _restore(self, folder: str) -> None:
        path = os.path.join(folder, self.state_file)
        if not os.path.isfile(path):
            warnings.warn(
                f"MoETrainerCallback: resuming at step {os.path.basename(folder)} but {path} does not exist, so the"
                " routing history, detector and controllers start afresh. To restore them from elsewhere, call"
                " callback.watcher.load_state_dict(torch.load(PATH, weights_only=True)) before trainer.train().",
                RuntimeWarning,
                stacklevel=3,
            )
            return
        self.watcher.load_state_dict(torch.load(path, weights_only=True))


# ------------------------------------------------------------------------------------------------- sinks
class _LogHistorySink(Sink):
    """Appends each window's scalars to ``state.log_history`` (saved in ``trainer_state.json``)."""

    name = "log_history"

    def __init__(self, callback: MoETrainerCallback) -> None:
        super().__init__()
        self.callback = callback

    def log_window(self, snapshot: Snapshot, metrics: dict[str, float], events: Sequence[Any]) -> None:
        state = self.callback.state
        if metrics and state is not None:
            self.guard("append to state.log_history", state.log_history.append, {**metrics, "step": snapshot.step})


class _IntegrationSink(Sink):
    """Sends each window's scalars through a ``report_to`` integration's own ``on_log`` (MLflow, Comet, ...)."""

    def __init__(self, integration: Any, args: Any, callback: MoETrainerCallback) -> None:
        super().__init__()
        self.integration = integration
        self.args = args
        self.callback = callback
        self.name = type(integration).__name__

    def log_window(self, snapshot: Snapshot, metrics: dict[str, float], events: Sequence[Any]) -> None:
        if metrics:
            on_log = self.integration.on_log
            callback = self.callback
            self.guard("log metrics", on_log, self.args, callback.state, callback.control, logs=dict(metrics))


# ------------------------------------------------------------------------------------------------- helpers
def _tqdm_write() -> Callable[[str], Any]:
    from tqdm.auto import tqdm

    return tqdm.write


def _logging_steps(args: Any, state: Any) -> int:
    # `logging_steps` < 1 is a fraction of the run, which the Trainer resolves only at train start.
    steps = getattr(state, "logging_steps", None) or args.logging_steps
    return max(1, int(steps)) if steps >= 1 else 50


def _callback_handler() -> Any | None:
    """The ``CallbackHandler`` calling this hook, found on the call stack (it holds the Trainer's integrations).

    Callbacks get no reference to their Trainer; its handler is the ``self`` of the frame that dispatches the event.
    """
    from transformers.trainer_callback import CallbackHandler

    frame = inspect.currentframe()
    try:
        while frame is not None:
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, CallbackHandler):
                return candidate
            frame = frame.f_back
        return None
    finally:
        del frame
