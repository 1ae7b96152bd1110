"""What a person sees from a real Hugging Face Trainer run: one line per incident, the summary, summary.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import Trainer  # noqa: E402

from moe_monitor import CollapseDetector  # noqa: E402
from moe_monitor.integrations.transformers import MoETrainerCallback  # noqa: E402
from tests.integrations.hf_toys import PaddedTokens, tiny_model, training_args  # noqa: E402


def test_trainer_console_prints_each_incident_once_and_the_summary(tmp_path: Path, capfd) -> None:
    # A detector no random router passes: every layer breaks in the first window, with several rules at once.
    detector = CollapseDetector(min_load_entropy=0.9999, max_violation=0.01, patience=1)
    callback = MoETrainerCallback(log_every=2, detector=detector)
    model = tiny_model("mixtral")
    Trainer(model=model, args=training_args(tmp_path), train_dataset=PaddedTokens(16), callbacks=[callback]).train()
    out = capfd.readouterr().out  # tqdm.write: stdout

    alerts = [e for e in callback.watcher.events if e.kind == "alert"]
    layers = sorted({e.layer for e in alerts})
    assert len(layers) == 2 and len(alerts) > len(layers)  # several rules per layer ...
    incident_lines = [line for line in out.splitlines() if line.startswith("  L0") and line.endswith("]")]
    assert [line.split()[1].rstrip(":") for line in incident_lines] == layers  # ... one line per layer
    assert "hint: try MoETrainerCallback(controllers=[" in out  # the user's own class
    files = tmp_path / "moe_monitor"
    assert f"report: moe-monitor report {files}" in out
    summary = json.loads((files / "summary.json").read_text())
    assert summary["still_open"] == ["L00", "L01"] and summary["windows"] == {"train": 2}
    assert set(summary["files"]) == {p.name for p in files.iterdir()}


def test_trainer_console_off_prints_nothing(tmp_path: Path, capfd) -> None:
    callback = MoETrainerCallback(log_every=2, console=False, detector=CollapseDetector(min_load_entropy=0.9999))
    Trainer(model=tiny_model("mixtral"), args=training_args(tmp_path), train_dataset=PaddedTokens(16),
            callbacks=[callback]).train()  # fmt: skip
    assert "MoEMonitor" not in capfd.readouterr().out
    assert not (tmp_path / "moe_monitor" / "summary.json").exists()
