"""Faults: bad arguments, no routers, a crash mid-fit, a logger that raises; and gradient accumulation."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pandas as pd
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from moe_monitor import MoEMonitor, NoRoutersFoundError
from tests.callback.conftest import SEQ_LEN, LMWithTestStep, make_data, make_lm, make_trainer, routers_of


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"log_every_n_steps": 0}, "positive integer or None"),
        ({"log_every_n_steps": 2.5}, "positive integer or None"),
        ({"log_every_n_steps": True}, "positive integer or None"),
        ({"log_histograms": "yes"}, "choose True or False"),
        ({"stop_on_collapse": 1}, "choose True or False"),
        ({"detector": "strict"}, "'default', None"),
        ({"controllers": [object()]}, "lacks setup, on_train_step"),
        ({"on_alert": "print"}, "None or a callable"),
        ({"routers": "blocks.0.moe.router"}, "list of module names"),
    ],
)
def test_bad_arguments_name_what_is_allowed(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(MisconfigurationException, match=match):
        MoEMonitor(**kwargs)


class NoRouters(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 4)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.layer(batch[0]).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_model_without_routers_fails_at_setup(tmp_path: Path) -> None:
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 4)), batch_size=4)
    trainer = make_trainer(tmp_path, [MoEMonitor()])
    with pytest.raises(NoRoutersFoundError) as caught:
        trainer.fit(NoRouters(), loader)
    assert trainer.global_step == 0
    message = str(caught.value)
    assert "Searched for" in message  # what RouterMonitor says is kept ...
    # ... and the callback tells how to register routers with itself, named from the LightningModule.
    assert "MoEMonitor(routers=[" in message and "relative to the LightningModule" in message
    assert "'model.blocks.0.moe.router'" in message and message.count("MoEMonitor(routers=") == 1
    assert isinstance(caught.value.__cause__, NoRoutersFoundError)


class CrashingLM(LMWithTestStep):
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if batch_idx == 3:
            raise RuntimeError("boom")
        return super().training_step(batch, batch_idx)


def test_exception_mid_fit_leaves_no_hook(tmp_path: Path) -> None:
    pl.seed_everything(0, verbose=False)
    lm = CrashingLM(make_lm().config, warmup_steps=1)
    callback = MoEMonitor(log_every_n_steps=1)
    trainer = make_trainer(tmp_path, [callback], max_steps=10)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(lm, make_data())
    assert all(not router._forward_hooks for router in routers_of(lm))
    assert sorted(set(callback.layer_frame().step)) == [1, 2, 3]  # the history survives the crash ...
    on_disk = pd.read_csv(tmp_path / "moe_runs" / "run_0" / "layers.csv")  # ... and its files
    assert on_disk.step.tolist() == [1, 1, 2, 2, 3, 3]
    assert (on_disk.tokens == 4 * SEQ_LEN).all()


class InterruptedLM(LMWithTestStep):
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if batch_idx == 4:
            raise KeyboardInterrupt  # what Ctrl-C raises in the training loop
        return super().training_step(batch, batch_idx)


def test_ctrl_c_keeps_the_finished_windows_on_disk(tmp_path: Path) -> None:
    pl.seed_everything(0, verbose=False)
    lm = InterruptedLM(make_lm().config, warmup_steps=1)
    trainer = make_trainer(tmp_path, [MoEMonitor(log_every_n_steps=2)], max_steps=10)
    with pytest.raises((KeyboardInterrupt, SystemExit)):  # Lightning turns the interrupt into an exit
        trainer.fit(lm, make_data())
    on_disk = pd.read_csv(tmp_path / "moe_runs" / "run_0" / "layers.csv")  # a logger-less run's own folder
    assert on_disk.step.tolist() == [2, 2, 4, 4]
    events = pd.read_csv(tmp_path / "moe_runs" / "run_0" / "events.csv")  # the header at least, even with no event
    assert "rule" in events.columns
    assert all(not router._forward_hooks for router in routers_of(lm))


class DiskFullCSVLogger(CSVLogger):
    """A real CSV logger whose disk fills up as soon as the monitor writes to it."""

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if any(key.startswith("moe/") for key in metrics):
            raise OSError(28, "No space left on device")
        super().log_metrics(metrics, step)


def test_a_failing_logger_warns_once_and_the_others_still_get_data(tmp_path: Path) -> None:
    callback = MoEMonitor(log_every_n_steps=1)
    healthy = CSVLogger(tmp_path, name="healthy")
    trainer = make_trainer(tmp_path, [callback], [DiskFullCSVLogger(tmp_path, name="full"), healthy], max_steps=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(make_lm(), make_data())
    ours = [w for w in caught if "No space left" in str(w.message)]
    assert len(ours) == 1 and "DiskFullCSVLogger" in str(ours[0].message)
    assert trainer.global_step == 4
    assert sorted(set(callback.layer_frame().step)) == [1, 2, 3, 4]
    rows = pd.read_csv(Path(healthy.log_dir) / "metrics.csv")
    assert rows["moe/train/load_entropy/L01"].notna().sum() == 4


def test_gradient_accumulation_counts_like_the_large_batch(tmp_path: Path) -> None:
    # lr=0 keeps the weights identical, so both runs route the same tokens the same way at every step.
    runs = {}
    for name, batch_size, accumulate in (("accumulated", 2, 2), ("large_batch", 4, 1)):
        callback = MoEMonitor(log_every_n_steps=2, detector=None)
        trainer = make_trainer(tmp_path / name, [callback], max_steps=4, accumulate_grad_batches=accumulate)
        trainer.fit(make_lm(lr=0.0), make_data(batch_size=batch_size))
        assert trainer.global_step == 4
        runs[name] = callback.expert_frame()
    accumulated, large_batch = runs["accumulated"], runs["large_batch"]
    assert sorted(set(accumulated.step)) == [2, 4]
    assert accumulated["count"].tolist() == large_batch["count"].tolist()
    per_window = accumulated.groupby(["step", "layer_index"])["count"].sum()
    assert (per_window == 2 * 4 * SEQ_LEN * 2).all()  # 2 optimizer steps x 4 samples x S tokens x top-2


class LazyLM(LMWithTestStep):
    """Builds its transformer in ``configure_model``, which Lightning calls after the callbacks' ``setup``."""

    def __init__(self, config: Any) -> None:
        super().__init__(config, warmup_steps=1)
        del self.model

    def configure_model(self) -> None:
        if not hasattr(self, "model"):
            from moe_monitor.reference import MoETransformer

            self.model = MoETransformer(self.config)


def test_routers_built_in_configure_model_are_found_when_fit_starts(tmp_path: Path) -> None:
    lm = LazyLM(make_lm().config)
    callback = MoEMonitor(log_every_n_steps=2, detector=None)
    trainer = make_trainer(tmp_path, [callback], max_steps=2, limit_val_batches=0)
    trainer.fit(lm, make_data())
    assert callback.layer_frame().step.tolist() == [2, 2]
    assert all(not router._forward_hooks for router in routers_of(lm))
