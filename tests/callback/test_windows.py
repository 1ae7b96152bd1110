"""Where training windows close: partial windows at the end of fit, on a second fit, and after a resume."""

from __future__ import annotations

from pathlib import Path

from moe_monitor import CollapseDetector, MoEMonitor
from moe_monitor.detect import CollapseEvent
from moe_monitor.snapshot import Snapshot
from tests.callback.conftest import SEQ_LEN, make_data, make_lm, make_trainer


def test_each_fit_closes_its_own_last_partial_window(tmp_path: Path) -> None:
    lm = make_lm()
    callback = MoEMonitor(log_every_n_steps=2, detector=None)
    for run in ("first", "second"):  # a new Trainer each time: global_step starts again at 0
        make_trainer(tmp_path / run, [callback], max_steps=1, limit_val_batches=0).fit(lm, make_data())
    frame = callback.layer_frame()
    assert frame.step.tolist() == [1, 1, 1, 1]  # one one-step window per fit, two layers each
    assert (frame.tokens == 4 * SEQ_LEN).all()  # one step of 4 samples


class RecordingDetector(CollapseDetector):
    """The default detector, remembering the step of every window it is shown."""

    def __init__(self) -> None:
        super().__init__()
        self.shown: list[int] = []

    def update(self, snapshot: Snapshot) -> list[CollapseEvent]:
        self.shown.append(snapshot.step)
        return super().update(snapshot)


def test_windows_shorter_than_half_the_interval_are_logged_but_not_judged(tmp_path: Path) -> None:
    first = MoEMonitor(log_every_n_steps=4, detector=RecordingDetector())
    trainer = make_trainer(tmp_path, [first], max_steps=3, limit_val_batches=0)
    trainer.fit(make_lm(), make_data())
    trainer.save_checkpoint(tmp_path / "step3.ckpt")
    assert first.detector.shown == [3]  # 3 of 4 steps: judged

    resumed = MoEMonitor(log_every_n_steps=4, detector=RecordingDetector())
    trainer = make_trainer(tmp_path, [resumed], max_steps=9, limit_val_batches=0)
    trainer.fit(make_lm(), make_data(), ckpt_path=tmp_path / "step3.ckpt")
    frame = resumed.layer_frame()
    assert sorted(set(frame.step)) == [3, 4, 8, 9]
    # Step 4 closes a window of one step after the resume, step 9 one of one step at the end of fit.
    assert (frame[frame.step == 4].tokens == 4 * SEQ_LEN).all()
    assert resumed.detector.shown == [8]
