"""What the plain-loop examples share, so each shows only its monitor: the command line of a run, the tiny reference
model with its optimizer on the bundled corpus, and one training step. Not an example of its own."""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from moe_monitor.reference import CorpusDataModule, MoEConfig, MoETransformer

BATCH_SIZE = 16
SEQ_LEN = 64


def parse_run(description: str, out: str, argv: list[str] | None) -> argparse.Namespace:
    """``--steps``, ``--every`` (optimizer steps per monitoring window) and ``--out`` (where the files go)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=50, help="optimizer steps per monitoring window")
    parser.add_argument("--out", default=out, help="where the history files (and dashboards) go")
    return parser.parse_args(argv)


def tiny_reference(steps: int) -> tuple[MoETransformer, torch.optim.Optimizer, CorpusDataModule]:
    """A two-layer tiny reference model, its AdamW, and ``steps`` batches of the bundled corpus (seeded)."""
    torch.manual_seed(0)
    model = MoETransformer(MoEConfig.from_preset("tiny", n_layers=2, seq_len=SEQ_LEN))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = CorpusDataModule(seq_len=SEQ_LEN, batch_size=BATCH_SIZE, seed=0, train_samples=steps * BATCH_SIZE)
    data.setup()
    return model, optimizer, data


def train_step(model: MoETransformer, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """One optimizer step of next-token loss plus the model's balancing losses; returns the loss."""
    out = model(batch["input_ids"])
    loss = F.cross_entropy(out.logits.flatten(0, 1), batch["labels"].flatten()) + out.aux_loss + out.z_loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss
