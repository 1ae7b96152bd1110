"""Weights & Biases dashboards read back from the ``.wandb`` file of an offline run."""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from moe_monitor import CollapseDetector, MoEMonitor
from moe_monitor.snapshot import STAT_NAMES
from tests.callback.conftest import make_data, make_lm, make_trainer

wandb = pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2  # noqa: E402

_BLOCK, _HEADER = 32768, 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def wandb_records(path: Path) -> Iterator[wandb_internal_pb2.Record]:
    """Reads a ``.wandb`` transaction log: a LevelDB-style log of 32 KiB blocks holding ``Record`` protos."""
    data = path.read_bytes()
    ident, magic, _ = struct.unpack("<4sHB", data[:_HEADER])
    assert (ident, magic) == (b":W&B", 0xBEE1)
    position, pending = _HEADER, b""
    while position + _HEADER <= len(data):
        if _BLOCK - position % _BLOCK < _HEADER:  # block trailer too short for a header: padding
            position += _BLOCK - position % _BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + _HEADER])
        if kind == 0 or position + _HEADER + length > len(data):  # end of log, or a record still being written
            break
        chunk = data[position + _HEADER : position + _HEADER + length]
        position += _HEADER + length
        pending = chunk if kind in (_FULL, _FIRST) else pending + chunk
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def _complete_log(path: Path, timeout_s: float = 30.0) -> list[wandb_internal_pb2.Record]:
    """The log's records once its final ``exit`` record is on disk (the wandb-core service writes asynchronously)."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = list(wandb_records(path))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


@pytest.mark.slow
def test_offline_run_has_scalars_histograms_heatmaps_tables_and_step_axis(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import WandbLogger

    detector = CollapseDetector(min_load_entropy=0.9999, patience=1)  # alerts at once: offline alerts must not crash
    callback = MoEMonitor(log_every_n_steps=2, detector=detector)
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="moe-monitor-test")
    trainer = make_trainer(tmp_path, [callback], logger, max_steps=4, val_check_interval=2)
    try:
        trainer.fit(make_lm(), make_data())
    finally:
        wandb.finish()
        wandb.teardown()  # stops the wandb-core service, which flushes the transaction log
    assert trainer.global_step == 4 and len(callback.event_frame()) > 0

    (path,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    records = _complete_log(path)
    history, step_metrics = [], {}
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            )
        elif kind == "metric":
            step_metrics[record.metric.glob_name or record.metric.name] = record.metric.step_metric

    assert step_metrics.get("moe/*") == "trainer/global_step"
    frame = callback.layer_frame()
    for row in frame.itertuples():
        logged = [h for h in history if h.get("trainer/global_step") == row.step]
        for stat in STAT_NAMES:
            key = f"moe/{row.phase}/{stat}/L{row.layer_index:02d}"
            values = [h[key] for h in logged if key in h]
            assert values == [pytest.approx(getattr(row, stat), rel=1e-12)], key

    experts = callback.expert_frame()
    for phase, step in (("train", 2), ("val", 4)):
        (entry,) = [
            h for h in history if f"moe/{phase}/expert_load/L01/values" in h and h["trainer/global_step"] == step
        ]
        window = experts[(experts.phase == phase) & (experts.step == step)]
        counts = window[window.layer_index == 1]["count"].tolist()
        assert entry[f"moe/{phase}/expert_load/L01/values"] == counts
        assert entry[f"moe/{phase}/expert_load/L01/bins"] == [-0.5, 0.5, 1.5, 2.5, 3.5]
        assert entry[f"moe/{phase}/load_heatmap/_type"] == "image-file"
    tables = {key for h in history for key in h if key.endswith("/_type") and h[key] == "table-file"}
    charts = {f"moe/charts/{phase}/{stat}_table/_type" for phase in ("train", "val") for stat in (
        "load_entropy", "max_violation", "dead_experts", "dropped_fraction", "top1_confidence", "router_entropy",
        "aux_loss", "z_loss")}
    assert tables == {"moe/layer_frame/_type", "moe/events/_type"} | charts
    (rows,) = [h["moe/layer_frame/nrows"] for h in history if "moe/layer_frame/nrows" in h]
    assert rows == len(frame)

    # Events as they happen: a table at every window that raised some, holding every event so far.
    events = callback.event_frame()
    logged_events = [(h["trainer/global_step"], h["moe/events/nrows"]) for h in history
                     if "moe/events/nrows" in h and "trainer/global_step" in h]
    assert logged_events[0] == (2, int((events.step <= 2).sum()))
    assert logged_events[-1][1] == len(events)

    summary = {}
    for record in records:
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    alerted_layers = events[events.kind == "alert"].layer.nunique()
    assert summary["moe/status"] == f"{alerted_layers}/2 collapsed"
    assert summary["moe/incidents"] == alerted_layers


@pytest.mark.slow
def test_one_alert_per_incident_of_a_real_collapse_run(tmp_path: Path) -> None:
    import torch
    from lightning.pytorch.loggers import WandbLogger

    from moe_monitor.detect import make_snapshot
    from moe_monitor.scenarios import run
    from moe_monitor.sinks.wandb import WandbSink
    from tests.detect.detect_toys import MICRO

    torch.set_num_threads(1)
    result = run("biased_init", steps=200, log_every=10, seed=0, **MICRO)  # no controller: nothing repairs it
    alerts = [e for e in result.events if e.kind == "alert"]
    firing, incidents = {}, 0
    for e in result.events:  # a plain fold: a layer's incident opens when none of its rules fires
        if e.kind == "alert":
            incidents += not firing.get(e.layer)
            firing.setdefault(e.layer, set()).add(e.rule)
        elif e.kind == "recovery":
            firing.get(e.layer, set()).discard(e.rule)
    assert len(alerts) > incidents >= 2

    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="moe-monitor-test")
    sink = WandbSink(logger, log_histograms=False, log_heatmaps=False)
    try:
        experts = result.expert_frame
        for (phase, step), group in result.layer_frame.groupby(["phase", "step"], sort=False):
            counts = [experts[(experts.phase == phase) & (experts.step == step) & (experts.layer == name)]
                      .sort_values("expert")["count"].tolist() for name in group.layer]
            snapshot = make_snapshot(counts, step=int(step), phase=phase, top_k=2, layer_names=list(group.layer))
            sink.log_window(snapshot, {}, [e for e in result.events if e.step == step and e.phase == phase])
        sink.finish(result.layer_frame, None)
    finally:
        wandb.finish()
        wandb.teardown()
    assert len(sink.alerts) == incidents
    assert sink.alert_wait_s >= 60 and sink.failures == 0
    assert all(title.startswith("MoE incident: L0") for title, _, _ in sink.alerts)
