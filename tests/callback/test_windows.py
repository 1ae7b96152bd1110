"""Where training windows close: partial windows at the end of fit, on a second fit, and after a resume."""

from __future__ import annotations

from pathlib import Path

from moe_monitor import MoEMonitor
from tests.callback.conftest import SEQ_LEN, make_data, make_lm, make_trainer


def test_each_fit_closes_its_own_last_partial_window(tmp_path: Path) -> None:
    lm = make_lm()
    callback = MoEMonitor(log_every_n_steps=2, detector=None)
    for run in ("first", "second"):  # a new Trainer each time: global_step starts again at 0
        make_trainer(tmp_path / run, [callback], max_steps=1, limit_val_batches=0).fit(lm, make_data())
    frame = callback.layer_frame()
    assert frame.step.tolist() == [1, 1, 1, 1]  # one one-step window per fit, two layers each
    assert (frame.tokens == 4 * SEQ_LEN).all()  # one step of 4 samples
