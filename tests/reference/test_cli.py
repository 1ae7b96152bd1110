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
