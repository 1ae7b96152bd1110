"""The ``moe-monitor`` command line.

``moe-monitor train`` trains the reference MoE transformer on the bundled corpus with Lightning (checkpoints every
``--ckpt-every`` steps, ``--resume PATH|last`` continues a run in its own folder); ``moe-monitor report`` writes the
HTML report of finished runs; ``moe-monitor audit`` checks a saved checkpoint's routing. The parser is built from one
function per subcommand (``add_train_parser``), and every callback of the run comes from :func:`build_callbacks`, so
a new subcommand or callback is one function.

Example:
    >>> args = build_parser().parse_args(["train", "--experts", "4", "--capacity-factor", "none"])
    >>> args.command, args.experts, args.capacity_factor, args.preset
    ('train', 4, None, 'tiny')
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.loggers import Logger

    from moe_monitor.reference import MoEConfig

# The reference module and Lightning are imported inside the commands: ``moe-monitor --help`` stays instant.
PRESET_NAMES: tuple[str, ...] = ("tiny", "small", "base")
ROUTER_CHOICES: tuple[str, ...] = ("token_choice", "expert_choice")
NOISE_CHOICES: tuple[str, ...] = ("none", "jitter", "gaussian")
LOGGER_CHOICES: tuple[str, ...] = ("tensorboard", "wandb", "csv")
# Names of moe_monitor.scenarios.SCENARIOS, spelled out so that --help does not import torch (a test keeps them equal).
SCENARIO_NAMES: tuple[str, ...] = ("biased_init", "unreachable_experts", "no_aux_high_lr", "low_capacity")

# Training defaults per preset. ``tiny`` is sized so that the default run finishes in about 2-3 minutes on a
# 2-core CPU with the loss clearly falling (measured in docs/benchmarks.md's MoE layer section).
TRAIN_DEFAULTS: dict[str, dict[str, Any]] = {
    "tiny": {"steps": 1000, "batch_size": 16, "lr": 3e-3},
    "small": {"steps": 2000, "batch_size": 32, "lr": 1e-3},
    "base": {"steps": 10000, "batch_size": 32, "lr": 6e-4},
}


def capacity_factor_arg(text: str) -> float | None:
    """Parses ``--capacity-factor``: a positive number, or ``none`` for dropless routing.

    Example:
        >>> capacity_factor_arg("1.25"), capacity_factor_arg("None")
        (1.25, None)
    """
    if text.strip().lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number nor 'none'") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive (or 'none' for dropless routing)")
    return value


def logger_arg(text: str) -> tuple[str, ...]:
    """Parses ``--logger``: one or more of :data:`LOGGER_CHOICES`, comma-separated, or ``none``.

    Example:
        >>> logger_arg("tensorboard, csv"), logger_arg("none")
        (('tensorboard', 'csv'), ())
    """
    names = [name.strip().lower() for name in text.split(",") if name.strip()]
    if names == ["none"]:
        return ()
    unknown = [name for name in names if name not in LOGGER_CHOICES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a list of loggers; choose one or more of {', '.join(LOGGER_CHOICES)} separated by "
            "commas (e.g. tensorboard,csv), or none"
        )
    return tuple(dict.fromkeys(names))


def preset_defaults(key: str) -> str:
    """The value of a training default in each preset, for ``--help``.

    Example:
        >>> preset_defaults("steps")
        'tiny 1000, small 2000, base 10000'
    """
    return ", ".join(f"{preset} {TRAIN_DEFAULTS[preset][key]:g}" for preset in PRESET_NAMES)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where it says something (not for unset options that fall back to the preset)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        # Identity, not equality: a default of 0 is worth showing (0 == False).
        if any(action.default is blank for blank in (None, False, argparse.SUPPRESS)) or action.default in ("", ()):
            return action.help
        return super()._get_help_string(action)


def add_train_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Adds the ``train`` subcommand to ``subparsers`` and returns its parser (extend it to add options).

    Example:
        >>> parser = argparse.ArgumentParser()
        >>> _ = add_train_parser(parser.add_subparsers(dest="command"))
        >>> args = parser.parse_args(["train", "--steps", "20", "--control", "bias", "--resume", "last"])
        >>> args.command, args.steps, args.control, args.resume
        ('train', 20, 'bias', 'last')
    """
    parser = subparsers.add_parser(
        "train",
        help="train the reference MoE transformer on the bundled corpus",
        description="Train the reference MoE transformer on the bundled byte-level corpus "
        "(Python's help text and standard-library sources). Unset options take the preset's defaults.",
        formatter_class=_HelpFormatter,
    )
    model = parser.add_argument_group("model")
    model.add_argument("--preset", choices=PRESET_NAMES, default="tiny", help="model and training size")
    model.add_argument("--router", choices=ROUTER_CHOICES, default=None, help="routing rule (default: token_choice)")
    model.add_argument("--experts", type=int, default=None, help="experts per MoE layer (preset: 8)")
    model.add_argument("--top-k", type=int, default=None, help="experts per token (preset: 2)")
    model.add_argument(
        "--capacity-factor",
        type=capacity_factor_arg,
        # Absent unless given: 'none' is a value (dropless) that must be able to override a scenario's capacity.
        default=argparse.SUPPRESS,
        help="per-expert capacity factor, or 'none' for dropless routing (default: none)",
    )
    model.add_argument("--noise", choices=NOISE_CHOICES, default=None, help="router noise in training (default: none)")
    model.add_argument("--noise-std", type=float, default=None, help="jitter epsilon or Gaussian std (default: 0.01)")
    model.add_argument("--aux-coef", type=float, default=None, help="load-balancing loss coefficient (default: 0.01)")
    model.add_argument("--z-coef", type=float, default=None, help="router z-loss coefficient (default: 0.001)")
    model.add_argument("--expert-bias", action="store_true", help="give routers a selection-only expert bias")

    train = parser.add_argument_group("training")
    train.add_argument(
        "--steps", type=int, default=None, help=f"optimizer steps (default per preset: {preset_defaults('steps')})"
    )
    train.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help=f"sequences per step (default per preset: {preset_defaults('batch_size')})",
    )
    train.add_argument(
        "--lr",
        type=float,
        default=None,
        help=f"peak learning rate (default per preset: {preset_defaults('lr')}; a --scenario may set its own)",
    )
    train.add_argument("--warmup-steps", type=int, default=None, help="linear warm-up (default: 5%% of steps)")
    train.add_argument("--seed", type=int, default=0, help="seed of the weights and of the training windows")
    train.add_argument("--accelerator", default="auto", help="Lightning accelerator: auto, cpu, gpu, ...")
    train.add_argument("--devices", default="auto", help="Lightning devices: auto, a count, or a list")
    train.add_argument("--val-every", type=int, default=100, help="validate every N steps (0: never)")
    train.add_argument(
        "--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice; 1 on a busy CPU)"
    )

    monitor = parser.add_argument_group("monitor")
    monitor.add_argument("--no-monitor", action="store_true", help="train without the MoEMonitor callback")
    monitor.add_argument(
        "--control",
        default="",
        help="comma-separated controllers that repair a collapse: aux (aux-loss weight), noise (router noise), "
        "bias (selection-only expert bias; turns on --expert-bias) (default: none)",
    )
    monitor.add_argument("--stop-on-collapse", action="store_true", help="stop training at the first critical alert")
    monitor.add_argument("--log-expert-loads", action="store_true", help="also log one scalar per (layer, expert)")
    monitor.add_argument(
        "--scenario",
        default=None,
        help=f"make the routers collapse on purpose: {', '.join(SCENARIO_NAMES)} (see docs/detection.md)",
    )

    output = parser.add_argument_group("output")
    output.add_argument(
        "--logger",
        type=logger_arg,
        default="tensorboard",
        help=f"where metrics go: one or more of {', '.join(LOGGER_CHOICES)}, comma-separated, or none "
        "(wandb: set WANDB_MODE=offline to log without an account)",
    )
    output.add_argument("--out", type=Path, default=Path("runs"), help="directory for logs and checkpoints")
    output.add_argument("--name", default="moe", help="run name (a subdirectory of --out)")
    output.add_argument("--log-every", type=int, default=10, help="log metrics every N steps")
    output.add_argument("--wandb-project", default="moe-monitor", help="W&B project (with --logger wandb)")
    output.add_argument("--wandb-entity", default=None, help="W&B entity, user or team (default: your W&B default)")
    output.add_argument("--run-name", default=None, help="W&B display name of the run (default: --name)")

    resume = parser.add_argument_group("checkpoints")
    resume.add_argument(
        "--ckpt-every",
        type=int,
        default=None,
        help="write checkpoints/last.ckpt every N steps, and at the end (default: a tenth of --steps rounded up "
        "to a multiple of --log-every, so that a resumed run keeps whole windows; 0: only at the end)",
    )
    resume.add_argument(
        "--resume",
        default=None,
        metavar="PATH|last",
        help="continue a run from a checkpoint (a .ckpt file or a run folder such as runs/moe/version_0), or "
        "'last' for the newest checkpoints/last.ckpt under --out/--name; the run goes on in its own folder with "
        "the options it was started with",
    )
    parser.set_defaults(func=run_train)
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The ``moe-monitor`` parser with every subcommand.

    Example:
        >>> args = build_parser().parse_args(["train", "--steps", "10", "--control", "aux,bias"])
        >>> args.steps, args.control, control_names(args)
        (10, 'aux,bias', ['aux', 'bias'])
    """
    from moe_monitor import __version__

    parser = argparse.ArgumentParser(
        prog="moe-monitor", description="Watch, alert on and repair expert collapse in MoE routers."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_train_parser(subparsers)
    add_report_parser(subparsers)
    add_audit_parser(subparsers)
    return parser


def add_report_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Adds the ``report`` subcommand: a self-contained HTML page of one finished run, or several side by side.

    Example:
        >>> parser = argparse.ArgumentParser()
        >>> _ = add_report_parser(parser.add_subparsers(dest="command"))
        >>> args = parser.parse_args(["report", "runs/moe/version_0", "runs/moe/version_1"])
        >>> args.command, [p.name if hasattr(p, "name") else p for p in args.run_dirs]
        ('report', ['version_0', 'version_1'])
    """
    parser = subparsers.add_parser(
        "report",
        help="write a self-contained HTML report of finished runs",
        description="Write a self-contained HTML report (inline SVG charts, no JavaScript) of the routing history "
        "that MoEMonitor saved under RUN_DIR (e.g. runs/moe/version_0, a W&B run folder, or any folder above the "
        "history files). Several RUN_DIRs give one page that compares the runs side by side.",
    )
    parser.add_argument(
        "run_dirs", type=Path, nargs="+", metavar="RUN_DIR", help="output directory of a training run (one or more)"
    )
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        default=None,
        help="HTML file (default: RUN_DIR/moe_report.html, or FIRST_RUN_DIR/moe_compare.html for several runs)",
    )
    parser.set_defaults(func=run_report)
    return parser


def add_audit_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Adds the ``audit`` subcommand: the routing health of a saved model on a few batches.

    Example:
        >>> parser = argparse.ArgumentParser()
        >>> _ = add_audit_parser(parser.add_subparsers(dest="command"))
        >>> args = parser.parse_args(["audit", "runs/moe/version_0", "--max-batches", "2"])
        >>> args.command, args.model_dir.name, args.max_batches
        ('audit', 'version_0', 2)
    """
    parser = subparsers.add_parser(
        "audit",
        help="check the routing of a saved model (Hugging Face folder or moe-monitor checkpoint)",
        description="Run a saved MoE model on a few batches (eval mode, no gradients) and report the routing "
        "health of every router layer: load, dead experts, MaxVio, entropy, what capacity factors 1.0 / 1.25 "
        "would drop, router confidence, co-activation, and a verdict per layer. MODEL_DIR is a save_pretrained "
        "folder of a Hugging Face model (read locally, nothing is downloaded), a .ckpt file of moe-monitor train, "
        "or a run folder holding one.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("model_dir", type=Path, metavar="MODEL_DIR", help="model folder, .ckpt file or run folder")
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="a UTF-8 text file to route (default: the bundled corpus, English help text and Python sources)",
    )
    parser.add_argument("--max-batches", type=int, default=20, help="batches to run")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per batch")
    parser.add_argument(
        "--seq-len", type=int, default=None, help="tokens per sequence (default: the model's, at most 256)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the windows drawn from the text")
    parser.add_argument("-o", "--output", type=Path, default=None, help="also write the HTML report to this file")
    parser.add_argument(
        "--csv", type=Path, default=None, metavar="DIR", help="also write layers.csv, experts.csv and events.csv here"
    )
    parser.set_defaults(func=run_audit)
    return parser


def run_audit(args: argparse.Namespace) -> int:
    """Runs ``moe-monitor audit``; returns 2 with the reason for a model or data it cannot read.

    Example:
        >>> import contextlib, io
        >>> args = build_parser().parse_args(["audit", "runs/moe/version_0", "--max-batches", "0"])
        >>> with contextlib.redirect_stderr(io.StringIO()) as err:
        ...     code = run_audit(args)
        >>> code, err.getvalue().strip()
        (2, 'moe-monitor audit: error: --max-batches=0 must be at least 1.')
    """
    from moe_monitor.audit import AuditInputError, audit_saved

    for flag, value in (("--max-batches", args.max_batches), ("--batch-size", args.batch_size)):
        if value < 1:
            print(f"moe-monitor audit: error: {flag}={value} must be at least 1.", file=sys.stderr)
            return 2
    if args.seq_len is not None and args.seq_len < 2:
        print(f"moe-monitor audit: error: --seq-len={args.seq_len} must be at least 2.", file=sys.stderr)
        return 2
    try:
        report = audit_saved(
            args.model_dir,
            data=args.data,
            max_batches=args.max_batches,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            seed=args.seed,
        )
    except AuditInputError as error:
        print(f"moe-monitor audit: error: {error}", file=sys.stderr)
        return 2
    print(report)
    if args.csv is not None:
        print(f"Tables: {report.save(args.csv)}")
    if args.output is not None:
        print(f"Report: {report.to_html(args.output, name=f'audit of {args.model_dir.resolve().name}')}")
    return 0


def run_report(args: argparse.Namespace) -> int:
    """Runs ``moe-monitor report``; returns 2 with the reason when the run directory holds no history.

    Example:
        >>> import contextlib, io, tempfile
        >>> with tempfile.TemporaryDirectory() as empty, contextlib.redirect_stderr(io.StringIO()) as err:
        ...     code = run_report(build_parser().parse_args(["report", empty]))
        >>> code, err.getvalue().startswith("moe-monitor report: error: no layers.csv")
        (2, True)
    """
    from moe_monitor.report import RunFilesNotFoundError, write_report

    try:
        path = write_report(args.run_dirs, args.output)
    except RunFilesNotFoundError as error:
        print(f"moe-monitor report: error: {error}", file=sys.stderr)
        return 2
    print(f"Report: {path}")
    return 0


def build_config(args: argparse.Namespace) -> MoEConfig:
    """The model configuration of a ``train`` invocation: the preset, then the scenario's overrides, then the
    options given on the command line.

    Example:
        >>> config = build_config(build_parser().parse_args(["train", "--scenario", "low_capacity", "--top-k", "1"]))
        >>> config.capacity_factor, config.top_k, config.aux_loss_coef
        (1.0, 1, 0.01)
    """
    from moe_monitor.reference import MoEConfig

    overrides: dict[str, Any] = dict(scenario_of(args).config_overrides) if args.scenario else {}
    given = {
        "router": args.router,
        "router_noise": args.noise,
        "router_noise_std": args.noise_std,
        "aux_loss_coef": args.aux_coef,
        "z_loss_coef": args.z_coef,
        "n_experts": args.experts,
        "top_k": args.top_k,
    }
    overrides.update({name: value for name, value in given.items() if value is not None})
    if hasattr(args, "capacity_factor"):
        overrides["capacity_factor"] = args.capacity_factor
    # The bias controller steers a per-expert buffer that only exists with expert_bias=True.
    if args.expert_bias or "bias" in control_names(args):
        overrides["expert_bias"] = True
    return MoEConfig.from_preset(args.preset, **overrides)


def control_names(args: argparse.Namespace) -> list[str]:
    """The controller names of ``--control`` (``"aux, bias"`` -> ``["aux", "bias"]``).

    Example:
        >>> control_names(build_parser().parse_args(["train", "--control", "Aux, bias"]))
        ['aux', 'bias']
    """
    return [name.strip().lower() for name in args.control.split(",") if name.strip()]


def scenario_of(args: argparse.Namespace) -> Any:
    """The :class:`~moe_monitor.scenarios.Scenario` named by ``--scenario``.

    Raises:
        ValueError: for an unknown name, listing the known ones.

    Example:
        >>> scenario_of(build_parser().parse_args(["train", "--scenario", "biased_init"])).name
        'biased_init'
    """
    from moe_monitor.scenarios import SCENARIOS

    if args.scenario not in SCENARIOS:
        raise ValueError(f"--scenario={args.scenario!r} is unknown; choose one of {', '.join(SCENARIOS)}.")
    return SCENARIOS[args.scenario]


def build_callbacks(args: argparse.Namespace) -> list[Callback]:
    """Every callback of a ``train`` run: the MoE monitor (with the ``--control`` controllers), ``last.ckpt`` every
    ``--ckpt-every`` steps and at the end, the learning rate per step, and the run's options (for ``--resume``).

    Raises:
        ValueError: for an unknown ``--control`` name, listing the known ones.

    Example:
        >>> args = build_parser().parse_args(["train", "--steps", "100", "--control", "bias"])
        >>> callbacks = build_callbacks(args)
        >>> monitor = next(c for c in callbacks if type(c).__name__ == "MoEMonitor")
        >>> [type(c).__name__ for c in monitor.controllers]
        ['ExpertBiasController']
    """
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

    ckpt_every = resolve_training(args)["ckpt_every"]
    if ckpt_every:
        checkpoint: Callback = _periodic_checkpoint(ckpt_every, args.val_every)
    else:
        checkpoint = ModelCheckpoint(save_last=True, save_top_k=0)
    callbacks: list[Callback] = [checkpoint, _options_callback(args)]
    if args.logger:  # Lightning refuses a LearningRateMonitor without a logger (--logger none)
        callbacks.append(LearningRateMonitor("step"))
    if args.no_monitor:
        if control_names(args) or args.stop_on_collapse:
            raise ValueError("--control and --stop-on-collapse need the monitor; drop --no-monitor.")
        return callbacks
    from moe_monitor.callback import MoEMonitor
    from moe_monitor.controllers import make_controllers
    from moe_monitor.reference.data import DOMAINS

    controllers = make_controllers(control_names(args))
    callbacks.insert(
        0,
        MoEMonitor(
            log_every_n_steps=args.log_every,
            log_expert_loads=args.log_expert_loads,
            controllers=controllers,
            stop_on_collapse=args.stop_on_collapse,
            console="cli",
            # The bundled corpus validates one domain per loader (_corpus_data): windows val/english, val/python.
            val_domains=DOMAINS,
        ),
    )
    return callbacks


# Options that describe the run itself: a resumed run keeps the values it was started with.
_RUN_OPTIONS: tuple[str, ...] = (
    "preset", "router", "experts", "top_k", "capacity_factor", "noise", "noise_std", "aux_coef", "z_coef",
    "expert_bias", "steps", "batch_size", "lr", "warmup_steps", "seed", "val_every", "no_monitor", "control",
    "stop_on_collapse", "log_expert_loads", "scenario", "logger", "out", "name", "log_every", "wandb_project",
    "wandb_entity", "run_name", "ckpt_every",
)  # fmt: skip
# Of these, the ones a resumed run may change.
_CHANGEABLE_ON_RESUME: frozenset[str] = frozenset({"steps", "val_every", "ckpt_every", "out", "name"})
_OPTIONS_KEY = "moe-monitor train options"


def _run_options(args: argparse.Namespace) -> dict[str, Any]:
    """The run's options as plain types (checkpoints load with ``weights_only=True``)."""
    options = {}
    for name in _RUN_OPTIONS:
        if hasattr(args, name):
            value = getattr(args, name)
            options[name] = (
                str(value) if isinstance(value, Path) else list(value) if isinstance(value, tuple) else value
            )
    return options


def _periodic_checkpoint(every: int, val_every: int) -> Callback:
    """``last.ckpt`` every ``every`` steps and at the end of training; at a step that validates, after the
    validation (so that a resumed run has the validation window of that step and does not validate twice)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    class PeriodicCheckpoint(ModelCheckpoint):
        deferred = False

        def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
            if val_every and trainer.global_step % val_every == 0 and trainer.global_step % every == 0:
                self.deferred = True
                return
            super().on_train_batch_end(trainer, pl_module, *args)

        def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
            super().on_validation_end(trainer, pl_module)
            if self.deferred and not trainer.sanity_checking:
                self.deferred = False
                self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

        # Lightning refuses every_n_train_steps together with every_n_epochs, so the final save is done here.
        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            if self._last_global_step_saved != trainer.global_step:
                self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    return PeriodicCheckpoint(save_last=True, save_top_k=0, every_n_train_steps=every)


def _options_callback(args: argparse.Namespace) -> Callback:
    """A callback that saves the ``train`` options in every checkpoint, so that ``--resume`` continues the run."""
    from lightning.pytorch.callbacks import Callback

    class RunOptions(Callback):
        """Saves the ``train`` options in every checkpoint, so that ``--resume`` continues the same run."""

        def __init__(self, options: dict[str, Any]) -> None:
            self.options = options

        @property
        def state_key(self) -> str:
            return _OPTIONS_KEY

        def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
            # Where each logger writes, so that a resumed run's loggers go on in the same places.
            from lightning.pytorch.loggers import WandbLogger

            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    self.options["wandb_id"] = logger.version
                else:
                    kind = "csv" if "CSV" in type(logger).__name__ else "tensorboard"
                    self.options.setdefault("log_dirs", {})[kind] = str(logger.log_dir)

        def state_dict(self) -> dict[str, Any]:
            return dict(self.options)

    return RunOptions(_run_options(args))


@dataclass(frozen=True)
class ResumePoint:
    """Where ``--resume`` continues: the checkpoint, its step, the run folder it belongs to and its options.

    Example:
        >>> point = ResumePoint(Path("runs/moe/version_0/checkpoints/last.ckpt"), 120, Path("runs/moe/version_0"), {})
        >>> point.step, point.run_dir.name
        (120, 'version_0')
    """

    ckpt: Path
    step: int
    run_dir: Path | None
    options: dict[str, Any]


def find_checkpoint(value: str, out: Path, name: str, extra_roots: tuple[str, ...] = ()) -> Path:
    """The checkpoint file ``--resume VALUE`` names: a ``.ckpt`` file, a run folder holding
    ``checkpoints/last.ckpt``, or ``last`` for the newest ``last.ckpt`` of a run under ``out/name``.

    Raises:
        ValueError: when there is none, saying what to pass instead.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as out:
        ...     ckpt = Path(out, "moe", "version_0", "checkpoints", "last.ckpt")
        ...     ckpt.parent.mkdir(parents=True)
        ...     ckpt.touch()
        ...     run_dir = str(ckpt.parent.parent)
        ...     find_checkpoint("last", Path(out), "moe") == ckpt, find_checkpoint(run_dir, Path(out), "moe") == ckpt
        (True, True)
    """
    if value == "last":
        root = out / name
        # With W&B as the first logger, Lightning puts checkpoints under --out/<W&B project>/<run id>.
        bases = (root, *(out / extra for extra in extra_roots))
        patterns = ("*/checkpoints/last.ckpt", "checkpoints/last.ckpt")  # the second: a run with --logger none
        candidates = [p for base in bases for pattern in patterns for p in base.glob(pattern)]
        found = sorted(candidates, key=lambda p: p.stat().st_mtime)
        if not found:
            raise ValueError(
                f"--resume last found no checkpoint under {root} (looked for {root}/*/checkpoints/last.ckpt). "
                "Pass the --out and --name of the run to resume, or --resume PATH with its .ckpt file or run folder."
            )
        return found[-1]
    path = Path(value)
    if path.is_dir():
        for candidate in (path / "checkpoints" / "last.ckpt", path / "last.ckpt"):
            if candidate.is_file():
                return candidate
        raise ValueError(
            f"--resume {value}: the folder holds no checkpoints/last.ckpt; pass a .ckpt file, a run folder such as "
            f"{out / name / 'version_0'}, or 'last'."
        )
    if not path.is_file():
        raise ValueError(
            f"--resume {value}: no such file or folder; pass a .ckpt file, a run folder such as "
            f"{out / name / 'version_0'}, or 'last' (the newest checkpoint under --out/--name)."
        )
    return path


def resume_point(args: argparse.Namespace) -> ResumePoint:
    """Reads the checkpoint of ``--resume``: its step, its run folder and the options the run was started with.

    Example:
        >>> args = build_parser().parse_args(["train", "--resume", "no/such.ckpt"])
        >>> try:
        ...     resume_point(args)
        ... except ValueError as error:
        ...     print(str(error)[:43])
        --resume no/such.ckpt: no such file or fold
    """
    import torch

    ckpt = find_checkpoint(args.resume, args.out, args.name, (args.wandb_project,))
    try:
        checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file gets the same advice
        raise ValueError(
            f"--resume {args.resume}: {ckpt} is not a readable checkpoint ({type(error).__name__}: {error}); "
            "pass another .ckpt file, e.g. an earlier one of the same run."
        ) from None
    if "global_step" not in checkpoint or "hyper_parameters" not in checkpoint:
        raise ValueError(f"--resume {args.resume}: {ckpt} is not a checkpoint of moe-monitor train.")
    options = checkpoint.get("callbacks", {}).get(_OPTIONS_KEY, {})
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None
    return ResumePoint(ckpt, int(checkpoint["global_step"]), run_dir, options)


def merge_resumed_options(args: argparse.Namespace, point: ResumePoint, given: set[str]) -> argparse.Namespace:
    """The options of a resumed run: those it was started with, then the ones given now that may change.

    Raises:
        ValueError: when an option given now differs from the resumed run's and cannot change mid-run.

    Example:
        >>> args = build_parser().parse_args(["train", "--seed", "1"])
        >>> point = ResumePoint(Path("last.ckpt"), 50, None, {"seed": 0})
        >>> try:
        ...     merge_resumed_options(args, point, {"seed"})
        ... except ValueError as error:
        ...     print(str(error)[:60])
        --seed 1 differs from the run being resumed (started with --
    """
    current = _run_options(args)
    for name in sorted(given & set(point.options) - _CHANGEABLE_ON_RESUME):
        if current.get(name) != point.options[name]:
            flag = "--" + name.replace("_", "-")
            started = "without it" if point.options[name] is None else f"with {flag} {point.options[name]}"
            raise ValueError(
                f"{flag} {current.get(name)} differs from the run being resumed (started {started}); a resumed "
                f"run keeps its options: drop {flag}, or start a new run without --resume."
            )
    merged = argparse.Namespace(**vars(args))
    for name, value in point.options.items():
        if name in given and name in _CHANGEABLE_ON_RESUME:
            continue
        if name == "out":
            value = Path(value)
        elif name == "logger":
            value = tuple(value)
        setattr(merged, name, value)
    return merged


def explicit_options(argv: list[str]) -> set[str]:
    """Destinations of the options written on the command line (not left at their defaults).

    Example:
        >>> sorted(explicit_options(["train", "--steps", "5", "--resume", "last"]))
        ['resume', 'steps']
    """
    parser = build_parser()
    for sub in (a for a in parser._actions if isinstance(a, argparse._SubParsersAction)):
        for subparser in sub.choices.values():
            subparser._defaults.clear()
            for action in subparser._actions:
                action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv))) - {"command"}


def build_loggers(args: argparse.Namespace, point: ResumePoint | None = None) -> list[Logger]:
    """The Lightning loggers of ``--logger``, writing under ``--out/--name``; all in one run folder
    (``version_N``), the resumed run's own folder with ``--resume``.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as out:
        ...     args = build_parser().parse_args(["train", "--logger", "tensorboard,csv", "--out", out])
        ...     [type(logger).__name__ for logger in build_loggers(args)]
        ['TensorBoardLogger', 'CSVLogger']
    """
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

    if "wandb" in args.logger and importlib.util.find_spec("wandb") is None:
        raise ModuleNotFoundError('--logger wandb needs wandb: pip install "moe-monitor[wandb]"')
    for flag, value in (("--wandb-entity", args.wandb_entity), ("--run-name", args.run_name)):
        if value is not None and "wandb" not in args.logger:
            raise ValueError(f"{flag} names a W&B run; add --logger wandb (e.g. --logger tensorboard,wandb).")
    recorded = point.options.get("log_dirs", {}) if point is not None else {}
    version = None
    if point is not None and point.run_dir is not None and not recorded:
        version = point.run_dir.name  # a checkpoint without recorded places: its run folder
    # purge_step hides the TensorBoard events that the interrupted process wrote after its checkpoint.
    resuming = point is not None and (point.run_dir is not None or bool(recorded))
    loggers: list[Logger] = []
    for kind in args.logger:
        if kind in recorded:
            log_dir = Path(recorded[kind])
            save_dir, name, place = str(log_dir.parent.parent), log_dir.parent.name, log_dir.name
        elif version is not None and point is not None and point.run_dir is not None:
            save_dir, name, place = str(point.run_dir.parent.parent), point.run_dir.parent.name, version
        else:
            save_dir, name, place = str(args.out), args.name, version
        if kind == "tensorboard":
            purge = {"purge_step": point.step + 1} if resuming and point is not None else {}
            logger: Logger = _tensorboard_logger(
                save_dir=save_dir, name=name, version=place, default_hp_metric=False, **purge
            )
        elif kind == "csv":
            logger = _csv_logger(save_dir, name, place, point if resuming else None)
        else:
            args.out.mkdir(parents=True, exist_ok=True)
            wandb_id = point.options.get("wandb_id") if point is not None else None
            logger = WandbLogger(
                save_dir=str(args.out),
                project=args.wandb_project,
                entity=args.wandb_entity,
                name=args.run_name or args.name,
                **({"id": wandb_id, "resume": "allow"} if wandb_id else {}),
            )
        loggers.append(logger)
        if version is None and not recorded and isinstance(logger, (TensorBoardLogger, CSVLogger)):
            # The first file logger picks the next free version_N; the others write into the same folder.
            version = f"version_{logger.version}" if isinstance(logger.version, int) else logger.version
    return loggers


def _flush_on_checkpoint(base: type) -> type:
    """``base`` (a Lightning logger class) writing its buffered metrics to disk whenever a checkpoint is saved,
    so that a killed run's files hold everything up to its last checkpoint."""

    class Flushing(base):
        def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
            super().after_save_checkpoint(checkpoint_callback)
            experiment = self.experiment
            (experiment.flush if hasattr(experiment, "flush") else experiment.save)()

    Flushing.__name__ = Flushing.__qualname__ = base.__name__
    return Flushing


def _tensorboard_logger(**kwargs: Any) -> Logger:
    from lightning.pytorch.loggers import TensorBoardLogger

    return _flush_on_checkpoint(TensorBoardLogger)(**kwargs)


def _csv_logger(save_dir: str, name: str, version: str | None, point: ResumePoint | None) -> Logger:
    """A CSV logger; when resuming, ``metrics.csv`` keeps the rows up to the checkpoint's step."""
    import csv

    from lightning.pytorch.loggers import CSVLogger

    logger = _flush_on_checkpoint(CSVLogger)(save_dir=save_dir, name=name, version=version)
    path = Path(logger.log_dir) / "metrics.csv"
    kept: list[dict[str, Any]] = []
    if point is not None and path.is_file():
        with path.open(newline="") as file:
            kept = [
                {key: value for key, value in row.items() if value != ""}
                for row in csv.DictReader(file)
                if row.get("step") and int(float(row["step"])) <= point.step
            ]
    with warnings.catch_warnings():
        # Lightning's writer deletes the metrics.csv of an existing folder, with a warning: the kept rows go back
        # below. Made now, before another logger writes into the shared folder and makes it warn for nothing.
        warnings.filterwarnings("ignore", message="Experiment logs directory")
        writer = logger.experiment
    if kept:
        writer.metrics.extend(kept)
        writer.save()
    return logger


def _precision(accelerator: str) -> str:
    import torch

    # bf16 needs no loss scaling, and the router computes in fp32 regardless.
    wants_cuda = accelerator in ("auto", "gpu", "cuda")
    if wants_cuda and torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False):
        return "bf16-mixed"
    return "32-true"


def run_train(args: argparse.Namespace) -> int:
    """Runs ``moe-monitor train``; returns the process exit code (2 for a bad option, with the reason printed)."""
    import lightning.pytorch as pl
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from moe_monitor.reference import ReferenceLM

    # Only set-up mistakes become a short message; an error raised while training keeps its traceback.
    point = None
    try:
        if args.resume is not None:
            point = resume_point(args)
            args = merge_resumed_options(args, point, getattr(args, "given", set()))
        settings = resolve_training(args)
        config = build_config(args)
        loggers = build_loggers(args, point)
        validate = args.val_every > 0
        trainer = pl.Trainer(
            max_steps=settings["steps"],
            # One epoch is the run; a run resumed with a larger --steps goes on into a second one.
            max_epochs=1 if point is None else -1,
            accelerator=args.accelerator,
            devices=args.devices,
            precision=_precision(args.accelerator),
            logger=loggers or False,
            default_root_dir=str(args.out / args.name),
            callbacks=build_callbacks(args),
            log_every_n_steps=args.log_every,
            val_check_interval=min(args.val_every, settings["steps"]) if validate else None,
            check_val_every_n_epoch=None if validate else 1,
            limit_val_batches=None if validate else 0,
            gradient_clip_val=1.0,
        )
        if point is not None and point.step >= settings["steps"]:
            raise ValueError(
                f"--resume: {point.ckpt} is at step {point.step}, the run's --steps is {settings['steps']}: it is "
                f"finished. Pass a larger --steps (e.g. --steps {2 * settings['steps']}) to train it further."
            )
    except (ValueError, ModuleNotFoundError) as error:
        print(f"moe-monitor train: error: {error}", file=sys.stderr)
        return 2
    except MisconfigurationException as error:
        hint = "check --accelerator and --devices; '--accelerator cpu --devices 1' works on any machine."
        print(f"moe-monitor train: error: {error}\n  {hint}", file=sys.stderr)
        return 2
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    pl.seed_everything(args.seed, verbose=False)
    lm = ReferenceLM(config, **{name: settings[name] for name in ("lr", "warmup_steps")}, max_steps=settings["steps"])
    if args.scenario and point is None:
        scenario_of(args).prepare(lm)  # a resumed model's weights already carry the scenario
    data = _corpus_data(
        config.seq_len,
        settings["batch_size"],
        args.seed,
        # Each of the world_size processes takes its share of one epoch; every one must see `steps` batches.
        settings["steps"] * settings["batch_size"] * trainer.world_size,
        0 if point is None else point.step * settings["batch_size"] * trainer.world_size,
    )
    if point is not None and trainer.global_rank == 0:
        print(f"Resuming {point.ckpt} at step {point.step} of {settings['steps']}.")
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            # "your dataloader is not resumable": _corpus_data starts the resumed run past the samples seen.
            warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before")
            trainer.fit(lm, datamodule=data, ckpt_path=None if point is None else str(point.ckpt))
    except SystemExit:
        if not trainer.interrupted:
            raise
    elapsed = time.perf_counter() - start
    _end_process_group()
    if trainer.interrupted:  # Ctrl-C: Lightning shuts down and exits with status 1
        ckpt = Path(trainer.log_dir or args.out) / "checkpoints" / "last.ckpt"
        saved = f"the last checkpoint, {ckpt}, is" if ckpt.is_file() else "no checkpoint was"
        print(
            f"\nInterrupted at step {trainer.global_step}; {saved} written (every --ckpt-every steps). Go on with:  "
            f"moe-monitor train --resume {ckpt.parent.parent}",
            file=sys.stderr,
        )
        return 130
    if trainer.global_rank == 0:
        _print_summary(trainer, loggers, args, elapsed)
    return 0


def _corpus_data(seq_len: int, batch_size: int, seed: int, samples: int, done: int) -> Any:
    """The bundled corpus of a ``train`` run; a resumed run starts after the ``done`` samples it trained on.

    Lightning restarts a loader without a ``state_dict`` from its first batch; starting the training set past the
    samples already seen gives the resumed run the batches the uninterrupted one would have had (the loop then
    closes the restored epoch at once and goes on in the next, which holds the rest).
    """
    from torch.utils.data import Subset

    from moe_monitor.reference import CorpusDataModule

    class ResumedCorpus(CorpusDataModule):
        def setup(self, stage: str | None = None) -> None:
            super().setup(stage)
            if done and not isinstance(self.train_set, Subset):
                self.train_set = Subset(self.train_set, range(min(done, len(self.train_set)), len(self.train_set)))

    return ResumedCorpus(
        seq_len=seq_len, batch_size=batch_size, seed=seed, train_samples=samples, val_loader_per_domain=True
    )


def _end_process_group() -> None:
    """Ends the process group of a multi-process run before the interpreter does.

    Left to interpreter exit, gloo's threads sometimes abort a finished worker with SIGABRT ("terminate called
    without an active exception"), turning a complete run into a failed exit code.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def resolve_training(args: argparse.Namespace) -> dict[str, Any]:
    """Steps, batch size, learning rate and warm-up of a ``train`` run: the options, else the preset's defaults.

    Example:
        >>> resolve_training(build_parser().parse_args(["train", "--steps", "100"]))
        {'steps': 100, 'batch_size': 16, 'lr': 0.003, 'warmup_steps': 5, 'ckpt_every': 10}
    """
    defaults = TRAIN_DEFAULTS[args.preset]
    steps = args.steps if args.steps is not None else defaults["steps"]
    batch_size = args.batch_size if args.batch_size is not None else defaults["batch_size"]
    scenario_lr = scenario_of(args).lr if args.scenario else None
    lr = next(value for value in (args.lr, scenario_lr, defaults["lr"]) if value is not None)
    warmup_steps = args.warmup_steps if args.warmup_steps is not None else max(1, steps // 20)
    for name, value in (("--steps", steps), ("--batch-size", batch_size), ("--log-every", args.log_every)):
        if value < 1:
            raise ValueError(f"{name}={value} must be at least 1.")
    if args.ckpt_every is None:
        # A tenth of the run, on a window boundary: a resumed run then starts a whole window.
        ckpt_every = -(-max(1, steps // 10) // args.log_every) * args.log_every
    elif args.ckpt_every < 0:
        raise ValueError(f"--ckpt-every={args.ckpt_every} must be 0 (only at the end) or a positive step interval.")
    else:
        ckpt_every = args.ckpt_every
    if not lr > 0:
        raise ValueError(f"--lr={lr} must be positive.")
    if args.val_every < 0:
        raise ValueError(f"--val-every={args.val_every} must be 0 (no validation) or a positive step interval.")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads={args.threads} must be at least 1.")
    return {"steps": steps, "batch_size": batch_size, "lr": lr, "warmup_steps": warmup_steps, "ckpt_every": ckpt_every}


def _print_summary(trainer: Any, loggers: list[Logger], args: argparse.Namespace, elapsed: float) -> None:
    metrics = {name: float(value) for name, value in trainer.callback_metrics.items() if value.numel() == 1}
    losses = ", ".join(f"{name} {metrics[name]:.3f}" for name in ("train/loss", "val/loss") if name in metrics)
    print(f"\nTrained {trainer.global_step} steps in {elapsed:.0f} s ({losses}).")
    log_dir = trainer.log_dir or str(args.out)
    print(f"Logs and checkpoints: {log_dir}")
    kinds = set(args.logger)
    if "tensorboard" in kinds:
        print(f"View them with:  tensorboard --logdir {args.out}")
    if "csv" in kinds:
        csv_dir = next(logger.log_dir for logger in loggers if type(logger).__name__ == "CSVLogger")
        print(f"Metrics table:  {Path(csv_dir) / 'metrics.csv'}")
    if trainer.checkpoint_callback is not None:
        print(f"Train it further with:  moe-monitor train --resume {log_dir} --steps {2 * trainer.global_step}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``moe-monitor`` console script.

    Example:
        >>> import contextlib, io, tempfile
        >>> with tempfile.TemporaryDirectory() as empty, contextlib.redirect_stderr(io.StringIO()):
        ...     main(["report", empty])  # no run there: status 2 and the reason on stderr
        2
    """
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.command == "train":
        args.given = explicit_options(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
