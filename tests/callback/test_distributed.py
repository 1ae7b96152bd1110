"""Two CPU processes (gloo): windows reduced over both, rank zero alone writes, both stop at the same step."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from lightning.pytorch.loggers import CSVLogger

from moe_monitor import CollapseDetector, MoEMonitor
from tests.callback.conftest import SEQ_LEN, make_data, make_lm, make_trainer


@pytest.mark.slow
def test_ddp_windows_cover_both_processes_and_every_rank_stops_together(tmp_path: Path) -> None:
    # The critical alert at the first window must stop both processes, or the next collective would hang.
    callback = MoEMonitor(
        log_every_n_steps=2, detector=CollapseDetector(min_load_entropy=0.9999, patience=1), stop_on_collapse=True
    )
    logger = CSVLogger(tmp_path, name="ddp", version=0)  # a fixed version: the parent process reads it back
    trainer = make_trainer(
        tmp_path, [callback], logger, max_steps=6, strategy="ddp_spawn", devices=2, limit_val_batches=0
    )
    trainer.fit(make_lm(), make_data(batch_size=2))

    layers = pd.read_csv(Path(logger.log_dir) / "moe_monitor" / "layers.csv")
    assert layers.step.tolist() == [2, 2]  # stopped after the first window
    assert (layers.tokens == 2 * 2 * SEQ_LEN * 2).all()  # 2 steps x batch 2 x S tokens x 2 processes
    rows = pd.read_csv(Path(logger.log_dir) / "metrics.csv")
    assert rows["moe/train/load_entropy/L00"].dropna().tolist() == pytest.approx(
        layers[layers.layer_index == 0].load_entropy.tolist()
    )
    events = pd.read_csv(Path(logger.log_dir) / "moe_monitor" / "events.csv")
    assert "load_entropy" in set(events.rule)
