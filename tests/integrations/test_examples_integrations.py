"""The integration examples run as a user would run them (tiny step counts) and produce what they claim."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.integrations.tb_read import accumulate, main_run

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    if str(EXAMPLES) not in sys.path:  # as when run as a script: the examples' own folder is importable
        sys.path.insert(0, str(EXAMPLES))
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_huggingface_trainer_example_logs_windows_and_checkpoints_the_monitor(tmp_path: Path) -> None:
    pytest.importorskip("transformers")

    trainer, callback = _load("huggingface_trainer").main(["--steps", "4", "--out", str(tmp_path)])
    frame = callback.watcher.layer_frame()
    train = frame[frame.phase == "train"]
    assert sorted(set(train.step)) == [1, 2, 3, 4]
    assert (train.tokens == 2 * 4 * 24).all()  # 2 micro-batches of 4 samples, 24 of 32 positions real
    assert sorted(set(frame[frame.phase == "val"].step)) == [2, 4]
    assert (tmp_path / "checkpoint-2" / "moe_monitor.pt").exists()
    events = accumulate(main_run(tmp_path, "runs/**/events.out.tfevents.*"))
    assert [s.step for s in events.Scalars("moe/val/load_entropy/L01")] == [2, 4]


@pytest.mark.slow
def test_trl_sft_example_counts_what_trl_counts(tmp_path: Path) -> None:
    pytest.importorskip("trl")
    trainer, callback = _load("trl_sft").main(["--steps", "4", "--out", str(tmp_path)])
    frame = callback.watcher.layer_frame()
    trl_tokens = [h["num_tokens"] for h in trainer.state.log_history if "loss" in h]
    assert frame[frame.layer_index == 0].tokens.cumsum().tolist() == trl_tokens


@pytest.mark.slow
def test_plain_loop_watcher_example_writes_windows_and_dashboards(tmp_path: Path) -> None:
    watcher = _load("plain_loop_watcher").main(["--steps", "20", "--every", "10", "--out", str(tmp_path)])
    frame = watcher.layer_frame()
    assert list(zip(frame.step, frame.phase))[::2] == [(10, "train"), (20, "train"), (20, "val")]
    assert (frame[frame.phase == "train"].tokens == 10 * 16 * 64).all()
    assert pd.read_csv(tmp_path / "layers.csv")[["step", "phase"]].equals(frame[["step", "phase"]])
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_fabric_example_reduces_each_window_over_two_processes(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(EXAMPLES.parent)}
    command = [sys.executable, str(EXAMPLES / "fabric_watcher.py"), "--devices", "2", "--steps", "8", "--every", "4"]
    result = subprocess.run([*command, "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    layers = pd.read_csv(tmp_path / "layers.csv")
    assert layers.step.tolist() == [4, 4, 8, 8]
    assert (layers.tokens == 2 * 4 * 8 * 64).all()  # 2 processes x 4 steps x 8 samples x 64 tokens
