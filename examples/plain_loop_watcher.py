"""The whole monitor in a plain PyTorch loop with ``Watcher``: windows, collapse alerts, controllers, dashboards.

Run: ``python examples/plain_loop_watcher.py --out runs/plain_loop``, then ``tensorboard --logdir runs/plain_loop``.
Three lines do it: build ``Watcher(model, ...)``, call ``watcher.step(step)`` after each optimizer step, close it
(here: the ``with`` block). The history files in ``--out`` grow window by window, so a crash keeps them.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

from moe_monitor import AuxLossController, Watcher
from moe_monitor.reference import CorpusDataModule, MoEConfig, MoETransformer


def main(argv: list[str] | None = None) -> Watcher:
    from torch.utils.tensorboard import SummaryWriter

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=50, help="optimizer steps per monitoring window")
    parser.add_argument("--out", default="runs/plain_loop", help="TensorBoard run and history files")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    config = MoEConfig.from_preset("tiny", n_layers=2, seq_len=64)
    model = MoETransformer(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = CorpusDataModule(seq_len=config.seq_len, batch_size=16, seed=0, train_samples=args.steps * 16)
    data.setup()
    writer = SummaryWriter(os.path.join(args.out, "tensorboard"))

    with Watcher(model, log_every=args.every, controllers=[AuxLossController()], sinks=[writer, args.out]) as watcher:
        for step, batch in enumerate(data.train_dataloader(), start=1):
            watcher.batch(batch)  # its attention_mask, if any, leaves padding out
            out = model(batch["input_ids"])
            loss = F.cross_entropy(out.logits.flatten(0, 1), batch["labels"].flatten()) + out.aux_loss + out.z_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            for event in watcher.step(step):  # new alerts and controller actions, at window ends only
                print(f"step {step}: {event.kind} {event.rule} at {event.layer}")
        with watcher.phase("val"), torch.no_grad():  # one validation window, logged under moe/val/...
            model.eval()
            for batch in data.val_dataloader():
                model(batch["input_ids"])
    writer.close()
    print(watcher.layer_frame()[["step", "phase", "layer", "load_entropy", "max_violation"]].to_string())
    return watcher


if __name__ == "__main__":
    main()
