"""ReferenceLM: loss falls on the corpus; optimiser, schedule, logged metrics and checkpoint round trip."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from seeds import seed

from moe_monitor.reference import CorpusDataModule, MoEConfig, ReferenceLM
from moe_monitor.reference.lightning_module import warmup_cosine


@pytest.mark.slow
def test_fifty_steps_reduce_the_loss(make_config):
    torch.manual_seed(seed(0))
    config = make_config(d_model=32, n_heads=2, seq_len=32, d_expert=32, capacity_factor=1.25)
    lm = ReferenceLM(config, lr=1e-2, warmup_steps=5, max_steps=50)
    dm = CorpusDataModule(seq_len=32, batch_size=8, seed=seed(0), train_samples=400)
    dm.setup()
    optimizer = lm.configure_optimizers()["optimizer"]
    losses = []
    for step, batch in enumerate(dm.train_dataloader()):
        if step == 50:
            break
        loss = lm.compute_losses(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    print(f"MARGIN fifty_steps first={first:.3f} last={last:.3f} drop={first - last:.3f} (asked > 1.5)")
    assert first > 5.0  # about ln 256 = 5.55 at initialisation
    assert last < first - 1.5, (first, last)


def test_trainer_logs_the_documented_metrics(make_config, tmp_path):
    config = make_config(seq_len=16)
    lm = ReferenceLM(config, lr=1e-3, warmup_steps=1, max_steps=3)
    dm = CorpusDataModule(seq_len=16, batch_size=2, seed=0, train_samples=6, val_per_domain=1)
    trainer = pl.Trainer(
        max_steps=3,
        max_epochs=1,
        logger=pl.loggers.CSVLogger(tmp_path),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=1,
        num_sanity_val_steps=0,
    )
    trainer.fit(lm, datamodule=dm)
    metrics = trainer.callback_metrics
    for name in ("train/loss", "train/ce_loss", "train/aux_loss", "train/z_loss", "val/loss"):
        assert torch.isfinite(metrics[name]), name
    torch.testing.assert_close(
        metrics["train/loss"], metrics["train/ce_loss"] + metrics["train/aux_loss"] + metrics["train/z_loss"]
    )
    assert trainer.lr_scheduler_configs[0].interval == "step"


def test_hyperparameters_rebuild_the_module(make_config, tmp_path):
    config = make_config(router="expert_choice", capacity_factor=2.0)
    lm = ReferenceLM(config, lr=5e-4, warmup_steps=7, max_steps=70, weight_decay=0.05)
    assert lm.hparams.config == config.to_dict() and lm.hparams.lr == 5e-4
    path = tmp_path / "lm.ckpt"
    torch.save(
        {
            "state_dict": lm.state_dict(),
            "hyper_parameters": dict(lm.hparams),
            "pytorch-lightning_version": pl.__version__,
        },
        path,
    )
    loaded = ReferenceLM.load_from_checkpoint(path)
    assert loaded.config == config and loaded.hparams.warmup_steps == 7
    tokens = torch.randint(0, 256, (1, 8))
    torch.testing.assert_close(loaded.eval()(tokens).logits, lm.eval()(tokens).logits)


def test_weight_decay_skips_vectors(make_config):
    lm = ReferenceLM(make_config(), weight_decay=0.1)
    decay, no_decay = lm.configure_optimizers()["optimizer"].param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() >= 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(lm.parameters()))


def test_warmup_then_cosine():
    assert warmup_cosine(0, 4, 104) == pytest.approx(0.25)
    assert warmup_cosine(3, 4, 104) == pytest.approx(1.0)
    assert warmup_cosine(54, 4, 104) == pytest.approx(0.1 + 0.9 * 0.5)
    assert warmup_cosine(104, 4, 104) == pytest.approx(0.1)
    assert isinstance(MoEConfig(), MoEConfig)
