"""``moe-monitor train`` end to end on a small model, and its error messages."""

from __future__ import annotations

import pytest
import torch

from moe_monitor import cli

SMALL = ["--steps", "5", "--batch-size", "2", "--experts", "4", "--val-every", "3", "--log-every", "1"]


@pytest.fixture
def tiny_preset(monkeypatch):
    """Shrinks the ``tiny`` preset so that the end-to-end runs take a second."""
    from moe_monitor.reference import config

    small = dict(d_model=16, n_layers=2, n_heads=2, seq_len=16, n_experts=8, top_k=2, d_expert=16)
    monkeypatch.setitem(config.PRESETS, "tiny", small)


@pytest.mark.slow
def test_train_writes_tensorboard_events_and_checkpoint(tiny_preset, tmp_path, capsys):
    assert cli.main(["train", *SMALL, "--out", str(tmp_path), "--capacity-factor", "1.0", "--noise", "jitter"]) == 0
    run_dir = tmp_path / "moe" / "version_0"
    events = list(run_dir.glob("events.out.tfevents.*"))
    assert events, sorted(p.name for p in tmp_path.rglob("*"))

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    assert {"train/loss", "train/aux_loss", "train/z_loss", "val/loss"} <= tags
    assert [event.step for event in accumulator.Scalars("train/loss")] == [0, 1, 2, 3, 4]
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 5
    assert checkpoint["hyper_parameters"]["config"]["n_experts"] == 4
    assert checkpoint["hyper_parameters"]["config"]["capacity_factor"] == 1.0
    out = capsys.readouterr().out
    assert f"tensorboard --logdir {tmp_path}" in out and str(run_dir) in out


@pytest.mark.slow
def test_train_with_csv_logger_and_expert_choice(tiny_preset, tmp_path):
    argv = ["train", *SMALL, "--out", str(tmp_path), "--logger", "csv", "--router", "expert_choice"]
    assert cli.main(argv) == 0
    header = (tmp_path / "moe" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/loss", "train/aux_loss", "val/loss"} <= set(header)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--top-k", "9"], "top_k=9 is larger than n_experts=8"),
        (["--steps", "0"], "--steps=0 must be at least 1"),
        (["--val-every", "-1"], "--val-every=-1"),
    ],
)
def test_bad_options_exit_2_with_the_reason(tmp_path, capsys, argv, message):
    assert cli.main(["train", *argv, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "moe").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_missing_gpu_is_a_usage_error(tmp_path, capsys):
    assert cli.main(["train", "--accelerator", "gpu", "--out", str(tmp_path)]) == 2
    assert "--accelerator cpu --devices 1" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "-1", "lots"])
def test_bad_capacity_factor_is_a_usage_error(capsys, value):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--capacity-factor", value])
    assert exit_info.value.code == 2
    assert "--capacity-factor" in capsys.readouterr().err


def test_options_override_the_preset():
    args = cli.build_parser().parse_args(
        ["train", "--experts", "16", "--top-k", "4", "--noise", "gaussian", "--noise-std", "0.3", "--aux-coef", "0"]
    )
    config = cli.build_config(args)
    assert (config.n_experts, config.top_k, config.router_noise, config.router_noise_std) == (16, 4, "gaussian", 0.3)
    assert config.aux_loss_coef == 0.0 and config.capacity_factor is None and config.d_model == 128


def test_build_callbacks_returns_callbacks():
    from lightning.pytorch.callbacks import Callback

    callbacks = cli.build_callbacks(cli.build_parser().parse_args(["train"]))
    assert callbacks and all(isinstance(callback, Callback) for callback in callbacks)


def test_help_shows_the_real_defaults_per_preset():
    parser = cli.build_parser()
    train = next(a for a in parser._actions if isinstance(a, __import__("argparse")._SubParsersAction)).choices["train"]
    text = " ".join(train.format_help().split())
    assert "(default: )" not in text
    for key, flag in (("steps", "--steps"), ("batch_size", "--batch-size"), ("lr", "--lr")):
        numbers = ", ".join(f"{preset} {cli.TRAIN_DEFAULTS[preset][key]:g}" for preset in cli.PRESET_NAMES)
        assert numbers in text, flag
    assert "tiny 1000, small 2000, base 10000" in text and "tiny 0.003, small 0.001, base 0.0006" in text
    assert "(default: none)" in text and "(default: tensorboard)" in text
    assert "training windows (default: 0)" in text  # a zero default is shown, not taken for "unset"


def test_version_prints_the_package_version(capsys):
    import moe_monitor

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"moe-monitor {moe_monitor.__version__}"


@pytest.mark.parametrize(
    ("text", "loggers"),
    [("tensorboard,csv", ("tensorboard", "csv")), (" CSV , csv", ("csv",)), ("none", ()), ("wandb", ("wandb",))],
)
def test_logger_lists(text, loggers):
    assert cli.build_parser().parse_args(["train", "--logger", text]).logger == loggers


def test_unknown_logger_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--logger", "tensorboard,mlflow"])
    assert "choose one or more of tensorboard, wandb, csv" in capsys.readouterr().err


def test_wandb_run_flags_without_wandb_logger_say_to_add_it(tmp_path, capsys):
    assert cli.main(["train", "--run-name", "x", "--out", str(tmp_path)]) == 2
    assert "--run-name names a W&B run; add --logger wandb" in capsys.readouterr().err


@pytest.mark.slow
def test_tensorboard_and_csv_write_into_one_run_folder(tiny_preset, tmp_path):
    assert cli.main(["train", *SMALL, "--out", str(tmp_path), "--logger", "tensorboard,csv"]) == 0
    assert cli.main(["train", *SMALL, "--out", str(tmp_path), "--logger", "csv,tensorboard"]) == 0
    for version in ("version_0", "version_1"):
        run_dir = tmp_path / "moe" / version
        assert list(run_dir.glob("events.out.tfevents.*")) and (run_dir / "metrics.csv").is_file()
        assert (run_dir / "moe_monitor" / "layers.csv").is_file()
    assert sorted(p.name for p in (tmp_path / "moe").iterdir()) == ["version_0", "version_1"]


@pytest.mark.slow
def test_wandb_project_entity_and_run_name_reach_the_offline_run(tiny_preset, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from tests.callback.test_wandb import _complete_log

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    argv = ["train", *SMALL, "--out", str(tmp_path), "--logger", "csv,wandb", "--wandb-project", "proj-x",
            "--wandb-entity", "team-y", "--run-name", "nice-name"]  # fmt: skip
    assert cli.main(argv) == 0
    (log,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    runs = [r.run for r in _complete_log(log) if r.WhichOneof("record_type") == "run"]
    assert (runs[0].project, runs[0].entity, runs[0].display_name) == ("proj-x", "team-y", "nice-name")
    assert (tmp_path / "moe" / "version_0" / "moe_monitor" / "layers.csv").is_file()
