"""Events to records, frames and CSV rows and back: what a checkpoint and ``events.csv`` keep of each event."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pandas as pd
import torch

from moe_monitor.detect import (
    EVENT_COLUMNS,
    CollapseEvent,
    event_frame,
    event_from_record,
    event_record,
    events_from_frame,
    write_events_csv,
)

EVENTS = [
    CollapseEvent(10, "train", "blocks.0.router", "dead_experts", 2.0, 0.0, "warning", "2 dead, a, b", (1, 3)),
    CollapseEvent(20, "val", "blocks.1.router", "load_entropy", 0.25, 0.5, "critical", 'quote "x"'),
    CollapseEvent(30, "train", "blocks.0.router", "aux_loss_coef", 0.02, 0.01, "info", "", (), "control"),
    CollapseEvent(40, "train", "blocks.0.router", "dead_experts", 0.0, 0.0, "info", "", (1,), "recovery"),
]


def test_checkpoint_records_load_with_weights_only_and_give_back_the_events(tmp_path: Path) -> None:
    path = tmp_path / "state.pt"
    torch.save({"events": [event_record(e) for e in EVENTS]}, path)
    loaded = torch.load(path, weights_only=True)["events"]
    assert [event_from_record(r) for r in loaded] == EVENTS


def test_csv_rows_appended_window_by_window_read_back_as_the_events(tmp_path: Path) -> None:
    path = tmp_path / "events.csv"
    write_events_csv(path, EVENTS[:1])
    for event in EVENTS[1:]:
        write_events_csv(path, [event], append=True)
    frame = pd.read_csv(path)
    assert list(frame.columns) == list(EVENT_COLUMNS) and len(frame) == len(EVENTS)
    assert events_from_frame(frame) == EVENTS  # messages with commas and quotes, experts as text, kinds


def test_frame_has_one_row_per_event_and_its_columns_when_empty() -> None:
    frame = event_frame(EVENTS)
    assert frame.step.tolist() == [10, 20, 30, 40] and frame.experts.tolist() == [[1, 3], [], [], [1]]
    assert list(event_frame([]).columns) == list(EVENT_COLUMNS) and events_from_frame(event_frame([])) == []


def test_a_hand_written_row_reads_with_defaults() -> None:
    frame = pd.read_csv(io.StringIO("step,layer,rule,severity,kind\n5,r,cv,severe,odd\n"))
    (event,) = events_from_frame(frame)
    assert (event.step, event.phase, event.severity, event.kind, event.experts) == (5, "train", "warning", "alert", ())
    assert math.isnan(event.value) and event.message == ""
