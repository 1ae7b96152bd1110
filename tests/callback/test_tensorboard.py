"""TensorBoard dashboards read back from the event files of a real run."""

from __future__ import annotations

from pathlib import Path

import pytest
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from moe_monitor import CollapseDetector, MoEMonitor
from moe_monitor.snapshot import STAT_NAMES
from tests.callback.conftest import make_data, make_lm, make_trainer, masked_loader


@pytest.fixture(scope="module")
def tb_run(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("tb")
    alerts = []
    # Thresholds no real router meets, so the first window raises alerts (load entropy one is critical).
    detector = CollapseDetector(min_load_entropy=0.9999, max_violation=0.01, patience=1)
    callback = MoEMonitor(log_every_n_steps=2, detector=detector, on_alert=alerts.append, stop_on_collapse=True)
    logger = TensorBoardLogger(root, name="tb")
    trainer = make_trainer(root, [callback], logger, max_steps=6, val_check_interval=2)
    trainer.fit(make_lm(), make_data())
    accumulator = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "histograms": 0, "images": 0})
    accumulator.Reload()
    return trainer, callback, logger, accumulator, alerts


def test_scalars_equal_the_layer_frame(tb_run) -> None:
    _, callback, _, accumulator, _ = tb_run
    frame = callback.layer_frame()
    tags = set(accumulator.Tags()["scalars"])
    checked = 0
    for row in frame.itertuples():
        for stat in STAT_NAMES:
            key = f"moe/{row.phase}/{stat}/L{row.layer_index:02d}"
            value = getattr(row, stat)
            if value != value:  # NaN statistics are not logged
                continue
            logged = {e.step: e.value for e in accumulator.Scalars(key)}
            assert logged[row.step] == pytest.approx(value, rel=1e-6, abs=1e-7), key
            checked += 1
    assert checked >= 2 * 2 * 8  # two windows (train + val) of two layers, at least 8 finite statistics each
    assert {"moe/train/all/min_load_entropy", "moe/val/all/max_max_violation"} <= tags


def test_histograms_have_one_bucket_per_expert_centred_on_its_id(tb_run) -> None:
    from tensorboard.util import tensor_util

    _, callback, _, accumulator, _ = tb_run
    experts = callback.expert_frame()
    for layer in (0, 1):
        (event,) = accumulator.Tensors(f"moe/train/expert_load/L{layer:02d}")
        buckets = tensor_util.make_ndarray(event.tensor_proto).tolist()
        expected = experts[(experts.phase == "train") & (experts.layer_index == layer)].sort_values("expert")["count"]
        assert [b[2] for b in buckets] == expected.tolist()
        assert [(b[0], b[1]) for b in buckets] == [(e - 0.5, e + 0.5) for e in range(4)]  # expert ids at the centres
        assert event.step == 2


def test_heatmap_layout_and_alert_text(tb_run) -> None:
    _, _, logger, accumulator, _ = tb_run
    (image,) = accumulator.Images("moe/train/load_heatmap")
    assert image.step == 2 and image.width > 100 and image.height > 50
    plugins = set()
    for path in Path(logger.log_dir).glob("events.out.tfevents.*"):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                plugins.add((value.tag, value.metadata.plugin_data.plugin_name))
    assert ("custom_scalars__config__", "custom_scalars") in plugins
    assert any(tag.startswith("moe/events") and plugin == "text" for tag, plugin in plugins)


def test_alerts_reach_on_alert_and_critical_one_stops_every_rank(tb_run) -> None:
    trainer, callback, logger, _, alerts = tb_run
    assert trainer.global_step == 2 and callback.stopped_by_collapse
    assert {a.rule for a in alerts} >= {"load_entropy", "max_violation"}
    assert all(a.kind == "alert" and a.step == 2 for a in alerts)
    events = callback.event_frame()
    assert set(events.rule) >= {"load_entropy", "max_violation"}
    saved = Path(logger.log_dir, "moe_monitor", "events.csv").read_text()
    assert "load_entropy" in saved


def test_without_matplotlib_one_warning_names_the_extra_and_the_rest_is_logged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys
    import warnings

    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an environment without matplotlib raises on import
    callback = MoEMonitor(log_every_n_steps=1, detector=None)
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = make_trainer(tmp_path, [callback], logger, max_steps=3, limit_val_batches=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(make_lm(), make_data())
    ours = [str(w.message) for w in caught if "moe-monitor[plots]" in str(w.message)]
    assert len(ours) == 1
    accumulator = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "histograms": 0, "images": 0})
    accumulator.Reload()
    assert accumulator.Tags()["images"] == []
    assert len(accumulator.Tensors("moe/train/expert_load/L00")) == 3
    assert [e.step for e in accumulator.Scalars("moe/train/load_entropy/L01")] == [1, 2, 3]


def _last_layout(log_dir: str) -> list[str]:
    from tensorboard.plugins.custom_scalar import layout_pb2

    layouts = []
    for path in sorted(Path(log_dir).glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.tag == "custom_scalars__config__":
                    layouts.append((event.wall_time, layout_pb2.Layout.FromString(value.tensor.string_val[0])))
    # TensorBoard shows the last layout written.
    return [category.title for category in max(layouts, key=lambda pair: pair[0])[1].category]


def test_custom_scalars_layout_lists_the_phases_that_are_logged_test_included(tmp_path: Path) -> None:
    callback = MoEMonitor(log_every_n_steps=2, detector=None, log_heatmaps=False)
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = make_trainer(tmp_path, [callback], logger, max_steps=2, limit_val_batches=0)
    lm = make_lm()
    trainer.fit(lm, make_data())
    glance, per_layer = "moe/{}: at a glance (all layers)", "moe/{}: per layer (one colour per layer)"
    assert _last_layout(logger.log_dir) == [glance.format("train"), per_layer.format("train")]  # no validation ran
    trainer.test(lm, masked_loader(), verbose=False)
    layout = _last_layout(logger.log_dir)
    assert layout == [glance.format(p) for p in ("train", "test")] + [per_layer.format(p) for p in ("train", "test")]
    charts = {f"moe/{phase}/load_entropy/L00" for phase in ("train", "test")}
    assert charts <= set(EventAccumulator(logger.log_dir).Reload().Tags()["scalars"])


def test_one_run_per_layer_with_thresholds_controller_labels_and_layout_tags(tmp_path: Path) -> None:
    """The sink fed real windows of the reference model and a real bias controller's metrics."""
    import math

    import torch
    from tensorboard.plugins.custom_scalar import layout_pb2

    from moe_monitor.controllers import ExpertBiasController
    from moe_monitor.monitor import RouterMonitor
    from moe_monitor.reference import MoEConfig, MoETransformer
    from moe_monitor.sinks.scalars import scalar_metrics
    from moe_monitor.sinks.tensorboard import TensorBoardSink

    torch.manual_seed(0)
    model = MoETransformer(MoEConfig(d_model=16, n_layers=2, n_heads=2, seq_len=8, n_experts=4, top_k=2, d_expert=16,
                                     expert_bias=True))
    monitor = RouterMonitor(model)
    bias = ExpertBiasController(rate=0.01)
    bias.setup(model, monitor)
    logger = TensorBoardLogger(tmp_path, name="tb")
    detector = CollapseDetector()
    sink = TensorBoardSink(logger, log_heatmaps=False, detector=detector)
    frames = []
    for step in (1, 2, 3):
        model(torch.randint(0, 256, (4, 8)))
        bias.on_train_step(monitor, step)
        snapshot = monitor.collect(step, "train")
        metrics = {**scalar_metrics(snapshot), **bias.metrics()}
        assert "controller/bias/blocks.1.moe.router/range" in metrics  # controllers name layers by module path
        sink.log_window(snapshot, metrics, [])
        frames.append((snapshot, bias.metrics()))
    sink.finish(None, None)
    logger.experiment.flush()

    floor = math.log(2) / math.log(4)  # top-2 of 4: the entropy of all load on two experts
    for index, label in enumerate(("L00", "L01")):
        run = EventAccumulator(str(Path(logger.log_dir, "layers", label)), size_guidance={"scalars": 0}).Reload()
        values = [e.value for e in run.Scalars("moe/train/load_entropy")]
        assert values == pytest.approx([float(s.stats["load_entropy"][index]) for s, _ in frames], rel=1e-6)
        threshold = run.Scalars("moe/train/threshold/load_entropy")[-1].value
        assert threshold == pytest.approx(floor + detector.min_load_entropy * (1 - floor), rel=1e-6)
        assert run.Scalars("moe/train/threshold/max_violation")[-1].value == pytest.approx(
            detector.max_violation * (4 / 2 - 1), rel=1e-6
        )
        name = f"blocks.{index}.moe.router"
        assert [e.value for e in run.Scalars("controller/bias/range")] == pytest.approx(
            [m[f"controller/bias/{name}/range"] for _, m in frames], rel=1e-6
        )

    (layout_event,) = [
        v for path in Path(logger.log_dir).glob("events.out.tfevents.*") for e in EventFileLoader(str(path)).Load()
        for v in e.summary.value if v.tag == "custom_scalars__config__"
    ][-1:]
    layout = layout_pb2.Layout.FromString(layout_event.tensor.string_val[0])
    charts = {chart.title: list(chart.multiline.tag) for category in layout.category for chart in category.chart}
    assert charts["controller/bias/range"] == ["^controller/bias/range$"]
    assert not any("blocks" in tag for tags in charts.values() for tag in tags)
    (entropy_chart,) = [tags for title, tags in charts.items() if title.startswith("load_entropy")]
    assert entropy_chart == ["^moe/train/load_entropy$", "^moe/train/threshold/load_entropy$"]
