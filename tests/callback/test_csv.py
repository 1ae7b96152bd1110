"""Scalars through CSVLogger, windows per optimizer step, sanity check and padding excluded, frames on disk, and
several monitors on one trainer."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pandas as pd
import pytest
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from moe_monitor import MoEMonitor
from moe_monitor.snapshot import STAT_NAMES
from tests.callback.conftest import SEQ_LEN, make_data, make_lm, make_trainer, masked_loader


def _metrics_rows(logger: CSVLogger) -> pd.DataFrame:
    return pd.read_csv(Path(logger.log_dir) / "metrics.csv")


def test_csv_logger_gets_every_key_with_the_monitor_values(tmp_path: Path) -> None:
    callback = MoEMonitor(log_every_n_steps=2, log_expert_loads=True)
    logger = CSVLogger(tmp_path, name="csv")
    trainer = make_trainer(tmp_path, [callback], logger, max_steps=5, val_check_interval=4, num_sanity_val_steps=2)
    trainer.fit(make_lm(), make_data(batch_size=4))

    frame = callback.layer_frame()
    # Windows close at optimizer steps 2 and 4, a last partial window at 5, one val window after step 4.
    assert sorted(set(zip(frame.step, frame.phase))) == [(2, "train"), (4, "train"), (4, "val"), (5, "train")]
    train = frame[frame.phase == "train"].set_index(["step", "layer_index"])
    assert train.loc[(2, 0), "tokens"] == 2 * 4 * SEQ_LEN
    assert train.loc[(5, 1), "tokens"] == 1 * 4 * SEQ_LEN
    # Only the 2 validation batches of the real validation run, not the 2 of the sanity check.
    val = frame[frame.phase == "val"]
    assert (val.tokens == 2 * 4 * SEQ_LEN).all()

    rows = _metrics_rows(logger)
    for row in frame.itertuples():
        logged = rows[rows.step == row.step]
        for stat in STAT_NAMES:
            key = f"moe/{row.phase}/{stat}/L{row.layer_index:02d}"
            expected = getattr(row, stat)
            if math.isnan(expected):
                assert key not in rows or logged[key].isna().all()
            else:
                assert logged[key].dropna().tolist() == pytest.approx([expected], rel=1e-9), key
    at_4 = frame[(frame.step == 4) & (frame.phase == "train")]
    summary = rows[rows.step == 4]
    assert summary["moe/train/all/min_load_entropy"].dropna().item() == pytest.approx(at_4.load_entropy.min())
    assert summary["moe/train/all/max_max_violation"].dropna().item() == pytest.approx(at_4.max_violation.max())
    assert summary["moe/train/all/layers_with_dead_experts"].dropna().item() == (at_4.dead_experts > 0).sum()
    assert summary["moe/train/all/dropped_fraction"].dropna().item() == 0.0

    experts = callback.expert_frame()
    one = experts[(experts.step == 4) & (experts.phase == "train") & (experts.layer_index == 1) & (experts.expert == 3)]
    assert summary["moe/train/load/L01/E03"].dropna().item() == pytest.approx(one.load.item())

    saved = Path(logger.log_dir) / "moe_monitor"
    # Expert rows are columnar (Parquet parts, read back as one dataset); CSV when pyarrow is missing.
    assert {"layers.csv", "experts.parquet", "events.csv"} <= {p.name for p in saved.iterdir()}
    assert len(pd.read_csv(saved / "layers.csv")) == len(frame)


def test_attention_mask_excludes_padding_in_train_validate_and_test(tmp_path: Path) -> None:
    callback = MoEMonitor(log_every_n_steps=2, detector=None)
    trainer = make_trainer(tmp_path, [callback], max_steps=2, limit_val_batches=None, val_check_interval=2)
    lm = make_lm()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(lm, train_dataloaders=masked_loader(), val_dataloaders=masked_loader(batches=1))
        trainer.validate(lm, masked_loader(batches=2), verbose=False)
        trainer.test(lm, masked_loader(batches=3), verbose=False)
    frame = callback.layer_frame().set_index(["phase", "step", "layer_index"])
    real_tokens = 2 * (SEQ_LEN - 3)  # per batch of 2 samples with 3 padded positions each
    assert frame.loc[("train", 2, 0), "tokens"] == 2 * real_tokens
    assert frame.loc[("val", 2, 0), "tokens"].tolist() == [1 * real_tokens, 2 * real_tokens]
    assert frame.loc[("test", 2, 1), "tokens"] == 3 * real_tokens
    assert all(not r._forward_hooks for r in [b.moe.router for b in lm.model.blocks])


def test_no_logger_warns_and_keeps_the_history(tmp_path: Path) -> None:
    callback = MoEMonitor(log_every_n_steps=1)
    trainer = make_trainer(tmp_path, [callback], logger=False, max_steps=2, limit_val_batches=0)
    with pytest.warns(RuntimeWarning, match="no logger"):
        trainer.fit(make_lm(), make_data())
    assert callback.layer_frame().step.tolist() == [1, 1, 2, 2]
    assert (tmp_path / "moe_runs" / "run_0" / "layers.csv").exists()  # its own folder, never shared


def test_two_named_monitors_keep_their_own_keys_and_files(tmp_path: Path) -> None:
    fast, slow = MoEMonitor(log_every_n_steps=2, name="fast"), MoEMonitor(log_every_n_steps=4, name="slow")
    logger = CSVLogger(tmp_path, name="two")
    trainer = make_trainer(tmp_path, [fast, slow], logger, max_steps=4, limit_val_batches=0)
    trainer.fit(make_lm(), make_data())

    saved = Path(logger.log_dir) / "moe_monitor"
    fast_rows, slow_rows = pd.read_csv(saved / "fast" / "layers.csv"), pd.read_csv(saved / "slow" / "layers.csv")
    assert (fast_rows.step.tolist(), slow_rows.step.tolist()) == ([2, 2, 4, 4], [4, 4])
    # The slow window spans both fast windows: its counts are their sums, expert by expert.
    fast_experts = pd.read_parquet(saved / "fast" / "experts.parquet").groupby(["layer_index", "expert"])["count"].sum()
    slow_experts = pd.read_parquet(saved / "slow" / "experts.parquet").set_index(["layer_index", "expert"])["count"]
    assert fast_experts.tolist() == slow_experts.tolist()
    rows = _metrics_rows(logger)
    assert rows["moe/fast/train/load_entropy/L00"].dropna().tolist() == pytest.approx(
        fast_rows[fast_rows.layer_index == 0].load_entropy.tolist()
    )
    assert rows["moe/slow/train/load_entropy/L00"].dropna().tolist() == pytest.approx(
        slow_rows[slow_rows.layer_index == 0].load_entropy.tolist()
    )
    assert not any(key.startswith("moe/train/") for key in rows.columns)


def test_two_unnamed_monitors_are_refused_at_setup(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, [MoEMonitor(log_every_n_steps=2), MoEMonitor(log_every_n_steps=4)])
    with pytest.raises(MisconfigurationException, match="more than one without a name.*name='fast'"):
        trainer.fit(make_lm(), make_data())
    assert trainer.global_step == 0
