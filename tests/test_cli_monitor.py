"""``moe-monitor train`` with the monitor, controllers and scenarios; ``moe-monitor report`` on its output."""

from __future__ import annotations

import shutil

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
    assert "moe/train/expert_load/L00" in accumulator.Tags()["tensors"]  # histogram-plugin tensors

    assert cli.main(["report", str(run_dir)]) == 0
    html = (run_dir / "moe_report.html").read_text()
    assert "Last window (step 6)" in html and "blocks.1.moe.router" in html
    assert str(run_dir / "moe_report.html") in capsys.readouterr().out

    # Two runs side by side: a second folder holding the same history, compared on one page.
    other = tmp_path / "other_run"
    shutil.copytree(run_dir / "moe_monitor", other / "moe_monitor")
    compare = tmp_path / "compare.html"
    assert cli.main(["report", str(run_dir), str(other), "-o", str(compare)]) == 0
    text = compare.read_text()
    assert "version_0" in text and "other_run" in text


@pytest.mark.slow
def test_scenario_with_control_collapses_and_is_steered(tiny_preset, tmp_path):
    argv = ["train", *SMALL, "--out", str(tmp_path), "--logger", "csv", "--scenario", "biased_init",
            "--control", "aux,bias", "--val-every", "0"]
    assert cli.main(argv) == 0
    run_dir = tmp_path / "moe" / "version_0"
    layers = pd.read_csv(run_dir / "moe_monitor" / "layers.csv")
    # biased_init sends every token to experts 0 and 1 from the first step: top-2 of 8 on the same pair gives
    # load entropy ln 2 / ln 8 = 1/3 and MaxVio 8 / 2 - 1 = 3 in the first window.
    first = layers[layers.step == 2]
    assert first.load_entropy.to_numpy() == pytest.approx([1 / 3, 1 / 3], abs=0.02)
    assert first.max_violation.to_numpy() == pytest.approx([3.0, 3.0], abs=0.05)
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert any(key.startswith("controller/aux_loss") for key in metrics.columns)
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    config = checkpoint["hyper_parameters"]["config"]
    assert config["aux_loss_coef"] == 0.0 and config["expert_bias"] is True
    # The bias controller ran every step: experts 0 and 1 got all the tokens, so their bias went down and the
    # others' up, by the same rate each step (mean-centred).
    bias_E = checkpoint["state_dict"]["model.blocks.0.moe.router.expert_bias"]
    assert bias_E.sum().abs() < 1e-6
    assert (bias_E[:2] < 0).all() and (bias_E[2:] > 0).all()


def test_explicit_options_win_over_the_scenario():
    args = cli.build_parser().parse_args(["train", "--scenario", "no_aux_high_lr", "--aux-coef", "0.02"])
    assert cli.build_config(args).aux_loss_coef == 0.02
    assert cli.resolve_training(args)["lr"] == SCENARIOS["no_aux_high_lr"].lr


def test_capacity_factor_none_overrides_the_scenario_s_capacity():
    parse = cli.build_parser().parse_args
    assert cli.build_config(parse(["train", "--scenario", "low_capacity"])).capacity_factor == 1.0
    dropless = parse(["train", "--scenario", "low_capacity", "--capacity-factor", "none"])
    assert cli.build_config(dropless).capacity_factor is None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--scenario", "nope"], "--scenario='nope' is unknown; choose one of biased_init"),
        (["--control", "aux,magic"], "unknown controller 'magic'; choose from aux, noise, bias"),
        (["--no-monitor", "--control", "aux"], "need the monitor"),
        (["--router", "expert_choice", "--control", "bias"], "expert_bias=True has no effect with router='expert_"),
    ],
)
def test_bad_monitor_options_exit_2_with_the_reason(tmp_path, capsys, argv, message):
    assert cli.main(["train", *argv, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_report_of_a_directory_without_history_exits_2(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path)]) == 2
    assert "no layers.csv" in capsys.readouterr().err


@pytest.mark.slow
def test_two_cpu_processes_train_the_requested_number_of_steps(tmp_path):
    import subprocess
    import sys

    argv = [sys.executable, "-m", "moe_monitor.cli", "train", "--accelerator", "cpu", "--devices", "2", "--steps",
            "4", "--batch-size", "2", "--val-every", "0", "--log-every", "2", "--threads", "1", "--logger", "csv",
            "--out", str(tmp_path)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Trained 4 steps" in done.stdout
    layers = pd.read_csv(tmp_path / "moe" / "version_0" / "moe_monitor" / "layers.csv")
    # Windows of 2 steps x 2 sequences x 128 tokens on each of the 2 processes, reduced over both.
    assert (layers.tokens == 2 * 2 * 128 * 2).all() and sorted(layers.step.unique()) == [2, 4]
