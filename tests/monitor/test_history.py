"""History: bounded memory, the full history in files beside the run, pointer checkpoints, resume without duplicates."""

from __future__ import annotations

import dataclasses
import io
import pickle
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from monitor_toys import ToyModel

from moe_monitor import RouterMonitor, history
from moe_monitor.history import History
from moe_monitor.snapshot import STAT_NAMES, Snapshot

NAMES, EXPERTS, TOP_K = ["a.router", "b.router", "c.router"], [4, 3, 4], [2, 1, 2]


def snap(step: int, phase: str = "train", seed: int | None = None) -> Snapshot:
    generator = torch.Generator().manual_seed(step if seed is None else seed)
    counts = torch.randint(0, 50, (3, 4), generator=generator)
    counts[1, 3] = 0  # beyond layer b's 3 experts
    stats = {name: torch.rand(3, generator=generator, dtype=torch.float64) for name in STAT_NAMES}
    stats["z_loss"][2] = float("nan")
    kept = counts - torch.randint(0, 3, (3, 4), generator=generator).minimum(counts)  # some dropped or skipped
    return Snapshot(
        step=step, phase=phase, layer_names=NAMES, num_experts=EXPERTS, top_k=TOP_K, counts=counts,
        tokens=counts.sum(1) // 2, dropped=torch.tensor([0, 1, 2]), nonfinite_tokens=torch.tensor([0, 0, 3]),
        stats=stats,
        extras={
            "counterfactual_drop@1.0": torch.rand(3, generator=generator, dtype=torch.float64),
            "unrouted_tokens": torch.tensor([0.0, 2.0, 0.0], dtype=torch.float64),
        },
        kept=kept,
        skipped=torch.tensor([1, 0, 4]),
    )


def make(keep: int = 4) -> History:
    return History(NAMES, EXPERTS, TOP_K, capacity_factors=(1.0,), keep_windows=keep)


def expected_experts(snaps: list[Snapshot]) -> pd.DataFrame:
    """The expert rows of the given windows, by a plain loop."""
    rows = []
    for s in snaps:
        for i, name in enumerate(NAMES):
            total = int(s.counts[i].sum())
            for e in range(EXPERTS[i]):
                count, kept = int(s.counts[i, e]), int(s.kept[i, e])
                rows.append((s.step, s.phase, name, i, e, count, kept, count / total if total else float("nan")))
    return pd.DataFrame(rows, columns=list(history.EXPERT_COLUMNS))


def expected_layers(snaps: list[Snapshot]) -> pd.DataFrame:
    rows = []
    for s in snaps:
        for i, name in enumerate(NAMES):
            row = {"step": s.step, "phase": s.phase, "layer": name, "layer_index": i, "num_experts": EXPERTS[i],
                   "top_k": TOP_K[i], "tokens": int(s.tokens[i]), "assignments": int(s.counts[i].sum()),
                   "dropped": int(s.dropped[i]), "skipped": int(s.skipped[i]),
                   "nonfinite_tokens": int(s.nonfinite_tokens[i]),
                   "counterfactual_drop@1.0": float(s.extras["counterfactual_drop@1.0"][i]),
                   "unrouted_tokens": float(s.extras["unrouted_tokens"][i]) if "unrouted_tokens" in s.extras
                   else float("nan")}
            row.update({name: float(s.stats[name][i]) for name in STAT_NAMES})
            rows.append(row)
    return pd.DataFrame(rows)


def assert_frames_match(frame: pd.DataFrame, expected: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(
        frame.reset_index(drop=True), expected[list(frame.columns)].reset_index(drop=True), check_dtype=False
    )


@pytest.fixture(params=["parquet", "csv"])
def formats(request, monkeypatch):
    if request.param == "csv":
        monkeypatch.setattr(history, "_has_pyarrow", lambda: False)
    return request.param


def test_files_hold_every_window_while_memory_keeps_the_last_few(tmp_path, formats):
    h = make(keep=4)
    h.open(tmp_path / "run")
    snaps = [snap(10 * i, "val" if i % 3 == 0 else "train") for i in range(1, 12)]
    for s in snaps:
        h.append(s)
    assert len(h) == 11 and len(h._recent) == 4
    assert_frames_match(h.expert_frame(), expected_experts(snaps))
    assert_frames_match(h.layer_frame(), expected_layers(snaps))
    # The files read back by the readers a person would use: pandas' CSV reader, pyarrow's data set reader.
    assert_frames_match(pd.read_csv(tmp_path / "run" / "layers.csv"), expected_layers(snaps))  # written at every window
    h.close()
    if formats == "parquet":
        assert_frames_match(pd.read_parquet(tmp_path / "run" / "experts.parquet"), expected_experts(snaps))
        assert_frames_match(pd.read_parquet(tmp_path / "run" / "layers.parquet"), expected_layers(snaps))
        assert not (tmp_path / "run" / "experts.csv").exists()
    else:
        assert_frames_match(pd.read_csv(tmp_path / "run" / "experts.csv"), expected_experts(snaps))


def test_without_files_memory_keeps_the_last_windows_and_warns_once(recwarn):
    h = make(keep=3)
    snaps = [snap(step) for step in range(1, 8)]
    for s in snaps:
        h.append(s)
    evicted = [w for w in recwarn.list if "in-memory history keeps the last 3 windows" in str(w.message)]
    assert len(evicted) == 1 and "history_dir=DIR" in str(evicted[0].message)
    assert_frames_match(h.expert_frame(), expected_experts(snaps[-3:]))
    assert_frames_match(h.layer_frame(), expected_layers(snaps[-3:]))


def test_default_keep_fits_the_memory_budget():
    small = History(["r"] * 4, [8] * 4, [2] * 4)
    large = History([f"l{i}" for i in range(94)], [128] * 94, [8] * 94)
    counts = torch.ones(94, 128, dtype=torch.int64)
    window = Snapshot(step=0, phase="train", layer_names=large.layer_names, num_experts=[128] * 94, top_k=[8] * 94,
                      counts=counts, tokens=counts.sum(1), dropped=torch.zeros(94, dtype=torch.int64),
                      nonfinite_tokens=torch.zeros(94, dtype=torch.int64), stats={})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(2 * large.keep_windows):
            large.append(window)
    held = sum(w.counts_LE.nbytes + w.values_LK.nbytes for w in large._recent)
    assert history.MEMORY_BUDGET / 2 < held <= history.MEMORY_BUDGET
    assert small.keep_windows > 1000 and large.keep_windows >= 16


def roundtrip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_resume_from_a_pointer_drops_the_replayed_windows(tmp_path, formats):
    run = tmp_path / "run"
    first = make(keep=2)
    first.open(run)
    for step in range(1, 6):
        first.append(snap(step))
    state = roundtrip(first.state_dict())
    assert set(state) == {"version", "layer_names", "windows", "directory", "files"} and state["windows"] == 5
    assert len(pickle.dumps(state)) < 1000
    for step in range(6, 9):  # written after the checkpoint, then the run dies
        first.append(snap(step, seed=100 + step))
    first.close()

    resumed = make(keep=2)
    resumed.load_state_dict(state)
    resumed.open()  # the checkpoint's directory
    for step in range(6, 10):  # the replayed steps, with other counts
        resumed.append(snap(step))
    resumed.close()
    expected = [snap(step) for step in range(1, 10)]
    assert_frames_match(resumed.expert_frame(), expected_experts(expected))
    assert_frames_match(resumed.layer_frame(), expected_layers(expected))
    assert_frames_match(pd.read_csv(run / "layers.csv"), expected_layers(expected))
    if formats == "parquet":
        assert_frames_match(pd.read_parquet(run / "experts.parquet"), expected_experts(expected))


def test_resume_into_a_new_directory_copies_the_checkpoints_windows(tmp_path):
    first = make(keep=2)
    first.open(tmp_path / "v0")
    for step in range(1, 5):
        first.append(snap(step))
    state = first.state_dict()
    first.append(snap(5, seed=99))
    first.close()

    resumed = make(keep=2)
    resumed.open(tmp_path / "v1")  # opened first (a new logger version), restored after
    resumed.load_state_dict(state)
    resumed.append(snap(5))
    expected = [snap(step) for step in range(1, 6)]
    assert_frames_match(resumed.expert_frame(), expected_experts(expected))
    assert_frames_match(pd.read_csv(tmp_path / "v1" / "layers.csv"), expected_layers(expected))
    assert_frames_match(pd.read_csv(tmp_path / "v0" / "layers.csv"), expected_layers(expected[:4] + [snap(5, seed=99)]))


def test_resume_step_continues_files_without_a_checkpoint(tmp_path, formats):
    first = make(keep=2)
    first.open(tmp_path)
    for step in (10, 20, 30, 40):
        first.append(snap(step))
    first.close()
    with pytest.raises(FileExistsError, match="resume_step=STEP"):
        make().open(tmp_path)
    resumed = make(keep=2)
    resumed.open(tmp_path, resume_step=25)
    assert len(resumed) == 2
    resumed.append(snap(30, seed=7))
    expected = [snap(10), snap(20), snap(30, seed=7)]
    assert_frames_match(resumed.expert_frame(), expected_experts(expected))
    assert_frames_match(resumed.layer_frame(), expected_layers(expected))


def test_state_without_files_is_bounded_and_restores_the_kept_windows():
    h = make(keep=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(1, 10):
            h.append(snap(step))
    state = roundtrip(h.state_dict())
    assert state["recent"]["counts"].shape == (3, 3, 4) and state["windows"] == 9
    restored = make(keep=3)
    restored.load_state_dict(state)
    assert_frames_match(restored.expert_frame(), expected_experts([snap(s) for s in (7, 8, 9)]))
    with pytest.raises(ValueError, match="before the first window"):
        restored.load_state_dict(state)


def test_version_1_state_is_upgraded():
    s = dataclasses.replace(snap(5), kept=None)  # version 1 had no kept counts: they read as the counts
    s.extras.pop("unrouted_tokens")  # not counted when version 1 was written: NaN after the upgrade
    record = {
        "step": 5, "phase": "train", "layer_names": NAMES, "num_experts": EXPERTS, "top_k": TOP_K,
        "counts": s.counts.tolist(),
        "layer": {"tokens": s.tokens.tolist(), "assignments": s.counts.sum(1).tolist(), "dropped": s.dropped.tolist(),
                  "nonfinite_tokens": s.nonfinite_tokens.tolist(),
                  "counterfactual_drop@1.0": s.extras["counterfactual_drop@1.0"].tolist(),
                  **{name: s.stats[name].tolist() for name in STAT_NAMES}},
    }
    h = make()
    h.load_state_dict({"version": 1, "layer_names": NAMES, "history": [record]})
    # skipped was not counted by version 1 either: NaN after the upgrade.
    assert_frames_match(h.layer_frame(), expected_layers([s]).assign(skipped=float("nan")))
    assert_frames_match(h.expert_frame(), expected_experts([s]))


def test_a_failing_disk_warns_once_and_keeps_the_history_in_memory(tmp_path, monkeypatch):
    h = make(keep=8)
    h.open(tmp_path)

    def full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(History, "_write_layers_csv", full)
    with pytest.warns(RuntimeWarning, match="No space left.*training goes on") as caught:
        for step in range(1, 4):
            h.append(snap(step))
    assert sum("No space left" in str(w.message) for w in caught) == 1
    assert_frames_match(h.expert_frame(), expected_experts([snap(step) for step in range(1, 4)]))


def test_router_monitor_writes_the_history_dir_and_resumes(tmp_path):
    torch.manual_seed(0)
    model = ToyModel(num_experts=4, top_k=2)
    monitor = RouterMonitor(model, routers=model.router_names, history_dir=tmp_path / "h", keep_windows=2)
    counts = []
    for step in range(1, 6):
        model(torch.randn(2, 3, 8))
        counts.append(monitor.collect(step).counts.numpy())
    state = monitor.state_dict()
    monitor.remove()
    frame = pd.read_parquet(tmp_path / "h" / "experts.parquet")
    got = frame.pivot_table(index=["step", "layer_index"], columns="expert", values="count").to_numpy()
    assert np.array_equal(got, np.concatenate(counts))
    assert len(pickle.dumps(state)) < 1000

    resumed = RouterMonitor(model, routers=model.router_names, keep_windows=2)
    resumed.load_state_dict(state)
    resumed.history.open()
    model(torch.randn(2, 3, 8))
    resumed.collect(6)
    assert resumed.layer_frame().step.tolist() == [s for s in range(1, 7) for _ in range(2)]


def test_a_failing_part_write_in_the_writer_thread_warns_and_keeps_the_tail(tmp_path, monkeypatch):
    h = History(NAMES, EXPERTS, TOP_K, capacity_factors=(1.0,), keep_windows=4)
    h.open(tmp_path)

    def broken(*args):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(history, "_write_parquet", broken)
    h._part_windows = 2
    with pytest.warns(RuntimeWarning, match="Input/output error.*training goes on"):
        for step in range(1, 6):
            h.append(snap(step))
        h.close()
    assert_frames_match(h.expert_frame(), expected_experts([snap(step) for step in range(2, 6)]))
