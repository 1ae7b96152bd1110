"""What a person sees from a real Lightning run: console incident lines, summary, progress bar, file placement."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pandas as pd
import pytest
import torch

from moe_monitor import cli
from moe_monitor.callback import MoEMonitor
from moe_monitor.detect import CollapseDetector
from moe_monitor.scenarios import SCENARIOS
from tests.callback.conftest import make_data, make_lm, make_trainer


def _biased_lm() -> Any:
    lm = make_lm(seed=0, n_experts=8)
    SCENARIOS["biased_init"].prepare(lm)
    return lm


def _incidents(events: list[Any]) -> dict[str, list[int]]:
    """A plain replay of the events: per layer, the steps where a layer with no rule firing gets an alert."""
    firing: dict[str, set[str]] = {}
    opened: dict[str, list[int]] = {}
    for event in events:
        rules = firing.setdefault(event.layer, set())
        if event.kind == "alert":
            if not rules:
                opened.setdefault(event.layer, []).append(event.step)
            rules.add(event.rule)
        elif event.kind == "recovery":
            rules.discard(event.rule)
    return opened


def _seen(capfd: Any, caplog: Any) -> str:
    """Everything printed, once: the terminal (both streams) and Lightning's ``rank_zero_info`` records.

    Whether a record also reaches the terminal depends on import order: Lightning gives its logger a handler of its
    own (not propagating) only when the root logger has none yet, and DeepSpeed or Megatron, imported earlier in the
    same test session, configure the root logger (whose handler prefixes each record): a record is taken from the
    log capture and its copy on the terminal left out.
    """
    out = capfd.readouterr()
    terminal = out.out + "\n" + out.err
    records = [record.getMessage() for record in caplog.records]
    for message in records:
        terminal = terminal.replace(message, "", 1)
    return "\n".join([terminal, *records])


class _BarReader(pl.Callback):
    """Reads what the progress bar would show after every training batch (after the monitor's own hook)."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.seen.append(dict(trainer.progress_bar_callback.get_metrics(trainer, pl_module)))


def test_console_shows_one_line_per_incident_the_summary_and_writes_summary_json(
    tmp_path: Path, capfd, caplog
) -> None:
    from lightning.pytorch.loggers import CSVLogger

    callback = MoEMonitor(log_every_n_steps=2, detector=CollapseDetector(patience=1))
    logger = CSVLogger(tmp_path, name="run")
    trainer = make_trainer(tmp_path, [callback], logger, max_steps=12, limit_val_batches=0)
    trainer.fit(_biased_lm(), make_data())
    text = _seen(capfd, caplog)

    opened = _incidents(callback.events)
    assert opened, "the biased start must break at least one layer"
    incident_lines = [line for line in text.splitlines() if line.startswith("  L0") and "[" in line]
    assert len(incident_lines) == sum(len(steps) for steps in opened.values())
    alerts = [e for e in callback.events if e.kind == "alert"]
    assert len(alerts) > len(incident_lines)  # several rules per incident, yet one line each
    assert "moe_monitor warning alert" not in text and "moe_monitor critical alert" not in text
    assert text.count("hint: ") == len({s for steps in opened.values() for s in steps})  # one block per window

    files = Path(logger.log_dir) / "moe_monitor"
    summary = json.loads((files / "summary.json").read_text())
    assert summary["history_dir"] == str(files)
    assert set(summary["files"]) == {p.name for p in files.iterdir()}  # complete: written after the history
    assert {"layers.csv", "events.csv", "summary.json"} <= set(summary["files"])
    assert f"report: moe-monitor report {files}" in text
    assert "MoEMonitor summary: windows 6 train; last step 12." in text
    assert sum(layer["incidents"] for layer in summary["layers"]) == len(incident_lines)


def test_progress_bar_shows_the_collapsed_layers_and_the_worst_entropy(tmp_path: Path, capfd) -> None:
    callback, reader = MoEMonitor(log_every_n_steps=2, detector=CollapseDetector(patience=1)), _BarReader()
    trainer = make_trainer(
        tmp_path, [callback, reader], max_steps=8, limit_val_batches=0, enable_progress_bar=True
    )
    trainer.fit(_biased_lm(), make_data())

    frame = callback.layer_frame()
    assert "moe" not in reader.seen[0]  # before the first window there is nothing to show
    last = reader.seen[-1]
    opened_layers = set(_incidents(callback.events))  # no recovery in 8 steps of a biased start
    assert not [e for e in callback.events if e.kind == "recovery"]
    assert last["moe"] == (f"{len(opened_layers)}/2 collapsed" if opened_layers else "ok")
    worst = frame[frame.step == frame.step.max()].load_entropy.min()
    assert last["moe_entropy"] == pytest.approx(round(worst, 3))
    assert math.isfinite(last["moe_entropy"]) and last["moe_entropy"] < 0.9
    shown = capfd.readouterr().out  # the bar on the terminal: Rich's "moe: ...", or TQDM's postfix "moe=..."
    assert f"moe: {last['moe']}" in shown or f"moe={last['moe']}" in shown
    # The bar's own method is back after the run.
    assert "get_metrics" not in vars(trainer.progress_bar_callback)


def test_named_monitor_fields_and_console_off(tmp_path: Path, capfd, caplog) -> None:
    callback, reader = MoEMonitor(log_every_n_steps=2, name="fast", console=False), _BarReader()
    trainer = make_trainer(tmp_path, [callback, reader], max_steps=4, limit_val_batches=0, enable_progress_bar=True)
    trainer.fit(make_lm(), make_data())
    assert set(reader.seen[-1]) >= {"moe_fast", "moe_fast_entropy"}
    assert "MoEMonitor summary" not in _seen(capfd, caplog)


def test_controller_tags_use_layer_labels_in_every_logger(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import CSVLogger

    from moe_monitor.controllers import ExpertBiasController

    callback = MoEMonitor(log_every_n_steps=2, controllers=[ExpertBiasController()])
    logger = CSVLogger(tmp_path, name="run")
    lm = make_lm(expert_bias=True)
    trainer = make_trainer(tmp_path, [callback], logger, max_steps=4, limit_val_batches=0)
    trainer.fit(lm, make_data())
    columns = pd.read_csv(Path(logger.log_dir) / "metrics.csv").columns
    controller = [c for c in columns if c.startswith("controller/")]
    paths = [name for name, _ in lm.named_modules() if name.endswith("router")]
    assert controller and not [c for c in controller if any(p in c for p in paths)]
    assert any("/L00" in c for c in controller) and any("/L01" in c for c in controller)


def test_tensorboard_gets_the_detector_thresholds(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    detector = CollapseDetector(min_load_entropy=0.5)
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = make_trainer(tmp_path, [MoEMonitor(detector=detector)], logger, max_steps=4, limit_val_batches=0)
    trainer.fit(make_lm(), make_data())
    accumulator = EventAccumulator(str(Path(logger.log_dir) / "layers" / "L00"))
    accumulator.Reload()
    values = [s.value for s in accumulator.Scalars("moe/train/threshold/load_entropy")]
    # top-2 of 4 experts: entropy ranges from log(2)/log(4) = 0.5 to 1; the threshold is halfway, 0.75.
    assert values and values[0] == pytest.approx(0.5 + 0.5 * 0.5, abs=1e-6)


def test_no_logger_run_writes_a_run_folder_of_its_own_and_prints_it(
    tmp_path: Path, capfd, caplog, monkeypatch
) -> None:
    cwd, root = tmp_path / "cwd", tmp_path / "root"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    folders = []
    for steps in (2, 4):
        trainer = make_trainer(root, [MoEMonitor(log_every_n_steps=1)], max_steps=steps, limit_val_batches=0)
        with pytest.warns(RuntimeWarning, match="no logger"):
            trainer.fit(make_lm(), make_data())
        folder = root / "moe_runs" / f"run_{len(folders)}"
        assert _seen(capfd, caplog).count(f"history files of this run: {folder}") == 1
        caplog.clear()
        assert pd.read_csv(folder / "layers.csv").step.max() == steps
        folders.append(folder)
    assert list(cwd.iterdir()) == []  # nothing in the current directory
    assert not (root / "moe_monitor").exists()
    for folder in folders:
        assert cli.main(["report", str(folder), "-o", str(tmp_path / f"{folder.name}.html")]) == 0
        assert (tmp_path / f"{folder.name}.html").is_file()


@pytest.mark.slow
def test_two_wandb_offline_runs_keep_their_files_in_their_own_run_folders(tmp_path: Path) -> None:
    pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    save_dir = tmp_path / "runs"
    save_dir.mkdir()
    run_dirs = []
    for steps in (2, 4):
        logger = WandbLogger(save_dir=str(save_dir), offline=True)
        trainer = make_trainer(tmp_path, [MoEMonitor(log_every_n_steps=1)], logger, max_steps=steps,
                               limit_val_batches=0)  # fmt: skip
        trainer.fit(make_lm(), make_data())
        run_dirs.append(Path(logger.experiment.dir))
        logger.experiment.finish()
    assert run_dirs[0] != run_dirs[1]
    for run_dir, steps in zip(run_dirs, (2, 4)):
        assert save_dir in run_dir.parents
        assert pd.read_csv(run_dir / "moe_monitor" / "layers.csv").step.max() == steps
        assert (run_dir / "moe_monitor" / "summary.json").is_file()
        offline_run = run_dir.parent  # wandb/offline-run-.../files -> the run's folder: what a user passes
        out = tmp_path / f"{offline_run.name}.html"
        assert cli.main(["report", str(offline_run), "-o", str(out)]) == 0
    assert not (save_dir / "moe_monitor").exists() and not (tmp_path / "moe_monitor").exists()
    assert sorted(os.listdir(save_dir)) == ["wandb"]


def test_under_the_tqdm_bar_lines_go_through_tqdm_write_and_the_postfix_shows_the_status(tmp_path: Path, capfd) -> None:
    from lightning.pytorch.callbacks import TQDMProgressBar

    callback = MoEMonitor(log_every_n_steps=2, detector=CollapseDetector(patience=1))
    trainer = make_trainer(tmp_path, [callback, TQDMProgressBar()], max_steps=4, limit_val_batches=0,
                           enable_progress_bar=True)  # fmt: skip
    trainer.fit(_biased_lm(), make_data())
    out = capfd.readouterr().out
    collapsed = len(_incidents(callback.events))
    assert collapsed and f"moe={collapsed}/2 collapsed" in out
    assert "new incident" in out and "MoEMonitor summary" in out  # tqdm.write prints to the bar's stream, stdout


class _RepairRouters(pl.Callback):
    """Gives every router fresh random gate rows at step 6: the biased start's collapse really ends."""

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step == 6:
            generator = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for block in pl_module.model.blocks:
                    weight_ED = block.moe.router.gate.weight
                    weight_ED.copy_(torch.randn(weight_ED.shape, generator=generator))


def _closed(events: list[Any]) -> int:
    """A plain replay: how many times a layer's firing rules go back to none."""
    firing: dict[str, set[str]] = {}
    closed = 0
    for event in events:
        rules = firing.setdefault(event.layer, set())
        if event.kind == "alert":
            rules.add(event.rule)
        elif event.kind == "recovery" and event.rule in rules:
            rules.discard(event.rule)
            closed += not rules
    return closed


def test_a_collapse_that_ends_prints_one_recovery_line_per_incident(tmp_path: Path, capfd, caplog) -> None:
    detector = CollapseDetector(patience=1, recovery=1, dead_expert_p=None)
    callback = MoEMonitor(log_every_n_steps=2, detector=detector)
    trainer = make_trainer(tmp_path, [callback, _RepairRouters()], max_steps=20, limit_val_batches=0)
    trainer.fit(_biased_lm(), make_data())
    text = _seen(capfd, caplog)
    recovered = [line for line in text.splitlines() if "] recovered: L0" in line]
    assert _closed(callback.events) >= 1
    assert len(recovered) == _closed(callback.events)
    assert sum(len(steps) for steps in _incidents(callback.events).values()) == len(
        [line for line in text.splitlines() if line.startswith("  L0") and line.endswith("]")]
    )


def test_a_resumed_run_still_shows_the_incidents_open_at_the_checkpoint(tmp_path: Path) -> None:
    first = MoEMonitor(log_every_n_steps=2, detector=CollapseDetector(patience=1), console=False)
    lm = _biased_lm()
    trainer = make_trainer(tmp_path, [first], max_steps=4, limit_val_batches=0)
    trainer.fit(lm, make_data())
    path = tmp_path / "step4.ckpt"
    trainer.save_checkpoint(path)
    open_at_4 = set(_incidents(first.events))
    assert open_at_4 and not [e for e in first.events if e.kind == "recovery"]

    resumed, reader = MoEMonitor(log_every_n_steps=2, detector=CollapseDetector(patience=1)), _BarReader()
    trainer2 = make_trainer(tmp_path, [resumed, reader], max_steps=8, limit_val_batches=0, enable_progress_bar=True)
    trainer2.fit(_biased_lm(), make_data(), ckpt_path=path)
    # The detector remembers its alerts (no new ones after step 4), yet the bar still counts the open incidents.
    assert not [e for e in resumed.events if e.kind == "alert" and e.step > 4]
    still_open = set(_incidents(resumed.events)) - {e.layer for e in resumed.events if e.kind == "recovery"}
    assert reader.seen[-1]["moe"] == f"{len(still_open)}/2 collapsed"
    assert len(still_open) == len(open_at_4)
