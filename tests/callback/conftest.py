"""Tiny real training runs shared by the callback tests (CPU, a few steps, no progress bar)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from moe_monitor.reference import CorpusDataModule, MoEConfig, ReferenceLM

TINY = dict(d_model=16, n_layers=2, n_heads=2, seq_len=8, n_experts=4, top_k=2, d_expert=16)
SEQ_LEN = TINY["seq_len"]


@pytest.fixture(autouse=True)
def _offline_wandb(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    torch.set_num_threads(1)


class LMWithTestStep(ReferenceLM):
    """The reference module with a test loop (it reuses the validation step)."""

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)


def make_lm(seed: int = 0, lr: float = 3e-3, **overrides: Any) -> LMWithTestStep:
    pl.seed_everything(seed, verbose=False)
    return LMWithTestStep(MoEConfig(**{**TINY, **overrides}), lr=lr, warmup_steps=1, max_steps=100)


def make_data(batch_size: int = 4, train_samples: int = 256) -> CorpusDataModule:
    return CorpusDataModule(seq_len=SEQ_LEN, batch_size=batch_size, train_samples=train_samples, val_per_domain=4)


def make_trainer(root: Any, callbacks: Sequence[pl.Callback], logger: Any = False, **kwargs: Any) -> pl.Trainer:
    options = dict(
        max_steps=4,
        limit_val_batches=2,
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        default_root_dir=os.fspath(root),
        log_every_n_steps=2,
    )
    options.update(kwargs)
    return pl.Trainer(callbacks=list(callbacks), logger=logger, **options)


class DestroyProcessGroup(pl.Callback):
    """Ends a spawned worker's gloo process group at teardown.

    Lightning's ``ddp_spawn`` leaves it to interpreter exit, where the group's threads sometimes abort the worker
    ("terminate called without an active exception", SIGABRT): about one run in five here, with or without the
    monitor. Put it after the callbacks under test: callbacks tear down in list order.
    """

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


def fit_two_ranks(tmp_path: Any, lm: pl.LightningModule, callback: pl.Callback, name: str) -> str:
    """Fits ``lm`` 4 steps on 2 spawned CPU processes, validating every 2 steps on the loaders each rank's ``lm``
    gives (no distributed sampler), trained on masked batches; returns the CSV logger's ``log_dir``."""
    from datetime import timedelta

    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.strategies import DDPStrategy

    logger = CSVLogger(tmp_path, name=name, version=0)  # a fixed version: the parent process reads it back
    trainer = make_trainer(
        tmp_path,
        [callback, DestroyProcessGroup()],
        logger,
        max_steps=4,
        strategy=DDPStrategy(start_method="spawn", timeout=timedelta(seconds=60)),
        devices=2,
        limit_val_batches=None,
        val_check_interval=2,
        use_distributed_sampler=False,
    )
    trainer.fit(lm, train_dataloaders=masked_loader(batches=8))
    return logger.log_dir


def masked_loader(batch_size: int = 2, batches: int = 4, pad: int = 3) -> DataLoader:
    """Dict batches with an ``attention_mask`` whose last ``pad`` positions of every sample are padding."""
    generator = torch.Generator().manual_seed(0)
    samples = []
    for _ in range(batch_size * batches):
        ids = torch.randint(0, 256, (SEQ_LEN,), generator=generator)
        mask = torch.ones(SEQ_LEN, dtype=torch.long)
        mask[SEQ_LEN - pad :] = 0
        samples.append({"input_ids": ids, "labels": ids.roll(-1), "attention_mask": mask})
    return DataLoader(samples, batch_size=batch_size)


def routers_of(lm: ReferenceLM) -> list[torch.nn.Module]:
    return [block.moe.router for block in lm.model.blocks]
