"""``moe-monitor train`` with the monitor, controllers and scenarios; ``moe-monitor report`` on its output."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from moe_monitor import cli
from moe_monitor.scenarios import SCENARIOS

SMALL = ["--steps", "6", "--batch-size", "2", "--val-every", "3", "--log-every", "2", "--threads", "1"]


@pytest.fixture
def tiny_preset(monkeypatch):
    """Shrinks the ``tiny`` preset so that a whole run takes a few seconds."""
    from moe_monitor.reference import config

    small = dict(d_model=16, n_layers=2, n_heads=2, seq_len=16, n_experts=8, top_k=2, d_expert=16)
    monkeypatch.setitem(config.PRESETS, "tiny", small)
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


def test_scenario_names_in_help_are_the_library_s():
    assert cli.SCENARIO_NAMES == tuple(SCENARIOS)


@pytest.mark.slow
def test_default_train_logs_routing_to_tensorboard_and_report_renders_it(tiny_preset, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert cli.main(["train", *SMALL, "--out", str(tmp_path)]) == 0
    run_dir = tmp_path / "moe" / "version_0"
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "histograms": 0})
    accumulator.Reload()
    layers = pd.read_csv(run_dir / "moe_monitor" / "layers.csv")
    train = layers[(layers.phase == "train") & (layers.layer_index == 1)]
    logged = accumulator.Scalars("moe/train/load_entropy/L01")
    assert [e.step for e in logged] == [2, 4, 6] == train.step.tolist()
    assert [e.value for e in logged] == pytest.approx(train.load_entropy.tolist(), rel=1e-6)
    # 2 optimizer steps x 2 sequences x 16 tokens per window.
    assert (train.tokens == 2 * 2 * 16).all()
    assert "moe/train/expert_load/L00" in accumulator.Tags()["histograms"]

    assert cli.main(["report", str(run_dir)]) == 0
    html = (run_dir / "moe_report.html").read_text()
    assert "Last window (step 6)" in html and "blocks.1.moe.router" in html
    assert str(run_dir / "moe_report.html") in capsys.readouterr().out


@pytest.mark.slow
def test_scenario_with_control_logs_the_controller(tiny_preset, tmp_path):
    argv = ["train", *SMALL, "--out", str(tmp_path), "--logger", "csv", "--scenario", "biased_init",
            "--control", "aux,bias"]
    assert cli.main(argv) == 0
    run_dir = tmp_path / "moe" / "version_0"
    metrics = pd.read_csv(run_dir / "metrics.csv")
    controller_keys = [key for key in metrics.columns if key.startswith("controller/")]
    assert any(key.startswith("controller/aux_loss") for key in controller_keys)
    assert any(key.startswith("controller/bias") for key in controller_keys)
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    config = checkpoint["hyper_parameters"]["config"]
    # The scenario turns the aux loss off; --control bias needs the expert-bias buffer.
    assert config["aux_loss_coef"] == 0.0 and config["expert_bias"] is True


def test_explicit_options_win_over_the_scenario():
    args = cli.build_parser().parse_args(["train", "--scenario", "no_aux_high_lr", "--aux-coef", "0.02"])
    assert cli.build_config(args).aux_loss_coef == 0.02
    assert cli.resolve_training(args)["lr"] == SCENARIOS["no_aux_high_lr"].lr


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--scenario", "nope"], "--scenario='nope' is unknown; choose one of biased_init"),
        (["--control", "aux,magic"], "unknown controller 'magic'; choose from aux, noise, bias"),
        (["--no-monitor", "--control", "aux"], "need the monitor"),
    ],
)
def test_bad_monitor_options_exit_2_with_the_reason(tmp_path, capsys, argv, message):
    assert cli.main(["train", *argv, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_report_of_a_directory_without_history_exits_2(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path)]) == 2
    assert "no layers.csv" in capsys.readouterr().err
