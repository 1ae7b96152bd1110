"""``MoEMonitor(sinks=...)``: a user's own sink, a failing one, and built-in sinks picked by hand, in real fits."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.tensorboard import SummaryWriter

from moe_monitor import CollapseDetector, MoEMonitor
from moe_monitor.sinks.scalars import ScalarSink
from moe_monitor.sinks.tensorboard import TensorBoardSink
from tests.callback.conftest import SEQ_LEN, TINY, make_data, make_lm, make_trainer
from tests.integrations.tb_read import accumulate, expert_load, main_run
from tests.sinks.user_sinks import Broken, Recorder

BATCH = 4
# Fires on the first training window of a freshly initialised router: every layer raises alerts to compare.
HAIR_TRIGGER = dict(patience=1, min_load_entropy=0.999, max_violation=0.01)


def test_a_user_sink_receives_every_window_and_event_of_the_fit(tmp_path: Path) -> None:
    recorder = Recorder()
    logger = CSVLogger(tmp_path, name="run")
    callback = MoEMonitor(sinks=[recorder], detector=CollapseDetector(**HAIR_TRIGGER), console=False)
    make_trainer(tmp_path, [callback], logger, max_steps=6, val_check_interval=3).fit(
        make_lm(), make_data(batch_size=BATCH)
    )

    files = Path(logger.log_dir) / "moe_monitor"  # the history files still go beside the logger's run
    layers = pd.read_csv(files / "layers.csv")
    assert sorted(recorder.windows) == sorted(
        zip(layers.step, layers.phase, layers.layer, layers.tokens, layers.assignments)
    )
    # Independently: log_every_n_steps=2 steps of BATCH x SEQ_LEN tokens per training window, top_k choices each.
    train = [w for w in recorder.windows if w[1] == "train"]
    assert sorted({w[0] for w in train}) == [2, 4, 6] and len(train) == 3 * TINY["n_layers"]
    assert {(w[3], w[4]) for w in train} == {(2 * BATCH * SEQ_LEN, 2 * BATCH * SEQ_LEN * TINY["top_k"])}
    assert {w[0] for w in recorder.windows if w[1] == "val"} == {3, 6}

    saved = pd.read_csv(files / "events.csv")
    assert len(saved) >= TINY["n_layers"]  # the hair trigger fired on every layer
    assert recorder.events == list(zip(saved.step, saved.layer, saved.rule, saved.kind))
    assert recorder.finished
    # `sinks=` replaces the loggers' sinks: the CSV logger got no routing scalar.
    metrics = pd.read_csv(Path(logger.log_dir) / "metrics.csv")
    assert not [c for c in metrics.columns if c.startswith("moe/")]


def test_a_failing_user_sink_warns_once_and_the_fit_goes_on(tmp_path: Path) -> None:
    broken, recorder = Broken(), Recorder()
    callback = MoEMonitor(sinks=[broken, recorder], console=False)
    trainer = make_trainer(tmp_path, [callback], max_steps=6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(make_lm(), make_data(batch_size=BATCH))
    assert trainer.global_step == 6
    about = [w for w in caught if "broken sink" in str(w.message)]
    assert len(about) == 1 and issubclass(about[0].category, RuntimeWarning)
    assert "disk full" in str(about[0].message) and "training goes on" in str(about[0].message)
    assert broken.calls == 3  # called for every window, failing each time
    assert [w[0] for w in recorder.windows if w[1] == "train"] == [2, 2, 4, 4, 6, 6]  # the sink after it unharmed


def test_explicit_summary_writer_and_tensorboard_logger_write_event_files_tensorboard_reads(tmp_path: Path) -> None:
    writer = SummaryWriter(log_dir=str(tmp_path / "writer"))
    tb_logger = TensorBoardLogger(tmp_path / "tb", name="run")
    by_hand = TensorBoardLogger(tmp_path / "hand", name="run")
    chosen = [ScalarSink([by_hand]), TensorBoardSink(by_hand, log_histograms=False)]  # built-in sinks, picked
    callback = MoEMonitor(sinks=[writer, tb_logger, *chosen], console=False)
    trainer = make_trainer(tmp_path, [callback], max_steps=4)  # no logger of the Trainer's own
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(make_lm(), make_data(batch_size=BATCH))
    writer.close()
    assert not [w for w in caught if "has no logger" in str(w.message)]  # the sinks are named: no warning

    experts = callback.expert_frame().query("phase == 'train'")
    for root in (tmp_path / "writer", tmp_path / "tb"):
        events = accumulate(main_run(root))
        for layer in range(TINY["n_layers"]):
            windows = expert_load(events, f"moe/train/expert_load/L{layer:02d}")
            assert [step for step, _ in windows] == [2, 4]
            expected = experts[experts.layer_index == layer].sort_values(["step", "expert"])
            counts = [c for _, buckets in windows for c in buckets]
            assert counts == expected["count"].astype(float).tolist()
            scalar = [s.step for s in events.Scalars(f"moe/train/load_entropy/L{layer:02d}")]
            assert scalar == [2, 4]
    hand = accumulate(main_run(tmp_path / "hand"))
    assert [s.step for s in hand.Scalars("moe/train/load_entropy/L00")] == [2, 4]
    assert "moe/train/load_heatmap" in hand.Tags()["images"]
    assert not [tag for tag in hand.Tags()["tensors"] if "expert_load" in tag]  # the histograms left out


@pytest.mark.parametrize("sinks", ["runs/x", [object()], 3])
def test_bad_sinks_fail_when_the_callback_is_built(sinks: Any) -> None:
    with pytest.raises(MisconfigurationException, match="sinks"):
        MoEMonitor(sinks=sinks)
