"""Checkpoint save -> resume continues the history, the detector, the controllers and the step numbering."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from moe_monitor import AuxLossController, CollapseDetector, MoEMonitor
from tests.callback.conftest import make_data, make_lm, make_trainer, masked_loader


def _callbacks() -> tuple[MoEMonitor, MoEMonitor]:
    # Thresholds no real router meets: every window alerts and the controller doubles the coefficient.
    detector = CollapseDetector(min_load_entropy=0.9999, patience=1)
    watching = MoEMonitor(log_every_n_steps=2, detector=detector, controllers=[AuxLossController(max_coef=1.0)])
    second = MoEMonitor(log_every_n_steps=3, detector=None, name="slow")
    return watching, second


def test_two_instances_share_a_checkpoint_and_resume_where_they_stopped(tmp_path: Path) -> None:
    watching, second = _callbacks()
    assert watching.state_key != second.state_key
    lm = make_lm()
    trainer = make_trainer(tmp_path, [watching, second], max_steps=4, limit_val_batches=0)
    trainer.fit(lm, make_data())
    # Read now: the history lives in files beside the run, which the resumed run goes on writing.
    before = watching.layer_frame()
    path = tmp_path / "step4.ckpt"
    trainer.save_checkpoint(path)
    coef_at_4 = lm.model.blocks[0].moe.router.aux_loss_coef
    assert coef_at_4 == 0.01 * 2 * 2  # doubled at the windows of steps 2 and 4

    checkpoint = torch.load(path, weights_only=True)  # plain types only
    assert {watching.state_key, second.state_key} <= set(checkpoint["callbacks"])

    watching2, second2 = _callbacks()
    lm2 = make_lm(seed=1)
    assert lm2.model.blocks[0].moe.router.aux_loss_coef == 0.01
    trainer2 = make_trainer(tmp_path, [watching2, second2], max_steps=8, limit_val_batches=0)
    trainer2.fit(lm2, make_data(), ckpt_path=path)

    frame = watching2.layer_frame()
    assert sorted(set(frame.step)) == [2, 4, 6, 8]
    # Windows of the first run are carried over unchanged.
    assert frame[frame.step <= 4].reset_index(drop=True).equals(before.reset_index(drop=True))
    assert sorted(set(second2.layer_frame().step)) == [3, 4, 6, 8]  # 4 and 8: the partial windows at the end
    # The detector remembers alerts of the first run (an alert stays active: no second alert at step 6) ...
    events = watching2.event_frame()
    alerts = events[(events.kind == "alert") & (events.rule == "load_entropy")]
    assert sorted(set(alerts.step)) == [2]
    # ... and the controller carried on from the restored coefficient: 0.04 -> 0.08 -> 0.16.
    assert lm2.model.blocks[0].moe.router.aux_loss_coef == coef_at_4 * 4
    control = events[events.kind == "control"]
    assert sorted(set(control.step)) == [2, 4, 6, 8]
    assert all(not r._forward_hooks for r in [b.moe.router for b in lm2.model.blocks])


@pytest.mark.parametrize("evaluate", ["test", "validate"])
def test_evaluating_a_checkpoint_keeps_the_current_history_and_state(tmp_path: Path, evaluate: str) -> None:
    watching, _ = _callbacks()
    lm = make_lm()
    saver = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=2, save_top_k=-1)
    trainer = make_trainer(tmp_path, [watching, saver], max_steps=6, limit_val_batches=2, enable_checkpointing=True)
    trainer.fit(lm, make_data())
    assert watching.layer_frame().step.tolist() == [2, 2, 4, 4, 6, 6]
    events_after_fit = watching.event_frame()
    coef_at_6 = lm.model.blocks[0].moe.router.aux_loss_coef
    assert coef_at_6 == 0.01 * 2**3  # doubled at the windows of steps 2, 4 and 6

    # Lightning restores the callbacks' state for evaluation too; the monitor must not rewind to step 2.
    getattr(trainer, evaluate)(lm, masked_loader(), ckpt_path=tmp_path / "step=2.ckpt", verbose=False)
    frame = watching.layer_frame()
    phase = "test" if evaluate == "test" else "val"
    windows = [(2, "train"), (4, "train"), (6, "train"), (6, phase)]
    assert list(zip(frame.step, frame.phase)) == [window for window in windows for _ in range(2)]  # two layers
    assert watching.event_frame().equals(events_after_fit)

    # A later fit carries on from the controller's current coefficient, not from the step-2 checkpoint's.
    make_trainer(tmp_path / "again", [watching], max_steps=2, limit_val_batches=0).fit(lm, make_data())
    assert lm.model.blocks[0].moe.router.aux_loss_coef == coef_at_6 * 2


def test_a_checkpoint_of_another_state_version_fails_with_what_to_do(tmp_path: Path) -> None:
    watching, _ = _callbacks()
    lm = make_lm()
    trainer = make_trainer(tmp_path, [watching], max_steps=2, limit_val_batches=0)
    trainer.fit(lm, make_data())
    path = tmp_path / "step2.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    state = checkpoint["callbacks"][watching.state_key]
    assert state["version"] == 1 and set(state) == {"version", "monitor", "detector", "controllers", "events"}

    checkpoint["callbacks"][watching.state_key] = {**state, "version": 2}
    torch.save(checkpoint, tmp_path / "future.ckpt")
    again, _ = _callbacks()
    trainer = make_trainer(tmp_path, [again], max_steps=4, limit_val_batches=0)
    failing = make_lm()
    with pytest.raises(ValueError, match=r"version 2 in the checkpoint.*reads version 1.*name"):
        trainer.fit(failing, make_data(), ckpt_path=tmp_path / "future.ckpt")
    assert all(not r._forward_hooks for r in [b.moe.router for b in failing.model.blocks])
