"""The options every front end shares: one definition, one check, one set of defaults.

:class:`~moe_monitor.watcher.Watcher`, the Lightning callback :class:`~moe_monitor.callback.MoEMonitor` and the
Hugging Face :class:`~moe_monitor.integrations.transformers.MoETrainerCallback` take the same options (how often a
window closes, the detector, the controllers, the sinks, the views, the alert hook, ...). Each keeps them as explicit
keyword arguments in its own signature, for users and IDEs, and hands its arguments to :meth:`WatchOptions.check`,
which validates and normalises them here, once, with the error type and wording of that front end. The callbacks
hand the checked options on with :meth:`WatchOptions.watcher_arguments`, so a new shared option is one field here
(and one argument in each signature), never a new forwarding line in three files.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from moe_monitor.detect import CollapseDetector
from moe_monitor.sinks.console import INTERFACES, ConsoleSink
from moe_monitor.sinks.targets import check_targets

__all__ = ["CONTROLLER_METHODS", "OptionsAccess", "TrainerOptions", "WatchOptions", "controller_name"]

CONTROLLER_METHODS = ("setup", "on_train_step", "on_window", "metrics", "state_dict", "load_state_dict")


def controller_name(controller: Any) -> str:
    """The name a controller's state is saved under (its ``name``, else its class name).

    Example:
        >>> from moe_monitor.controllers import AuxLossController
        >>> controller_name(AuxLossController()), controller_name(object())
        ('aux_loss', 'object')
    """
    return str(getattr(controller, "name", type(controller).__name__))


@dataclass(frozen=True)
class WatchOptions:
    """The checked options of a :class:`~moe_monitor.watcher.Watcher` (and of the callbacks built on it).

    Attributes:
        log_every: optimizer steps per training window (``None``, for a callback: the trainer's own interval).
        detector: a :class:`~moe_monitor.detect.CollapseDetector`, or ``None`` (no detection); ``"default"`` is
            checked into a fresh detector with its default thresholds.
        controllers: controllers from :mod:`moe_monitor.controllers`, a tuple, with distinct names.
        sinks: where windows go (see :func:`~moe_monitor.sinks.targets.make_sinks` for the kinds), a tuple; for a
            callback ``None`` means "the sinks of the trainer's loggers".
        routers: manual router registration for :class:`~moe_monitor.monitor.RouterMonitor`, or ``None``.
        name: tells several monitors of one run apart (key prefix ``moe/<name>/...``, files in ``<dir>/<name>``).
        log_expert_loads: also log one scalar per (layer, expert).
        log_histograms: expert-load histograms in TensorBoard / W&B sinks.
        log_heatmaps: layer x expert heatmaps in TensorBoard / W&B sinks.
        on_alert: called on the main process with each new alert.
        stop_on_collapse: stop training at the first critical alert.
        console: ``True``, ``False``, ``"library"``, ``"cli"`` or a :class:`~moe_monitor.sinks.console.ConsoleSink`.
        process_group: the ``torch.distributed`` group the windows and controllers reduce over (``None``: default).

    Example:
        >>> options = WatchOptions.check({"log_every": 10, "controllers": []}, owner="Watcher")
        >>> options.log_every, type(options.detector).__name__, options.controllers
        (10, 'CollapseDetector', ())
        >>> WatchOptions.check({"log_every": 10, "name": "a b"}, owner="Watcher")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: name='a b' is not valid; choose None or a short identifier of letters, digits, '_' and '-' ...
    """

    log_every: int | None = 50
    detector: Any = "default"
    controllers: tuple[Any, ...] = ()
    sinks: tuple[Any, ...] | None = ()
    routers: Sequence[Any] | None = None
    name: str | None = None
    log_expert_loads: bool = False
    log_histograms: bool = True
    log_heatmaps: bool = True
    on_alert: Callable[[Any], Any] | None = None
    stop_on_collapse: bool = False
    console: bool | str | ConsoleSink = True
    process_group: Any = None

    # A front end that may leave `log_every` and `sinks` to its trainer (None) says so here.
    trainer_defaults: ClassVar[bool] = False
    flags: ClassVar[tuple[str, ...]] = ("log_expert_loads", "log_histograms", "log_heatmaps", "stop_on_collapse")

    @classmethod
    def check(
        cls,
        arguments: Mapping[str, Any],
        *,
        owner: str,
        error: type[Exception] = ValueError,
        every_name: str = "log_every",
    ) -> WatchOptions:
        """Checks a front end's arguments (by name; other names are ignored) and returns them normalised.

        Args:
            arguments: the front end's arguments, e.g. ``locals()`` at the top of its ``__init__`` (the way
                Lightning's ``save_hyperparameters`` reads them); missing ones take the defaults above.
            owner: the front end's class name, used in messages.
            error: the exception to raise, ``ValueError`` or the framework's own (Lightning's
                ``MisconfigurationException``).
            every_name: the front end's name for ``log_every`` (``log_every_n_steps`` for Lightning).

        Raises:
            error: an argument is of the wrong type or out of range; the message lists what is allowed.
        """
        values = {f.name: arguments[f.name] for f in dataclasses.fields(cls) if f.name in arguments}
        if every_name in arguments:
            values["log_every"] = arguments[every_name]
        return cls(**values)._checked(owner, error, every_name)

    def watcher_arguments(self, **overrides: Any) -> dict[str, Any]:
        """The keyword arguments of a :class:`~moe_monitor.watcher.Watcher` with these options, ``overrides`` on
        top (what the front end resolved: the interval, the sinks, the console with its output, ...).

        Example:
            >>> options = TrainerOptions.check({"log_every": None, "save_frames": False}, owner="MoETrainerCallback")
            >>> arguments = options.watcher_arguments(log_every=4, sinks=["runs/x"])
            >>> arguments["log_every"], arguments["sinks"], "save_frames" in arguments
            (4, ['runs/x'], False)
        """
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(WatchOptions)}
        return {**shared, **overrides}

    def _checked(self, owner: str, error: type[Exception], every_name: str) -> WatchOptions:
        allow_none = self.trainer_defaults
        log_every = self.log_every
        if not (allow_none and log_every is None) and (
            isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 1
        ):
            choice = "a positive integer"
            if allow_none:
                interval = "log_every_n_steps" if every_name == "log_every_n_steps" else "logging interval"
                choice += f" or None (the trainer's {interval})"
            raise error(f"{every_name}={log_every!r} is not valid; choose {choice}.")
        for flag in self.flags:
            value = getattr(self, flag)
            if not isinstance(value, bool):
                raise error(f"{flag}={value!r} is not valid; choose True or False.")
        routers = self.routers
        if isinstance(routers, (str, bytes)) or (routers is not None and not isinstance(routers, Sequence)):
            raise error(
                f"routers={routers!r} is not valid; choose None (find routers automatically) or a list of module"
                " names, modules or `moe_monitor.RouterSpec`s."
            )
        detector = self.detector
        if isinstance(detector, str) and detector == "default":
            detector = CollapseDetector()
        elif detector is not None and not all(
            callable(getattr(detector, m, None)) for m in ("update", "state_dict", "load_state_dict")
        ):
            raise error(
                f"detector={detector!r} is not valid; choose 'default', None (no detection) or a"
                " `moe_monitor.CollapseDetector`."
            )
        controllers = _controllers(self.controllers, error)
        sinks = _sinks(self.sinks, allow_none, error, owner)
        if self.on_alert is not None and not callable(self.on_alert):
            raise error(f"on_alert={self.on_alert!r} is not valid; choose None or a callable(event).")
        name = self.name
        if name is not None and not (isinstance(name, str) and name.replace("_", "").replace("-", "").isalnum()):
            raise error(
                f"name={name!r} is not valid; choose None or a short identifier of letters, digits, '_' and '-' (it"
                f" becomes the key prefix moe/<name>/... and the folder of this {owner}'s files)."
            )
        console = self.console
        if not (isinstance(console, (bool, ConsoleSink)) or (isinstance(console, str) and console in INTERFACES)):
            raise error(
                f"console={console!r} is not valid; choose True (incident lines and a summary on the console), False"
                " (none), 'cli' (hints name moe-monitor train flags) or a `moe_monitor.sinks.console.ConsoleSink`."
            )
        return dataclasses.replace(self, detector=detector, controllers=controllers, sinks=sinks)


@dataclass(frozen=True)
class TrainerOptions(WatchOptions):
    """The options of a trainer callback (:class:`~moe_monitor.callback.MoEMonitor`,
    :class:`~moe_monitor.integrations.transformers.MoETrainerCallback`): those of :class:`WatchOptions`, where
    ``log_every=None`` takes the trainer's interval and ``sinks=None`` the sinks of its loggers, and
    ``save_frames``.

    Attributes:
        save_frames: write the history files beside the trainer's run.

    Example:
        >>> options = TrainerOptions.check({"log_every_n_steps": None, "sinks": None}, owner="MoEMonitor",
        ...     every_name="log_every_n_steps")
        >>> options.log_every, options.sinks, options.save_frames
        (None, None, True)
    """

    log_every: int | None = None
    sinks: tuple[Any, ...] | None = None
    save_frames: bool = True

    trainer_defaults: ClassVar[bool] = True
    flags: ClassVar[tuple[str, ...]] = (*WatchOptions.flags, "save_frames")


def _controllers(controllers: Iterable[Any], error: type[Exception]) -> tuple[Any, ...]:
    controllers = tuple(controllers)
    for controller in controllers:
        missing = [m for m in CONTROLLER_METHODS if not callable(getattr(controller, m, None))]
        if missing:
            raise error(
                f"controllers contains {controller!r}, which lacks {', '.join(missing)}; choose controllers from"
                " `moe_monitor.controllers` (AuxLossController, RouterNoiseController, ExpertBiasController)."
            )
    names = [controller_name(c) for c in controllers]
    if len(set(names)) != len(names):
        raise error(
            f"controllers have repeated names {names}; give each controller a distinct `name` so their"
            " checkpoint states do not collide."
        )
    return controllers


def _sinks(sinks: Any, allow_none: bool, error: type[Exception], owner: str) -> tuple[Any, ...] | None:
    if sinks is None and allow_none:
        return None
    if sinks is None or isinstance(sinks, (str, bytes)) or not isinstance(sinks, Iterable):
        default = ", or None (the sinks of the trainer's loggers)" if allow_none else ""
        raise error(
            f"sinks={sinks!r} is not valid; choose a list of sinks (each a moe_monitor.sinks.base.Sink, a directory"
            f" path, a SummaryWriter, a wandb run or a Lightning logger){default}, e.g. {owner}(sinks=[MySink()])."
        )
    try:
        return check_targets(sinks)
    except ValueError as err:  # in the front end's own error type
        raise error(str(err)) from None


class OptionsAccess:
    """What a front end built on :class:`WatchOptions` shows of them as its own attributes (read-only): ``name``,
    ``detector`` and ``controllers``; every other option is read as ``front_end.options.<option>``.

    Example:
        >>> class FrontEnd(OptionsAccess):
        ...     def __init__(self, name=None):
        ...         self.options = WatchOptions.check(locals(), owner="FrontEnd")
        >>> FrontEnd(name="fast").name, FrontEnd().controllers
        ('fast', ())
    """

    options: WatchOptions

    @property
    def name(self) -> str | None:
        """Tells several monitors of one run apart (``None``: unnamed)."""
        return self.options.name

    @property
    def detector(self) -> CollapseDetector | None:
        """The collapse detector (``None``: no detection)."""
        return self.options.detector

    @property
    def controllers(self) -> tuple[Any, ...]:
        """The controllers, in the order they run."""
        return self.options.controllers
