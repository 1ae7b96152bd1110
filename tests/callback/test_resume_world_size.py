"""A checkpoint of a 2-process (gloo) run resumes in a 1-process run: the history and the knobs carry on."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint

from moe_monitor import AuxLossController, CollapseDetector, MoEMonitor
from tests.callback.conftest import SEQ_LEN, TINY, DestroyProcessGroup, make_data, make_lm, make_trainer

BATCH = 2


def _watching() -> MoEMonitor:
    # A threshold no real router meets: every window alerts and the controller doubles the coefficient.
    detector = CollapseDetector(min_load_entropy=0.9999, patience=1)
    return MoEMonitor(log_every_n_steps=2, detector=detector, controllers=[AuxLossController(max_coef=1.0)])


class KnobRecorder(pl.Callback):
    """Writes each layer's aux-loss coefficient, per rank, when a checkpoint is saved and when training starts."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _write(self, trainer: pl.Trainer, pl_module: pl.LightningModule, when: str) -> None:
        coefs = [block.moe.router.aux_loss_coef for block in pl_module.model.blocks]
        (self.path / f"{when}-rank{trainer.global_rank}.json").write_text(json.dumps(coefs))

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self._write(trainer, pl_module, f"saved{trainer.global_step}")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not (self.path / "start-rank0.json").exists():
            self._write(trainer, pl_module, "start")


@pytest.mark.slow
def test_a_two_process_checkpoint_resumes_in_one_process_with_the_same_history_and_knobs(tmp_path: Path) -> None:
    first, second = tmp_path / "two", tmp_path / "one"
    first.mkdir(), second.mkdir()
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}", every_n_train_steps=4, save_top_k=-1)
    trainer = make_trainer(
        tmp_path,
        [_watching(), KnobRecorder(first), DestroyProcessGroup(), checkpoints],
        max_steps=4,
        strategy="ddp_spawn",
        devices=2,
        limit_val_batches=0,
        enable_checkpointing=True,
    )
    trainer.fit(make_lm(), make_data(batch_size=BATCH))
    path = tmp_path / "ckpt" / "step=4.ckpt"
    saved = {rank: json.loads((first / f"saved4-rank{rank}.json").read_text()) for rank in (0, 1)}
    assert saved[0] == saved[1] == [0.01 * 2 * 2] * TINY["n_layers"]  # doubled at the windows of steps 2 and 4

    watching = _watching()
    lm = make_lm(seed=1)
    resumed = make_trainer(tmp_path, [watching, KnobRecorder(second)], max_steps=8, limit_val_batches=0)
    resumed.fit(lm, make_data(batch_size=BATCH), ckpt_path=path)

    # The 2-process run's knob values, restored before the first resumed step ...
    assert json.loads((second / "start-rank0.json").read_text()) == saved[0]
    # ... and carried on: doubled at the windows of steps 6 and 8.
    assert [block.moe.router.aux_loss_coef for block in lm.model.blocks] == [c * 4 for c in saved[0]]
    frame = watching.layer_frame()
    per_step = frame.groupby("step").size()
    assert per_step.index.tolist() == [2, 4, 6, 8]  # no gap
    assert (per_step == TINY["n_layers"]).all()  # no duplicate
    window = 2 * BATCH * SEQ_LEN  # tokens of one window of one process: 2 steps x batch x sequence
    tokens = frame.groupby("step").tokens.first().tolist()
    assert tokens == [2 * window, 2 * window, window, window]  # two processes, then one
    assert (frame.assignments == frame.tokens * TINY["top_k"]).all()
