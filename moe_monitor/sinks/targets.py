"""What ``sinks=`` takes: each kind of target a user can name, and the sink objects it becomes.

A target is one of: a :class:`~moe_monitor.sinks.base.Sink` (used as it is: the built-ins of this package or your
own, see ``docs/sinks.md``), a directory path (the history files), a ``torch.utils.tensorboard.SummaryWriter``,
a W&B run, or a Lightning logger (scalars through its ``log_metrics``, plus the rich views of a
``TensorBoardLogger`` or ``WandbLogger``). A new kind of target is one branch of :func:`sink_kind` and one of
:func:`make_sinks`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from moe_monitor.sinks.base import Sink
from moe_monitor.sinks.scalars import ScalarSink

__all__ = ["check_targets", "make_sinks", "sink_kind"]

Kind = Literal["sink", "directory", "summary_writer", "wandb_run", "logger"]


def sink_kind(target: Any) -> Kind | None:
    """Which kind of ``sinks=`` target ``target`` is, or ``None`` when no sink knows it.

    Example:
        >>> from moe_monitor.sinks.console import ConsoleSink
        >>> sink_kind("runs/x"), sink_kind(ConsoleSink()), sink_kind(42)
        ('directory', 'sink', None)
    """
    if isinstance(target, Sink):
        return "sink"
    if isinstance(target, (str, os.PathLike)):
        return "directory"
    if _is_summary_writer(target):
        return "summary_writer"
    if _is_wandb_run(target):
        return "wandb_run"
    if callable(getattr(target, "log_metrics", None)):
        return "logger"
    return None


class _WriterLogger:
    """A ``SummaryWriter`` seen as a logger: ``log_metrics`` and ``experiment``, what the sinks call."""

    def __init__(self, writer: Any) -> None:
        self.experiment = writer

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        for key, value in metrics.items():
            self.experiment.add_scalar(key, value, global_step=step)


class _RunLogger:
    """A W&B run seen as a logger; scalars are plotted against ``trainer/global_step`` like the callback's."""

    def __init__(self, run: Any) -> None:
        self.experiment = run

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from moe_monitor.sinks.wandb import STEP_KEY

        self.experiment.log({**metrics, STEP_KEY: step})


def check_targets(targets: Iterable[Any]) -> tuple[Any, ...]:
    """``targets`` as a tuple, each of a kind :func:`sink_kind` knows.

    Raises:
        ValueError: a target of a kind no sink knows; the message lists the kinds.

    Example:
        >>> check_targets(["runs/x"])
        ('runs/x',)
        >>> check_targets([print])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: sinks contains <built-in function print>, which no sink knows; choose a ...
    """
    targets = tuple(targets)
    for target in targets:
        if sink_kind(target) is None:
            raise ValueError(
                f"sinks contains {target!r}, which no sink knows; choose a torch.utils.tensorboard.SummaryWriter, a"
                " wandb run, a directory path (history files), a Lightning logger or a moe_monitor.sinks.base.Sink"
                " (see docs/sinks.md to write one)."
            )
    return targets


def make_sinks(
    targets: Iterable[Any], log_histograms: bool = True, log_heatmaps: bool = True, detector: Any = None
) -> tuple[list, list]:
    """Turns what a user gives as ``sinks=`` into sink objects and history directories.

    ``detector`` gives TensorBoard sinks the alert thresholds they draw beside each statistic.

    Returns:
        ``(sinks, directories)``.

    Raises:
        ValueError: a target of a kind no sink knows; the message lists the kinds.

    Example:
        >>> sinks, dirs = make_sinks(["runs/x"])
        >>> sinks, dirs
        ([], ['runs/x'])
    """
    sinks: list[Sink] = []
    directories: list[str] = []
    for target in check_targets(targets):
        kind = sink_kind(target)
        if kind == "sink":
            sinks.append(target)
        elif kind == "directory":
            directories.append(os.fspath(target))
        elif kind == "summary_writer":
            from moe_monitor.sinks.tensorboard import TensorBoardSink

            logger = _WriterLogger(target)
            sinks += [ScalarSink([logger]), TensorBoardSink(logger, log_histograms, log_heatmaps, detector)]
        elif kind == "wandb_run":
            from moe_monitor.sinks.wandb import WandbSink

            logger = _RunLogger(target)
            sinks += [ScalarSink([logger]), WandbSink(logger, log_histograms, log_heatmaps)]
        else:
            sinks += _logger_sinks(target, log_histograms, log_heatmaps, detector)
    return sinks, directories


def _logger_sinks(logger: Any, log_histograms: bool, log_heatmaps: bool, detector: Any) -> list[Sink]:
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    sinks: list[Sink] = [ScalarSink([logger])]
    if isinstance(logger, TensorBoardLogger):
        from moe_monitor.sinks.tensorboard import TensorBoardSink

        sinks.append(TensorBoardSink(logger, log_histograms, log_heatmaps, detector))
    elif isinstance(logger, WandbLogger):
        from moe_monitor.sinks.wandb import WandbSink

        sinks.append(WandbSink(logger, log_histograms, log_heatmaps))
    return sinks


def _is_summary_writer(target: Any) -> bool:
    from torch.utils.tensorboard import SummaryWriter

    return isinstance(target, SummaryWriter) or type(target).__name__ == "SummaryWriter"


def _is_wandb_run(target: Any) -> bool:
    module = type(target).__module__
    return module.startswith("wandb.") and callable(getattr(target, "log", None))
