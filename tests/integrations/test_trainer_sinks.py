"""``MoETrainerCallback(sinks=...)`` on real Hugging Face Trainer runs: a user sink, a failing one, a SummaryWriter."""

from __future__ import annotations

import warnings
from pathlib import Path

import pandas as pd
import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from torch.utils.tensorboard import SummaryWriter  # noqa: E402
from transformers import Trainer  # noqa: E402

from moe_monitor import CollapseDetector  # noqa: E402
from moe_monitor.integrations.transformers import MoETrainerCallback  # noqa: E402
from tests.integrations.hf_toys import PaddedTokens, expert_counts, tiny_model, training_args  # noqa: E402
from tests.integrations.tb_read import accumulate, expert_load, main_run  # noqa: E402
from tests.sinks.user_sinks import Broken, Recorder  # noqa: E402


def test_user_sink_and_summary_writer_get_every_window_and_event(tmp_path: Path) -> None:
    # lr=0 keeps the routers fixed, so the counts can be recounted afterwards from the model's own router logits.
    recorder, writer = Recorder(), SummaryWriter(log_dir=str(tmp_path / "tb"))
    callback = MoETrainerCallback(
        sinks=[recorder, writer], detector=CollapseDetector(patience=1, min_load_entropy=0.999), console=False
    )
    model, train = tiny_model("mixtral"), PaddedTokens(16)
    args = training_args(tmp_path / "out", learning_rate=0.0, max_steps=8, report_to=["tensorboard"])
    Trainer(model=model, args=args, train_dataset=train, callbacks=[callback]).train()
    writer.close()

    files = tmp_path / "out" / "moe_monitor"
    layers = pd.read_csv(files / "layers.csv")
    assert sorted(recorder.windows) == sorted(
        zip(layers.step, layers.phase, layers.layer, layers.tokens, layers.assignments)
    )
    # 8 steps of 2 samples are the 16 samples once: the windows' tokens add up to the dataset's real tokens.
    assert sum(w[3] for w in recorder.windows if w[2] == layers.layer[0]) == train.real_tokens()
    saved = pd.read_csv(files / "events.csv")
    assert len(saved) >= 2 and recorder.events == list(zip(saved.step, saved.layer, saved.rule, saved.kind))
    assert recorder.finished

    events = accumulate(main_run(tmp_path / "tb"))
    recount_LE = expert_counts(model, train)
    for layer in range(2):
        windows = expert_load(events, f"moe/train/expert_load/L{layer:02d}")
        assert [step for step, _ in windows] == [2, 4, 6, 8]
        assert [sum(col) for col in zip(*(counts for _, counts in windows))] == recount_LE[layer].tolist()
    # `sinks=` replaces the dashboards of `report_to`: the Trainer's own TensorBoard run has its loss, no routing.
    own = accumulate(main_run(tmp_path / "out")).Tags()["scalars"]
    assert "train/loss" in own and not [tag for tag in own if tag.startswith("moe/")]


def test_a_failing_user_sink_warns_once_and_training_goes_on(tmp_path: Path) -> None:
    broken, recorder = Broken(), Recorder()
    callback = MoETrainerCallback(sinks=[broken, recorder], console=False)
    trainer = Trainer(
        model=tiny_model("qwen3_moe"), args=training_args(tmp_path, max_steps=6), train_dataset=PaddedTokens(16),
        callbacks=[callback],
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert trainer.state.global_step == 6
    about = [w for w in caught if "broken sink" in str(w.message)]
    assert len(about) == 1 and "disk full" in str(about[0].message)
    assert broken.calls == 3
    assert sorted({w[0] for w in recorder.windows}) == [2, 4, 6]


def test_bad_sinks_fail_when_the_callback_is_built() -> None:
    with pytest.raises(ValueError, match="which no sink knows"):
        MoETrainerCallback(sinks=[object()])
