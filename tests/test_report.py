"""The HTML report reads saved frames and shows their numbers."""

from __future__ import annotations

import math
import re

import pandas as pd
import pytest

from moe_monitor.report import RunFilesNotFoundError, render_report, write_report


def _frames(tmp_path, with_events: bool) -> None:
    rows, expert_rows = [], []
    for step in (50, 100):
        for layer in ("blocks.0.moe.router", "blocks.1.moe.router"):
            counts = [300, 100, 100, 100] if layer.startswith("blocks.1") else [150, 150, 150, 150]
            total = sum(counts)
            loads = [c / total for c in counts]
            entropy = -sum(p * math.log(p) for p in loads) / math.log(4)
            rows.append(dict(step=step, phase="train", layer=layer, num_experts=4, top_k=2, tokens=total // 2,
                             assignments=total, dropped=0, dropped_fraction=0.0, load_entropy=entropy,
                             max_violation=max(counts) / (total / 4) - 1, cv=0.0, gini=0.0, dead_experts=0,
                             aux_loss=2.0, z_loss=float("nan"), router_entropy=0.9, top1_confidence=0.4))
            expert_rows += [dict(step=step, phase="train", layer=layer, expert=e, count=c, load=c / total)
                            for e, c in enumerate(counts)]
    out = tmp_path / "version_0" / "moe_monitor"
    out.mkdir(parents=True)
    pd.DataFrame(rows).to_csv(out / "layers.csv", index=False)
    pd.DataFrame(expert_rows).to_csv(out / "experts.csv", index=False)
    if with_events:
        pd.DataFrame([dict(step=100, phase="train", layer="blocks.1.moe.router", rule="max_violation", value=1.0,
                           threshold=0.8, severity="warning", message="expert 0 overloaded", kind="alert")]
                     ).to_csv(out / "events.csv", index=False)


def test_report_shows_last_window_and_events(tmp_path):
    _frames(tmp_path, with_events=True)
    path = write_report(tmp_path)
    text = path.read_text()
    assert path == tmp_path / "moe_report.html"
    assert text.startswith("<!doctype html>") and "<script" not in text and "http://" not in text.replace(
        "http://www.w3.org/2000/svg", "")
    # MaxVio of the skewed layer: 300 / 150 - 1 = 1, shown in the last-window table.
    assert re.search(r"<td>L1</td><td>blocks\.1\.moe\.router</td><td>300</td><td>0</td><td>[0-9.]+</td><td>1</td>",
                     text)
    assert "1 alert(s)" in text and "expert 0 overloaded" in text
    # One heatmap cell per (layer, expert) of the last window, plus the over-time map of the worst layer (2 steps).
    assert text.count("expert 3: ") == 2 + 2


def test_report_without_events_says_no_alert(tmp_path):
    _frames(tmp_path, with_events=False)
    assert "No collapse alert was raised." in render_report(tmp_path)


def test_report_on_directory_without_frames_says_what_to_do(tmp_path):
    with pytest.raises(RunFilesNotFoundError, match="save_frames=True"):
        render_report(tmp_path)


def test_report_of_a_parent_of_several_runs_asks_for_one(tmp_path):
    _frames(tmp_path / "a", with_events=False)
    _frames(tmp_path / "b", with_events=False)
    with pytest.raises(RunFilesNotFoundError, match="holds the history of 2 runs; pass one of them"):
        render_report(tmp_path)
    path = write_report(tmp_path / "a", tmp_path / "new" / "dir" / "r.html")
    assert path.read_text().startswith("<!doctype html>")
