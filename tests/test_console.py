"""The console of a real collapse run: one line per incident, recovery lines, thinned knob lines, a summary."""

from __future__ import annotations

import io
import json
import re

import pytest
import torch

from moe_monitor.detect import make_snapshot
from moe_monitor.incidents import IncidentTracker, progress_status
from moe_monitor.scenarios import run
from moe_monitor.sinks.console import ConsoleSink
from tests.detect.detect_toys import MICRO


@pytest.fixture(scope="module")
def collapse_run():
    """``biased_init`` with the aux-loss controller: both layers lose experts at once, the controller repairs them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run("biased_init", steps=200, controllers="aux", log_every=10, seed=0, **MICRO)
    finally:
        torch.set_num_threads(threads)


def _replay(result, sink: ConsoleSink) -> list[tuple[str, int, list]]:
    """Feeds the run's windows (real counts, real events) to ``sink`` in order; returns (phase, step, events)."""
    windows = []
    experts = result.expert_frame
    for (phase, step), group in result.layer_frame.groupby(["phase", "step"], sort=False):
        counts = [experts[(experts.phase == phase) & (experts.step == step) & (experts.layer == name)]
                  .sort_values("expert")["count"].tolist() for name in group.layer]
        snapshot = make_snapshot(counts, step=int(step), phase=phase, top_k=2, layer_names=list(group.layer))
        events = [e for e in result.events if e.step == step and e.phase == phase]
        metrics = {f"controller/aux_loss/{name}/coef": 0.0 for name in group.layer}
        sink.log_window(snapshot, metrics, events)
        windows.append((phase, int(step), events))
    sink.finish(result.layer_frame, None)
    return windows


def _plain_incidents(events):
    """Incidents by a plain loop: a layer opens one on an alert while none of its rules fire, ends when none do."""
    firing, opened, closed = {}, [], []
    for e in events:
        key = (e.phase, e.layer)
        if e.kind == "alert":
            if not firing.get(key):
                opened.append((e.step, e.layer))
            firing.setdefault(key, set()).add(e.rule)
        elif e.kind == "recovery" and firing.get(key):
            firing[key].discard(e.rule)
            if not firing[key]:
                closed.append((e.step, e.layer))
    return opened, closed, {k for k, v in firing.items() if v}


def test_one_line_per_incident_recovery_lines_and_summary(collapse_run, tmp_path) -> None:
    out = io.StringIO()
    sink = ConsoleSink(interface="cli", controllers="aux".split(","), out=out, history_dir=tmp_path)
    windows = _replay(collapse_run, sink)
    lines = out.getvalue().splitlines()
    end = next(i for i, line in enumerate(lines) if line.startswith("MoEMonitor summary:"))
    lines, summary_lines = lines[:end], lines[end:]
    labels = {name: f"L{i:02d}" for i, name in enumerate(collapse_run.layer_frame.layer.unique())}
    opened, closed, still = _plain_incidents(collapse_run.events)
    alerts = [e for e in collapse_run.events if e.kind == "alert"]
    assert len(opened) >= 2 and len(closed) >= 1 and len(alerts) >= len(opened)

    incident_lines = [line for line in lines if re.match(r"^  L\d\d ", line)]
    assert len(incident_lines) == len(opened)
    for step, layer in opened:
        (line,) = [x for x in incident_lines if x.startswith(f"  {labels[layer]} {layer}:")]
        for rule in {e.rule for e in alerts if e.layer == layer and e.step == step}:
            assert rule in line
    # Layers that break in the same window share one header.
    assert sum("new incident" in line for line in lines) == len({step for step, _ in opened})
    recovered = [line for line in lines if "recovered:" in line]
    assert [(int(re.search(r"step (\d+)\]", x).group(1)), x.split()[5]) for x in recovered] == [
        (step, labels[layer]) for step, layer in closed
    ]

    # The aux controller changes its coefficient in many windows; only material moves are printed.
    controls = [e for e in collapse_run.events if e.kind == "control"]
    control_lines = [line for line in lines if "controller:" in line]
    assert 1 <= len(control_lines) < len({e.step for e in controls})

    # Hints know the aux controller is on and name CLI flags only.
    hints = [line for line in lines if line.startswith("  hint:")]
    assert hints and all("AuxLossController is on" in h and "--control aux,bias" in h for h in hints)
    assert not any("MoEMonitor(" in line for line in lines)

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["windows"] == {"train": 20, "val": 1}
    for layer in summary["layers"]:
        name = layer["layer"]
        assert layer["alerts"] == sum(e.layer == name for e in alerts)
        assert layer["recoveries"] == sum(e.layer == name and e.kind == "recovery" for e in collapse_run.events)
        assert layer["incidents"] == sum(x == name for _, x in opened)
    assert summary["still_open"] == sorted(labels[layer] for _, layer in still)
    assert summary["report_command"] == f"moe-monitor report {tmp_path}"
    assert set(summary["knobs"]) == {f"controller/aux_loss/{label}/coef" for label in labels.values()}
    assert summary_lines[-1] == f"  report: moe-monitor report {tmp_path}"
    assert len(windows) == 21


def test_library_hints_name_python_arguments_and_progress_status(collapse_run) -> None:
    out = io.StringIO()
    sink = ConsoleSink(interface="library", out=out)
    _replay(collapse_run, sink)
    text = out.getvalue()
    assert "--control" not in text and "--" not in text.replace("->", "")
    assert "try MoEMonitor(controllers=[ExpertBiasController()])" in text
    assert sink.summary is not None and sink.summary["history_dir"] is None and "report:" not in text

    tracker = IncidentTracker()
    first_alert = min(e.step for e in collapse_run.events if e.kind == "alert")
    layer_names = list(collapse_run.layer_frame.layer.unique())
    tracker.update([e for e in collapse_run.events if e.step == first_alert], layer_names)
    broken = {e.layer for e in collapse_run.events if e.step == first_alert and e.kind == "alert"}
    window = collapse_run.layer_frame[(collapse_run.layer_frame.step == first_alert)
                                      & (collapse_run.layer_frame.phase == "train")]
    snapshot = make_snapshot([[1, 1]] * len(layer_names), step=first_alert, layer_names=layer_names,
                             load_entropy=window.load_entropy.tolist())
    status = progress_status(snapshot, tracker)
    assert status["moe"] == f"{len(broken)}/{len(layer_names)} collapsed"
    assert status["moe_entropy"] == pytest.approx(window.load_entropy.min(), abs=5e-4)
