"""``MoEMonitor()`` with no arguments on a peer library's MoE trained by a real Lightning Trainer (torchtitan)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from moe_monitor import MoEMonitor

pytest.importorskip("torchtitan.models.common.moe")
from test_torchtitan import D, K, Stack  # noqa: E402


class TitanModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = Stack()
        self.head = torch.nn.Linear(D, 1)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return self.head(self.model(x)).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-2)


@pytest.mark.filterwarnings("ignore:In CPU autocast")
@pytest.mark.filterwarnings("ignore::UserWarning:lightning")
def test_moe_monitor_finds_torchtitan_routers_and_counts_every_step_like_tokens_per_expert(tmp_path):
    torch.manual_seed(0)
    module = TitanModule()
    data = DataLoader(TensorDataset(torch.randn(8, 4, D)), batch_size=2)
    callback = MoEMonitor(log_every_n_steps=2)
    trainer = pl.Trainer(
        max_steps=4, callbacks=[callback], logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(module, data)
    assert [layer.name for layer in callback.monitor.layers] == ["model.layers.0.router", "model.layers.1.router"]
    frame = callback.monitor.expert_frame()
    train = frame[frame.phase == "train"]
    ours = train.groupby(["layer_index", "expert"])["count"].sum().unstack().to_numpy().tolist()
    theirs = [layer.tokens_per_expert_E.long().tolist() for layer in module.model.layers]
    assert ours == theirs  # torchtitan's counter, never reset here, holds the 4 steps
    assert sum(theirs[0]) == 4 * 2 * 4 * K
