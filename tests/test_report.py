"""The HTML report of real runs: verdict, sections, thresholds, axes, run folders of every logger, comparison."""

from __future__ import annotations

import math
import re
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import pytest
import torch

from moe_monitor import MoEMonitor
from moe_monitor.detect import CollapseDetector
from moe_monitor.monitor import RouterMonitor
from moe_monitor.reference import CorpusDataModule, MoETransformer
from moe_monitor.reference.data import DOMAINS
from moe_monitor.report import RunFilesNotFoundError, find_history, render_report, write_report
from moe_monitor.scenarios import SCENARIOS, run
from tests.detect.detect_toys import MICRO

COLLAPSE = {"load_entropy", "max_violation", "dead_experts", "saturation"}


def _save(result, folder: Path) -> Path:
    """The run's history as the callback writes it (layers, experts, events)."""
    folder.mkdir(parents=True)
    result.layer_frame.to_csv(folder / "layers.csv", index=False)
    result.expert_frame.to_csv(folder / "experts.csv", index=False)
    pd.DataFrame([{**asdict(e), "experts": list(e.experts)} for e in result.events]).to_csv(
        folder / "events.csv", index=False
    )
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two real scenario runs on one thread: biased_init repaired by the bias controller, and a healthy run."""
    root = tmp_path_factory.mktemp("runs")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        biased = run("biased_init", steps=200, controllers="bias", log_every=10, seed=0, **MICRO)
        healthy = run(None, steps=100, log_every=10, seed=0, **MICRO)
    finally:
        torch.set_num_threads(threads)
    _save(biased, root / "biased" / "moe_monitor")
    _save(healthy, root / "healthy" / "moe_monitor")
    return root, biased, healthy


def _plain_verdict(result):
    """First collapse alert step, layers with a collapse alert, layers whose collapse rules still fire at the end."""
    firing: dict[str, set] = {}
    first, layers = None, set()
    for e in result.events:
        if e.phase != "train" or e.rule not in COLLAPSE:
            continue
        if e.kind == "alert":
            first = e.step if first is None else min(first, e.step)
            layers.add(e.layer)
            firing.setdefault(e.layer, set()).add(e.rule)
        elif e.kind == "recovery":
            firing.get(e.layer, set()).discard(e.rule)
    return first, layers, {layer for layer, rules in firing.items() if rules}


def _figure(text: str, title: str) -> str:
    start = text.index(f"<b>{title}</b>")
    return text[start : text.index("</figure>", start)]


@pytest.mark.slow
def test_verdict_and_sections_of_a_collapse_run(runs) -> None:
    root, biased, _ = runs
    text = render_report(root / "biased")
    labels = {name: f"L{i:02d}" for i, name in enumerate(biased.layer_frame.layer.unique())}
    first, layers, still = _plain_verdict(biased)
    assert first is not None
    verdict = re.search(r"<p class='verdict (\w+)'>([^<]*)</p>", text)
    assert verdict.group(2).startswith(f"Collapsed at step {first} in {len(layers)} of 2 layers")
    if still:
        assert verdict.group(1) == "bad"
        assert f"still collapsed at the end (step 200) in {', '.join(sorted(labels[x] for x in still))}" in text
    else:
        last_recovery = max(e.step for e in biased.events if e.kind == "recovery" and e.rule in COLLAPSE)
        assert f"recovered by step {last_recovery}" in verdict.group(2)
    assert "<title>MoE routing report: biased/moe_monitor</title>" not in text  # named after the run folder
    for section in ("Run", "Loss", "Incidents", "Statistics: train windows", "Controller knobs over time",
                    "Expert load over time, worst layers", "Co-activation", "Expert use per domain",
                    "Last window (step 200)"):
        assert f"<h2>{section}</h2>" in text, section
    assert "Expert-bias range (max - min)" in text  # the bias controller's knob over time

    # The load-entropy chart: fixed [0, 1] axis with six ticks, and the alert threshold of the run's alerts.
    entropy = _figure(text, "Load entropy")
    assert re.findall(r'text-anchor="end">([0-9.]+)</text>', entropy) == ["0", "0.2", "0.4", "0.6", "0.8", "1"]
    threshold = next(e.threshold for e in biased.events if e.rule == "load_entropy" and e.kind == "alert")
    assert f"alert threshold {threshold:.3g}" in entropy
    steps = re.findall(r'text-anchor="middle">(\d+)</text>', entropy)
    assert len(steps) >= 4 and int(steps[-1]) <= 200

    # The worst layer's load over time: one cell per (expert, training window).
    worst = biased.layer_frame[biased.layer_frame.phase == "train"].groupby("layer").load_entropy.min().idxmin()
    heat = _figure(text, f"{labels[worst]} {worst}: load per expert over training")
    windows = biased.layer_frame[biased.layer_frame.phase == "train"].step.nunique()
    assert heat.count("<rect ") == 8 * windows


@pytest.mark.slow
def test_a_healthy_run_says_so(runs) -> None:
    root, _, healthy = runs
    assert not [e for e in healthy.events if e.kind == "alert"]
    text = render_report(root / "healthy")
    lowest = healthy.layer_frame[healthy.layer_frame.phase == "train"].load_entropy.min()
    assert f"Healthy: no alert in 10 training windows up to step 100; lowest load entropy {lowest:.2f}" in text
    assert "No controller changed a knob" in text


@pytest.mark.slow
def test_two_runs_side_by_side(runs, tmp_path) -> None:
    root, _, _ = runs
    path = write_report([root / "biased", root / "healthy"], tmp_path / "compare.html")
    text = path.read_text()
    assert "MoE routing report: 2 runs compared" in text
    table = text[text.index("<h2>Side by side</h2>") : text.index("</table>")]
    assert "Collapsed at step" in table and "Healthy: no alert" in table
    assert text.count("<section class='run'>") == 2
    assert text.startswith("<!doctype html>") and "<script" not in text


@pytest.mark.slow
def test_history_is_found_in_any_run_folder_and_missing_history_is_explained(runs, tmp_path) -> None:
    root, biased, _ = runs
    nested = _save(biased, tmp_path / "wandb" / "offline-run-20260101_000000-abc" / "files" / "moe_monitor")
    assert find_history(tmp_path / "wandb") == nested
    assert "MoE routing report: offline-run-20260101_000000-abc" in render_report(tmp_path / "wandb")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunFilesNotFoundError, match="no layers.csv or layers.parquet in .*save_frames=True"):
        render_report(tmp_path / "empty")
    with pytest.raises(RunFilesNotFoundError, match="holds the history of 2 runs; pass one of them"):
        render_report(root)


@pytest.mark.parametrize("kind", ["csv", "tensorboard"])
def test_loss_curve_and_configuration_come_from_the_logger_folder(tmp_path, kind) -> None:
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from tests.callback.conftest import make_data, make_lm, make_trainer

    torch.set_num_threads(1)
    logger = CSVLogger(tmp_path, name="run") if kind == "csv" else TensorBoardLogger(tmp_path, name="run")
    callback = MoEMonitor(log_every_n_steps=2, detector=CollapseDetector(), log_heatmaps=False)
    trainer = make_trainer(tmp_path, [callback], logger, max_steps=4, val_check_interval=2)
    trainer.fit(make_lm(), make_data())
    text = render_report(logger.log_dir)
    assert "MoE routing report: run/version_0" in text
    assert "<b>lr</b> = 0.003" in text and "<b>config.n_experts</b> = 4" in text  # hparams.yaml
    loss = _figure(text, "Loss")
    assert "train/loss" in loss and "val/loss" in loss and "<polyline" in loss


def test_per_domain_validation_phases_show_which_experts_serve_each_domain(tmp_path) -> None:
    torch.manual_seed(0)
    model = MoETransformer(SCENARIOS["biased_init"].config("tiny", **MICRO)).eval()
    data = CorpusDataModule(seq_len=MICRO["seq_len"], batch_size=8, train_samples=16, val_per_domain=8)
    data.setup()
    monitor = RouterMonitor(model)
    with torch.no_grad():
        for batch in data.train_dataloader():
            model(batch["input_ids"])
        monitor.collect(10, "train")
        for batch in data.val_dataloader():
            for domain, name in enumerate(DOMAINS):
                rows = batch["domain"] == domain
                if rows.any():
                    with monitor.phase(f"val/{name}"):
                        model(batch["input_ids"][rows])
        for name in DOMAINS:
            monitor.collect(10, f"val/{name}")
    monitor.save(tmp_path / "moe_monitor")
    experts = monitor.expert_frame()
    text = render_report(tmp_path)
    section = text[text.index("<h2>Expert use per domain</h2>") : text.index("<h2>Last window (step 10)</h2>")]
    for name in DOMAINS:
        loads = experts[(experts.phase == f"val/{name}") & (experts.layer == "blocks.0.moe.router")]
        busy = [str(e) for e, load in zip(loads.expert, loads.load) if load > 1.5 / 8]
        assert f"{name}: experts {', '.join(busy) or 'none'}" in section
    assert not math.isnan(experts.load.sum())
