"""The ``moe-monitor`` command line.

``moe-monitor train`` trains the reference MoE transformer on the bundled corpus with Lightning. The parser is
built from one function per subcommand (``add_train_parser``), and every callback of the run comes from
:func:`build_callbacks`, so a new subcommand or callback is one function.

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


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where it says something (not for unset options that fall back to the preset)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def add_train_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Adds the ``train`` subcommand to ``subparsers`` and returns its parser (extend it to add options)."""
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
    train.add_argument("--steps", type=int, default=None, help="optimizer steps (preset default)")
    train.add_argument("--batch-size", type=int, default=None, help="sequences per step (preset default)")
    train.add_argument("--lr", type=float, default=None, help="peak learning rate (preset default)")
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
        "bias (selection-only expert bias; turns on --expert-bias)",
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
        choices=LOGGER_CHOICES,
        default="tensorboard",
        help="where metrics go (wandb: set WANDB_MODE=offline to log without an account)",
    )
    output.add_argument("--out", type=Path, default=Path("runs"), help="directory for logs and checkpoints")
    output.add_argument("--name", default="moe", help="run name (a subdirectory of --out)")
    output.add_argument("--log-every", type=int, default=10, help="log metrics every N steps")
    parser.set_defaults(func=run_train)
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The ``moe-monitor`` parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="moe-monitor", description="Watch, alert on and repair expert collapse in MoE routers."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_train_parser(subparsers)
    add_report_parser(subparsers)
    return parser


def add_report_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Adds the ``report`` subcommand: a self-contained HTML page of a finished run."""
    parser = subparsers.add_parser(
        "report",
        help="write a self-contained HTML report of a finished run",
        description="Write a self-contained HTML report (inline SVG charts, no JavaScript) of the routing history "
        "that MoEMonitor saved under RUN_DIR (e.g. runs/moe/version_0).",
    )
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="output directory of a training run")
    parser.add_argument("-o", "--output", type=Path, default=None, help="HTML file (default: RUN_DIR/moe_report.html)")
    parser.set_defaults(func=run_report)
    return parser


def run_report(args: argparse.Namespace) -> int:
    """Runs ``moe-monitor report``; returns 2 with the reason when the run directory holds no history."""
    from moe_monitor.report import RunFilesNotFoundError, write_report

    try:
        path = write_report(args.run_dir, args.output)
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
    """The controller names of ``--control`` (``"aux, bias"`` -> ``["aux", "bias"]``)."""
    return [name.strip().lower() for name in args.control.split(",") if name.strip()]


def scenario_of(args: argparse.Namespace) -> Any:
    """The :class:`~moe_monitor.scenarios.Scenario` named by ``--scenario``.

    Raises:
        ValueError: for an unknown name, listing the known ones.
    """
    from moe_monitor.scenarios import SCENARIOS

    if args.scenario not in SCENARIOS:
        raise ValueError(f"--scenario={args.scenario!r} is unknown; choose one of {', '.join(SCENARIOS)}.")
    return SCENARIOS[args.scenario]


def build_callbacks(args: argparse.Namespace) -> list[Callback]:
    """Every callback of a ``train`` run: the MoE monitor (with the ``--control`` controllers), the last
    checkpoint and the learning rate per step.

    Raises:
        ValueError: for an unknown ``--control`` name, listing the known ones.
    """
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

    callbacks: list[Callback] = [ModelCheckpoint(save_last=True, save_top_k=0), LearningRateMonitor("step")]
    if args.no_monitor:
        if control_names(args) or args.stop_on_collapse:
            raise ValueError("--control and --stop-on-collapse need the monitor; drop --no-monitor.")
        return callbacks
    from moe_monitor.callback import MoEMonitor
    from moe_monitor.controllers import make_controllers

    controllers = make_controllers(control_names(args))
    callbacks.insert(
        0,
        MoEMonitor(
            log_every_n_steps=args.log_every,
            log_expert_loads=args.log_expert_loads,
            controllers=controllers,
            stop_on_collapse=args.stop_on_collapse,
        ),
    )
    return callbacks


def build_logger(args: argparse.Namespace) -> Logger:
    """The Lightning logger chosen by ``--logger``, writing under ``--out/--name``."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

    if args.logger == "tensorboard":
        return TensorBoardLogger(save_dir=str(args.out), name=args.name, default_hp_metric=False)
    if args.logger == "csv":
        return CSVLogger(save_dir=str(args.out), name=args.name)
    if importlib.util.find_spec("wandb") is None:
        raise ModuleNotFoundError('--logger wandb needs wandb: pip install "moe-monitor[wandb]"')
    args.out.mkdir(parents=True, exist_ok=True)
    return WandbLogger(save_dir=str(args.out), project="moe-monitor", name=args.name)


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

    from moe_monitor.reference import CorpusDataModule, ReferenceLM

    # Only set-up mistakes become a short message; an error raised while training keeps its traceback.
    try:
        settings = resolve_training(args)
        config = build_config(args)
        logger = build_logger(args)
        validate = args.val_every > 0
        trainer = pl.Trainer(
            max_steps=settings["steps"],
            max_epochs=1,
            accelerator=args.accelerator,
            devices=args.devices,
            precision=_precision(args.accelerator),
            logger=logger,
            callbacks=build_callbacks(args),
            log_every_n_steps=args.log_every,
            val_check_interval=min(args.val_every, settings["steps"]) if validate else None,
            check_val_every_n_epoch=None if validate else 1,
            limit_val_batches=None if validate else 0,
            gradient_clip_val=1.0,
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
    if args.scenario:
        scenario_of(args).prepare(lm)
    data = CorpusDataModule(
        seq_len=config.seq_len,
        batch_size=settings["batch_size"],
        seed=args.seed,
        # Each of the world_size processes takes its share of one epoch; every one must see `steps` batches.
        train_samples=settings["steps"] * settings["batch_size"] * trainer.world_size,
    )
    start = time.perf_counter()
    trainer.fit(lm, datamodule=data)
    elapsed = time.perf_counter() - start
    _end_process_group()
    if trainer.global_rank == 0:
        _print_summary(trainer, logger, args, elapsed)
    return 0


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
        {'steps': 100, 'batch_size': 16, 'lr': 0.003, 'warmup_steps': 5}
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
    if not lr > 0:
        raise ValueError(f"--lr={lr} must be positive.")
    if args.val_every < 0:
        raise ValueError(f"--val-every={args.val_every} must be 0 (no validation) or a positive step interval.")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads={args.threads} must be at least 1.")
    return {"steps": steps, "batch_size": batch_size, "lr": lr, "warmup_steps": warmup_steps}


def _print_summary(trainer: Any, logger: Logger, args: argparse.Namespace, elapsed: float) -> None:
    metrics = {name: float(value) for name, value in trainer.callback_metrics.items() if value.numel() == 1}
    losses = ", ".join(f"{name} {metrics[name]:.3f}" for name in ("train/loss", "val/loss") if name in metrics)
    print(f"\nTrained {trainer.global_step} steps in {elapsed:.0f} s ({losses}).")
    log_dir = getattr(logger, "log_dir", None) or str(args.out)
    print(f"Logs and checkpoints: {log_dir}")
    if args.logger == "tensorboard":
        print(f"View them with:  tensorboard --logdir {args.out}")
    elif args.logger == "csv":
        print(f"Metrics table:  {Path(log_dir) / 'metrics.csv'}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``moe-monitor`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
