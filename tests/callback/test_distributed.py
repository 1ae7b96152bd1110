"""Two CPU processes (gloo): windows reduced over both, rank zero alone writes, both stop at the same step, and a
rank with no validation batch leaves no other rank waiting."""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import lightning.pytorch as pl
import pandas as pd
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from moe_monitor import CollapseDetector, MoEMonitor
from tests.callback.conftest import (
    SEQ_LEN,
    DestroyProcessGroup,
    LMWithTestStep,
    fit_two_ranks,
    make_data,
    make_lm,
    make_trainer,
    masked_loader,
    routers_of,
)
from tests.ports import free_port


@pytest.mark.slow
def test_ddp_windows_cover_both_processes_and_every_rank_stops_together(tmp_path: Path) -> None:
    # The critical alert at the first window must stop both processes, or the next collective would hang.
    callback = MoEMonitor(
        log_every_n_steps=2, detector=CollapseDetector(min_load_entropy=0.9999, patience=1), stop_on_collapse=True
    )
    logger = CSVLogger(tmp_path, name="ddp", version=0)  # a fixed version: the parent process reads it back
    trainer = make_trainer(
        tmp_path,
        [callback, DestroyProcessGroup()],
        logger,
        max_steps=6,
        strategy="ddp_spawn",
        devices=2,
        limit_val_batches=0,
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


@pytest.mark.slow
def test_a_broken_process_group_raises_instead_of_leaving_the_other_ranks_waiting(tmp_path: Path) -> None:
    url = f"tcp://127.0.0.1:{free_port()}"
    # Rank 1 joins the group and exits at once: the group is broken, as when a worker crashes.
    peer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import torch.distributed as d; d.init_process_group('gloo', init_method='{url}', rank=1, world_size=2)",
        ]
    )
    dist.init_process_group("gloo", init_method=url, rank=0, world_size=2, timeout=timedelta(seconds=30))
    try:
        assert peer.wait(timeout=60) == 0
        lm = make_lm()
        callback = MoEMonitor(log_every_n_steps=1, detector=None)
        trainer = make_trainer(tmp_path, [callback], max_steps=3, limit_val_batches=0)
        with pytest.raises(RuntimeError, match="[Cc]onnection|[Pp]eer"):
            trainer.fit(lm, make_data())  # the processes' exchange of their router lists at setup fails
        assert trainer.global_step == 0
        assert all(not router._forward_hooks for router in routers_of(lm))
    finally:
        dist.destroy_process_group()


class UnevenValidationLM(LMWithTestStep):
    """Rank 0 validates on 2 batches, rank 1 on none (Lightning skips its whole validation loop and hooks).

    Its validation step logs nothing across processes, so the monitor's window is the only collective in question.
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.allow_zero_length_dataloader_with_multiple_devices = True

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.model(batch["input_ids"])

    def val_dataloader(self) -> DataLoader:
        return masked_loader(batches=2 if self.global_rank == 0 else 0)


@pytest.mark.slow
def test_a_rank_without_validation_batches_does_not_hang_the_others(tmp_path: Path) -> None:
    pl.seed_everything(0, verbose=False)
    lm = UnevenValidationLM(make_lm().config, warmup_steps=1)
    callback = MoEMonitor(log_every_n_steps=2, detector=None)
    log_dir = fit_two_ranks(tmp_path, lm, callback, "uneven")

    layers = pd.read_csv(Path(log_dir) / "moe_monitor" / "layers.csv")
    windows = sorted(set(zip(layers.step, layers.phase)))
    assert windows == [(2, "train"), (2, "val"), (4, "train"), (4, "val")]
    real_tokens = 2 * (SEQ_LEN - 3)  # per batch of 2 samples with 3 padded positions each
    assert (layers[layers.phase == "val"].tokens == 2 * real_tokens).all()  # rank 0's two batches, rank 1's none
    assert (layers[layers.phase == "train"].tokens == 2 * 2 * real_tokens).all()  # 2 steps x 2 processes
    rows = pd.read_csv(Path(log_dir) / "metrics.csv")
    assert rows.dropna(subset=["moe/val/load_entropy/L00"]).step.tolist() == [2, 4]
