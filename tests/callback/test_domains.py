"""Per-domain validation windows (``MoEMonitor(val_domains=...)``): real fits, counts against the routers' output."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning.pytorch as pl
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader, Subset

from moe_monitor import MoEMonitor
from moe_monitor.reference import CorpusDataModule
from moe_monitor.reference.data import DOMAINS
from moe_monitor.report import write_report
from tests.callback.conftest import (
    SEQ_LEN,
    LMWithTestStep,
    fit_two_ranks,
    make_lm,
    make_trainer,
    routers_of,
)

VAL_PER_DOMAIN = 6  # batches of 4 and 2 per domain


class DomainLog(pl.Callback):
    """Every validation forward's selected experts per (validation run, domain, router), split by the batch's
    ``domain`` key, read from the routers' own output."""

    def __init__(self, routers: list[torch.nn.Module]) -> None:
        self.runs: list[dict[str, list[torch.Tensor]]] = []
        self.domain: str | None = None
        self.n_experts = routers[0].n_experts
        self.handles = [router.register_forward_hook(self._hook(i)) for i, router in enumerate(routers)]

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.runs.append({})

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        domains = set(batch["domain"].tolist())
        assert len(domains) == 1, "a validation batch mixes domains"
        self.domain = DOMAINS[domains.pop()]

    def _hook(self, index: int):
        def hook(module, args, output):
            if module.training or not self.runs:
                return
            counts = self.runs[-1].setdefault(self.domain, [torch.zeros(self.n_experts, dtype=torch.int64)] * 2)
            counts[index] = counts[index] + torch.bincount(output.expert_idx_A.flatten(), minlength=self.n_experts)

        return hook


def _data(**kwargs) -> CorpusDataModule:
    return CorpusDataModule(seq_len=SEQ_LEN, batch_size=4, train_samples=64, val_per_domain=VAL_PER_DOMAIN, **kwargs)


def _fit(tmp_path, callback: MoEMonitor, data: CorpusDataModule) -> tuple[pl.Trainer, DomainLog, torch.nn.Module]:
    lm = make_lm(seed=3)
    log = DomainLog(routers_of(lm))
    trainer = make_trainer(
        tmp_path, [callback, log], max_steps=4, val_check_interval=2, limit_val_batches=None, num_sanity_val_steps=1
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*no logger.*")
        trainer.fit(lm, datamodule=data)
    return trainer, log, lm


def _counts(frame, phase: str, step: int, layer: int) -> list[int]:
    rows = frame[(frame.phase == phase) & (frame.step == step) & (frame.layer_index == layer)]
    return rows.sort_values("expert")["count"].astype(int).tolist()


def test_each_domain_window_counts_its_own_batches_and_val_still_counts_them_all(tmp_path):
    callback = MoEMonitor(log_every_n_steps=2, val_domains=DOMAINS)
    trainer, log, lm = _fit(tmp_path, callback, _data(val_loader_per_domain=True))

    layers = callback.layer_frame()
    assert sorted(set(layers.phase)) == ["train", "val", "val/english", "val/python"]
    frame = callback.expert_frame()
    assert len(log.runs) == 2  # validations at steps 2 and 4; the sanity check counts nowhere
    for step, run in zip((2, 4), log.runs):
        assert sorted(run) == list(DOMAINS)
        for layer in (0, 1):
            for domain in DOMAINS:
                assert _counts(frame, f"val/{domain}", step, layer) == run[domain][layer].tolist()
            assert _counts(frame, "val", step, layer) == sum(run[d][layer] for d in DOMAINS).tolist()
    tokens = layers[(layers.phase == "val/python") & (layers.layer_index == 0)].tokens.tolist()
    assert tokens == [VAL_PER_DOMAIN * SEQ_LEN] * 2

    # val/loss: one token-weighted cross-entropy over both loaders (the last validation ran on the final weights).
    lm.eval()
    losses, tokens = [], 0
    with torch.no_grad():
        for loader in trainer.datamodule.val_dataloader():
            for batch in loader:
                logits = lm.model(batch["input_ids"]).logits
                losses.append(F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="sum"))
                tokens += batch["labels"].numel()
    assert float(trainer.callback_metrics["val/loss"]) == pytest.approx(float(sum(losses)) / tokens, rel=1e-5)

    # The report of this run folder shows which experts serve which domain.
    html = write_report(trainer.default_root_dir + "/moe_runs/run_0").read_text()
    section = html[html.index("Expert use per domain") :]
    assert "no per-domain validation windows" not in html
    assert "expert load per domain" in section
    for domain in DOMAINS:
        assert f"{domain}: experts" in section


def test_without_val_domains_the_per_domain_loaders_count_to_val_only(tmp_path):
    callback = MoEMonitor(log_every_n_steps=2)
    _, log, _ = _fit(tmp_path, callback, _data(val_loader_per_domain=True))
    frame = callback.expert_frame()
    assert sorted(set(frame.phase)) == ["train", "val"]
    for step, run in zip((2, 4), log.runs):
        for layer in (0, 1):
            assert _counts(frame, "val", step, layer) == sum(run[d][layer] for d in DOMAINS).tolist()


def test_a_validation_loader_without_a_domain_name_counts_to_val_with_a_warning(tmp_path):
    callback = MoEMonitor(log_every_n_steps=2, val_domains=["english"])
    with pytest.warns(RuntimeWarning, match=r"there is a validation dataloader 1: its batches count only to"):
        _, log, _ = _fit(tmp_path, callback, _data(val_loader_per_domain=True))
    frame = callback.expert_frame()
    assert sorted(set(frame.phase)) == ["train", "val", "val/english"]
    for step, run in zip((2, 4), log.runs):
        assert _counts(frame, "val/english", step, 0) == run["english"][0].tolist()
        assert _counts(frame, "val", step, 0) == (run["english"][0] + run["python"][0]).tolist()


@pytest.mark.parametrize("bad", ["english", [], ["a", "a"], ["a/b"], [""], [1], 3])
def test_bad_val_domains_are_refused_at_construction(bad):
    with pytest.raises(MisconfigurationException, match=r"val_domains=.* is not valid; give one distinct"):
        MoEMonitor(val_domains=bad)


def test_per_domain_loaders_hold_each_domain_s_windows_once():
    data = _data(val_loader_per_domain=True)
    data.setup()
    whole = _data()
    whole.setup()
    batches = [[batch for batch in loader] for loader in data.val_dataloader()]
    for domain, domain_batches in enumerate(batches):
        assert all((batch["domain"] == domain).all() for batch in domain_batches)
    split_ids = torch.cat([batch["input_ids"] for domain_batches in batches for batch in domain_batches])
    whole_ids = torch.cat([batch["input_ids"] for batch in whole.val_dataloader()])
    assert torch.equal(split_ids, whole_ids)


@pytest.fixture
def tiny_preset(monkeypatch):
    """Shrinks the ``tiny`` preset so that a ``moe-monitor train`` run takes a few seconds."""
    from moe_monitor.reference import config

    small = dict(d_model=16, n_layers=2, n_heads=2, seq_len=16, n_experts=8, top_k=2, d_expert=16)
    monkeypatch.setitem(config.PRESETS, "tiny", small)
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


def test_cli_train_validates_each_domain_apart_and_its_report_shows_them(tiny_preset, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from moe_monitor import cli

    argv = ["--steps", "6", "--batch-size", "2", "--val-every", "3", "--log-every", "2", "--threads", "1"]
    assert cli.main(["train", *argv, "--out", str(tmp_path)]) == 0
    run_dir = tmp_path / "moe" / "version_0"
    layers = pd.read_csv(run_dir / "moe_monitor" / "layers.csv")
    first = layers[layers.layer_index == 0]
    # CorpusDataModule's default 32 validation windows per domain, of 16 tokens, at steps 3 and 6.
    for phase, windows in (("val", 64), ("val/english", 32), ("val/python", 32)):
        assert first[first.phase == phase].step.tolist() == [3, 6]
        assert (first[first.phase == phase].tokens == windows * 16).all()
    experts = pd.read_parquet(run_dir / "moe_monitor" / "experts.parquet")
    for step in (3, 6):
        count = {p: _counts(experts, p, step, 1) for p in ("val", "val/english", "val/python")}
        assert count["val"] == [a + b for a, b in zip(count["val/english"], count["val/python"])]
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    logged = accumulator.Scalars("moe/val/python/load_entropy/L01")
    expected = layers[(layers.phase == "val/python") & (layers.layer_index == 1)].load_entropy.tolist()
    assert [e.step for e in logged] == [3, 6]
    assert [e.value for e in logged] == pytest.approx(expected, rel=1e-6)
    assert "val/loss" in accumulator.Tags()["scalars"]

    html = write_report(run_dir).read_text()
    section = html[html.index("Expert use per domain") :]
    assert "english: experts" in section and "python: experts" in section


class OneDomainPerRankLM(LMWithTestStep):
    """Rank 0 validates only English (2 batches), rank 1 only Python (2 batches); the other loader is empty."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.allow_zero_length_dataloader_with_multiple_devices = True

    def val_dataloader(self) -> list[DataLoader]:
        data = _data(val_loader_per_domain=True)
        data.setup()
        loaders = data.val_dataloader()
        empty = DataLoader(Subset(loaders[0].dataset, []), batch_size=4)
        return [loader if index == self.global_rank else empty for index, loader in enumerate(loaders)]


@pytest.mark.slow
def test_ddp_ranks_that_validate_different_domains_close_every_window_together(tmp_path):
    pl.seed_everything(0, verbose=False)
    lm = OneDomainPerRankLM(make_lm().config, warmup_steps=1)
    callback = MoEMonitor(log_every_n_steps=2, detector=None, val_domains=DOMAINS)
    log_dir = fit_two_ranks(tmp_path, lm, callback, "domains")

    layers = pd.read_csv(Path(log_dir) / "moe_monitor" / "layers.csv")
    first = layers[layers.layer_index == 0]
    for phase, windows in (("val/english", VAL_PER_DOMAIN), ("val/python", VAL_PER_DOMAIN), ("val", 12)):
        assert first[first.phase == phase].step.tolist() == [2, 4]
        assert (first[first.phase == phase].tokens == windows * SEQ_LEN).all()
