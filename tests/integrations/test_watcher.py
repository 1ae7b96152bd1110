"""Watcher in a plain PyTorch loop: windows, phases, masks, sinks read back, state, crash-safe files."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch

from moe_monitor import CollapseDetector, Watcher
from tests.integrations.hf_toys import PaddedTokens, expert_counts, stacked, tiny_model
from tests.integrations.tb_read import accumulate, expert_load

pytest.importorskip("transformers")


def _train(model: torch.nn.Module, watcher: Watcher, data: PaddedTokens, batch: int, accumulate: int = 1) -> None:
    """A plain loop at lr=0 (routers stay fixed): ``accumulate`` micro-batches per optimizer step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    loader = torch.utils.data.DataLoader(data, batch_size=batch)
    for i, sample in enumerate(loader):
        watcher.batch(sample)
        model(**sample).loss.backward()
        if (i + 1) % accumulate == 0:
            optimizer.step()
            optimizer.zero_grad()
        watcher.step((i + 1) // accumulate)  # the same step twice within an accumulation: counted once


def test_plain_loop_windows_and_tensorboard_views_match_an_independent_recount(tmp_path: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    model, data = tiny_model("mixtral"), PaddedTokens(16)
    writer = SummaryWriter(tmp_path / "tb")
    with Watcher(model, log_every=2, sinks=[writer, tmp_path / "files"]) as watcher:
        _train(model, watcher, data, batch=2, accumulate=2)  # 4 optimizer steps of 2 micro-batches
        val = PaddedTokens(8, offset=100)
        with watcher.phase("val"), torch.no_grad():
            batch = stacked(val)
            watcher.batch(batch)
            model(**batch)
    writer.close()

    frame = watcher.layer_frame()
    assert list(zip(frame.step, frame.phase))[::2] == [(2, "train"), (4, "train"), (4, "val")]
    assert frame[frame.phase == "train"].groupby("layer_index").tokens.sum().tolist() == [data.real_tokens()] * 2
    assert (frame[frame.phase == "val"].tokens == val.real_tokens()).all()

    recount_LE = expert_counts(model, data)
    events = accumulate(tmp_path / "tb")
    for layer in range(2):
        windows = expert_load(events, f"moe/train/expert_load/L{layer:02d}")
        buckets = [counts for _, counts in windows]
        assert [sum(col) for col in zip(*buckets)] == recount_LE[layer].tolist()
        maxvio = {s.step: s.value for s in events.Scalars(f"moe/train/max_violation/L{layer:02d}")}
        for (step, _), counts in zip(windows, buckets):
            assert maxvio[step] == pytest.approx(max(counts) / (sum(counts) / 4) - 1, abs=1e-6)
    val_counts = expert_load(events, "moe/val/expert_load/L00")[0][1]
    assert val_counts == expert_counts(model, val)[0].tolist()
    on_disk = pd.read_csv(tmp_path / "files" / "layers.csv")
    assert on_disk[["step", "phase", "tokens"]].equals(frame[["step", "phase", "tokens"]])
    assert (tmp_path / "files" / "layers.parquet").exists()


def test_eval_mode_forwards_close_with_end_phase_and_never_reach_the_detector(tmp_path: Path) -> None:
    class Recording(CollapseDetector):
        shown: list[str] = []

        def update(self, snapshot):  # noqa: ANN001, ANN202
            self.shown.append(snapshot.phase)
            return super().update(snapshot)

    model = tiny_model("qwen3_moe")
    watcher = Watcher(model, log_every=1, detector=Recording())
    model.eval()
    with torch.no_grad():
        model(**stacked(PaddedTokens(4)))
    assert watcher.end_phase("val", step=7).tokens.tolist() == [4 * 8, 4 * 8]  # no mask given: every position
    model.train()
    model(**stacked(PaddedTokens(4)))
    watcher.step(1)
    watcher.close()
    assert Recording.shown == ["train"]
    assert list(watcher.layer_frame().step) == [7, 7, 1, 1]


def test_state_dict_round_trip_and_a_foreign_version_is_refused(tmp_path: Path) -> None:
    model = tiny_model("mixtral")
    detector = CollapseDetector(min_load_entropy=0.9999, patience=1)  # every window alerts
    watcher = Watcher(model, log_every=1, detector=detector)
    _train(model, watcher, PaddedTokens(4), batch=2)
    state = watcher.state_dict()
    assert len(watcher.events) == 2  # one alert per layer, still active in the second window

    restored = Watcher(tiny_model("mixtral"), log_every=1, detector=CollapseDetector(min_load_entropy=0.9999))
    restored.load_state_dict(state)
    assert restored.layer_frame().equals(watcher.layer_frame())
    assert restored.event_frame().equals(watcher.event_frame())
    assert restored.detector.active == detector.active
    # One event history: the detector reads the watcher's list (alerts and recoveries), before and after a load.
    assert detector.events == [e for e in watcher.events if e.kind != "control"] and len(detector.events) == 2
    assert restored.detector.events == detector.events
    assert detector.event_frame().equals(watcher.event_frame())
    with pytest.raises(ValueError, match="version 7.*reads version 1"):
        restored.load_state_dict({**state, "version": 7})


def test_bad_arguments_name_what_is_allowed() -> None:
    model = tiny_model("mixtral")
    with pytest.raises(ValueError, match="log_every=0 is not valid; choose a positive integer"):
        Watcher(model, log_every=0)
    with pytest.raises(ValueError, match="SummaryWriter, a wandb run, a directory path"):
        Watcher(model, sinks=[object()])
    with pytest.raises(ValueError, match="name='a b' is not valid"):
        Watcher(model, name="a b")


def test_a_named_watcher_prefixes_every_key_and_file(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    model = tiny_model("mixtral")
    writer = SummaryWriter(tmp_path / "tb")
    with Watcher(model, log_every=2, name="probe", sinks=[writer, tmp_path]) as watcher:
        _train(model, watcher, PaddedTokens(4), batch=1)
    writer.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert {tag.split("/")[1] for tag in events.Tags()["scalars"]} == {"probe"}
    assert [s.step for s in events.Scalars("moe/probe/train/load_entropy/L01")] == [2, 4]
    assert len(pd.read_csv(tmp_path / "probe" / "layers.csv")) == 4


CRASHING_LOOP = """
import os, signal, sys, torch
from moe_monitor import Watcher
from tests.integrations.hf_toys import PaddedTokens, stacked, tiny_model
model = tiny_model("mixtral")
watcher = Watcher(model, log_every=1, sinks=[sys.argv[1]])
for step, i in enumerate(range(0, 16, 2), start=1):
    batch = stacked(PaddedTokens(16), range(i, i + 2))
    watcher.batch(batch)
    model(**batch)
    watcher.step(step)
    if step == 3:
        os.kill(os.getpid(), signal.SIGKILL)  # no close(), no atexit, no flush by Python
"""


@pytest.mark.slow
def test_a_killed_loop_leaves_every_finished_window_on_disk(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2]), "OMP_NUM_THREADS": "1"}
    script = tmp_path / "loop.py"
    script.write_text(textwrap.dedent(CRASHING_LOOP))
    result = subprocess.run([sys.executable, str(script), str(tmp_path / "run")], env=env, timeout=120)
    assert result.returncode == -signal.SIGKILL
    # layers.csv gets each window's rows as it closes; the expert rows go to Parquet parts at checkpoints, every
    # few thousand windows and at any orderly stop, so a SIGKILL leaves the per-layer rows (assignments included).
    layers = pd.read_csv(tmp_path / "run" / "layers.csv")
    assert layers.step.tolist() == [1, 1, 2, 2, 3, 3]
    real = [PaddedTokens.real_length(i) + PaddedTokens.real_length(i + 1) for i in (0, 2, 4)]
    assert layers[layers.layer_index == 0].tokens.tolist() == real
    assert layers.assignments.tolist() == [2 * t for t in real for _ in range(2)]  # top-2: two per token
    assert all(math.isfinite(v) for v in layers.load_entropy)


def test_files_appended_window_by_window_equal_the_final_rewrite(tmp_path: Path) -> None:
    model = tiny_model("mixtral")
    detector = CollapseDetector(min_load_entropy=0.9999, patience=1)  # events to append as well
    watcher = Watcher(model, log_every=1, detector=detector, sinks=[tmp_path])
    _train(model, watcher, PaddedTokens(8), batch=2)
    with watcher.phase("val"), torch.no_grad():
        model(**stacked(PaddedTokens(4)))
    appended = {name: (tmp_path / f"{name}.csv").read_text() for name in ("layers", "events")}
    assert appended["layers"].count("\n") == 1 + 5 * 2  # header + (4 train + 1 val windows) x 2 layers
    watcher.close()  # flushes the history (expert rows into Parquet parts) and rewrites events.csv in full
    for name, text in appended.items():
        assert (tmp_path / f"{name}.csv").read_text() == text, name
    # The columnar files hold the same windows as the frames; the expert rows sum to the layers' assignments.
    layers, experts = pd.read_parquet(tmp_path / "layers.parquet"), pd.read_parquet(tmp_path / "experts.parquet")
    pd.testing.assert_frame_equal(layers, pd.read_csv(tmp_path / "layers.csv"), check_dtype=False)
    per_window = experts.groupby(["step", "phase", "layer_index"], sort=False)["count"].sum()
    assert per_window.tolist() == layers.assignments.tolist()
