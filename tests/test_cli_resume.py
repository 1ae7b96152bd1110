"""``moe-monitor train`` killed with SIGKILL mid-run and resumed with ``--resume``: the run goes on in the same folder,
its history, CSV metrics and TensorBoard scalars have every window exactly once, and it trains on the batches the
uninterrupted run trains on."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from moe_monitor import cli

SHRINK = "dict(d_model=16, n_layers=2, n_heads=2, seq_len=16, n_experts=8, top_k=2, d_expert=16)"
TRAIN = ["--steps", "200", "--batch-size", "2", "--threads", "1", "--log-every", "10", "--val-every", "50",
         "--ckpt-every", "50", "--logger", "tensorboard,csv"]  # fmt: skip


@pytest.fixture
def tiny_preset(monkeypatch):
    """Shrinks the ``tiny`` preset (as the subprocess's script does) so that a whole run takes seconds."""
    from moe_monitor.reference import config

    monkeypatch.setitem(config.PRESETS, "tiny", eval(SHRINK))
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


def _checkpoint_step(path: Path) -> int | None:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])
    except Exception:  # noqa: BLE001 - not there yet, or being replaced right now
        return None


def _start(tmp_path: Path, extra: list[str], out: Path) -> subprocess.Popen:
    """The CLI in a subprocess, with the shrunk preset."""
    script = tmp_path / "moe_monitor_cli.py"
    script.write_text(
        "import sys\nfrom moe_monitor.reference import config\n"
        f"config.PRESETS['tiny'] = {SHRINK}\n"
        "from moe_monitor import cli\nsys.exit(cli.main(sys.argv[1:]))\n"
    )
    argv = [sys.executable, str(script), "train", *TRAIN, *extra, "--out", str(out)]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_for_step(process: subprocess.Popen, ckpt: Path, step: int) -> int | None:
    """Polls ``ckpt`` until it holds ``step`` or later (or the process ends, or 4 minutes pass)."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        reached = _checkpoint_step(ckpt) if ckpt.exists() else None
        if reached is not None and reached >= step:
            return reached
        time.sleep(0.02)
    return None


def _kill_at_checkpoint(tmp_path: Path, out: Path, step: int) -> int:
    """Starts the CLI in a subprocess and SIGKILLs it as soon as its last.ckpt has reached ``step``."""
    process = _start(tmp_path, [], out)
    try:
        reached = _wait_for_step(process, out / "moe" / "version_0" / "checkpoints" / "last.ckpt", step)
    finally:
        process.send_signal(signal.SIGKILL)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL, stderr.decode()[-3000:]
    assert reached is not None, stderr.decode()[-3000:]
    return reached


@pytest.mark.slow
def test_sigkill_then_resume_last_continues_the_same_run_without_gaps_or_duplicates(tiny_preset, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "runs"
    killed_at = _kill_at_checkpoint(tmp_path, out, 100)
    # Checkpoints every 50 steps; killed within a few steps of the one at 100 (150 on a machine that stalled the test).
    assert killed_at in (100, 150)
    run_dir = out / "moe" / "version_0"
    before = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    before.Reload()
    logged_before = {e.step: e.value for e in before.Scalars("moe/train/load_entropy/L01")}
    # Flushed at the checkpoint, not lost with the process.
    assert set(range(10, killed_at + 1, 10)) <= set(logged_before)

    # The same command line with --resume; nothing else is needed, but repeating options is allowed.
    assert cli.main(["train", "--resume", "last", "--out", str(out), "--steps", "200"]) == 0
    assert f"Resuming {run_dir / 'checkpoints' / 'last.ckpt'} at step {killed_at} of 200" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "moe").iterdir()) == ["version_0"]  # the same folder, no version_1
    assert _checkpoint_step(run_dir / "checkpoints" / "last.ckpt") == 200

    # NOTE: the history rows of the killed process's windows come from the checkpoint; this exact-steps assertion
    # also holds once the callback appends rows as windows close, provided it drops rows past the resumed step.
    layers = pd.read_csv(run_dir / "moe_monitor" / "layers.csv")
    train = layers[(layers.phase == "train") & (layers.layer_index == 1)]
    assert train.step.tolist() == list(range(10, 201, 10))
    assert (train.tokens == 10 * 2 * 16).all()  # whole windows after the resume: checkpoints on window boundaries
    assert layers[(layers.phase == "val") & (layers.layer_index == 1)].step.tolist() == [50, 100, 150, 200]
    # The restored history holds what the killed process logged (the same windows, not recomputed ones).
    early = train[train.step <= killed_at]
    assert early.load_entropy.tolist() == pytest.approx([logged_before[s] for s in early.step], rel=1e-6)

    after = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    after.Reload()
    assert [e.step for e in after.Scalars("moe/train/load_entropy/L01")] == list(range(10, 201, 10))
    assert [e.step for e in after.Scalars("moe/val/load_entropy/L01")] == [50, 100, 150, 200]
    assert [e.step for e in after.Scalars("train/loss")] == list(range(9, 200, 10))

    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert metrics.dropna(subset=["train/loss"]).step.tolist() == list(range(9, 200, 10))
    assert metrics.dropna(subset=["moe/train/load_entropy/L01"]).step.tolist() == list(range(10, 201, 10))
    assert metrics.dropna(subset=["val/loss"]).step.tolist() == [49, 99, 149, 199]

    # The same run never interrupted: the resumed one trained on the same batches from the same state.
    assert cli.main(["train", *TRAIN, "--out", str(tmp_path / "whole")]) == 0
    whole = pd.read_csv(tmp_path / "whole" / "moe" / "version_0" / "metrics.csv")
    loss = metrics.dropna(subset=["train/loss"])["train/loss"].tolist()
    assert loss == pytest.approx(whole.dropna(subset=["train/loss"])["train/loss"].tolist(), rel=1e-6, abs=1e-7)
    whole_layers = pd.read_csv(tmp_path / "whole" / "moe" / "version_0" / "moe_monitor" / "layers.csv")
    assert layers.assignments.tolist() == whole_layers.assignments.tolist()
    assert layers.load_entropy.tolist() == pytest.approx(whole_layers.load_entropy.tolist(), rel=1e-6)


@pytest.mark.slow
def test_ctrl_c_exits_130_and_says_how_to_resume(tmp_path):
    out = tmp_path / "runs"
    process = _start(tmp_path, ["--steps", "5000", "--ckpt-every", "10"], out)
    ckpt = out / "moe" / "version_0" / "checkpoints" / "last.ckpt"
    try:
        _wait_for_step(process, ckpt, 10)
    finally:
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr.decode()[-3000:]
    assert f"moe-monitor train --resume {out / 'moe' / 'version_0'}" in stderr.decode()


@pytest.fixture
def finished_run(tiny_preset, tmp_path):
    argv = ["train", "--steps", "4", "--batch-size", "2", "--threads", "1", "--log-every", "2", "--val-every", "0"]
    assert cli.main([*argv, "--out", str(tmp_path)]) == 0
    return tmp_path / "moe" / "version_0"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--resume", "last"], "--resume last found no checkpoint under"),
        (["--resume", "nowhere/x.ckpt"], "--resume nowhere/x.ckpt: no such file or folder"),
    ],
)
def test_resume_without_a_checkpoint_says_what_to_pass(tmp_path, capsys, argv, message):
    assert cli.main(["train", *argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and "--out" in err


def test_resume_of_a_folder_without_checkpoint_and_of_a_broken_file(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli.main(["train", "--resume", str(tmp_path / "empty")]) == 2
    assert "holds no checkpoints/last.ckpt" in capsys.readouterr().err
    (tmp_path / "broken.ckpt").write_bytes(b"not a checkpoint")
    assert cli.main(["train", "--resume", str(tmp_path / "broken.ckpt")]) == 2
    assert "is not a readable checkpoint" in capsys.readouterr().err


@pytest.mark.slow
def test_resume_refuses_a_changed_model_option_and_a_finished_run(finished_run, capsys):
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(finished_run), "--experts", "4"]) == 2
    err = capsys.readouterr().err
    assert "--experts 4 differs from the run being resumed (started without it)" in err and "drop --experts" in err
    assert cli.main(["train", "--resume", str(finished_run)]) == 2
    assert "is at step 4, the run's --steps is 4" in capsys.readouterr().err
    # Longer: the same folder goes on to step 6.
    assert cli.main(["train", "--resume", str(finished_run), "--steps", "6"]) == 0
    assert _checkpoint_step(finished_run / "checkpoints" / "last.ckpt") == 6
    layers = pd.read_csv(finished_run / "moe_monitor" / "layers.csv")
    assert layers[layers.layer_index == 0].step.tolist() == [2, 4, 6]


@pytest.mark.slow
def test_resume_last_of_a_run_without_logger(tiny_preset, tmp_path):
    argv = ["train", "--batch-size", "2", "--threads", "1", "--log-every", "2", "--val-every", "0", "--logger", "none"]
    assert cli.main([*argv, "--steps", "4", "--out", str(tmp_path)]) == 0
    assert cli.main(["train", "--resume", "last", "--steps", "6", "--out", str(tmp_path)]) == 0
    assert _checkpoint_step(tmp_path / "moe" / "checkpoints" / "last.ckpt") == 6
    # Without a logger every fit gets a run folder of its own (moe_runs/run_<N>): the resumed fit's folder holds the
    # whole history (the checkpoint's windows copied over, then continued); the first fit's folder is left as it was.
    first, resumed = sorted((tmp_path / "moe").rglob("layers.csv"), key=lambda p: p.parent.name)
    assert (first.parent.name, resumed.parent.name) == ("run_0", "run_1")
    assert pd.read_csv(first).query("layer_index == 0").step.tolist() == [2, 4]
    assert pd.read_csv(resumed).query("layer_index == 0").step.tolist() == [2, 4, 6]


def test_explicit_options_are_those_written_on_the_command_line():
    given = cli.explicit_options(["train", "--steps", "5", "--logger", "csv", "--capacity-factor", "none"])
    assert given == {"steps", "logger", "capacity_factor"}
