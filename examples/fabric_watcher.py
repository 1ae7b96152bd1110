"""``Watcher`` under Lightning Fabric: the plain-loop monitor with Fabric's devices, precision and processes.

Run: ``python examples/fabric_watcher.py --devices 2`` (two CPU processes, gloo). Every process calls
``watcher.step``; each window is reduced over both with one ``all_reduce``, so the statistics, alerts and
controller decisions are the same on each, and only rank zero writes ``--out``.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from moe_monitor import Watcher
from moe_monitor.reference import CorpusDataModule, MoEConfig, MoETransformer


def main(argv: list[str] | None = None):
    from lightning.fabric import Fabric

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--out", default="runs/fabric")
    args = parser.parse_args(argv)

    fabric = Fabric(accelerator="cpu", devices=args.devices, strategy="ddp" if args.devices > 1 else "auto")
    fabric.launch()
    fabric.seed_everything(0)
    config = MoEConfig.from_preset("tiny", n_layers=2, seq_len=64)
    model = MoETransformer(config)
    # Hooks go on the routers themselves, so Fabric's wrapping (DDP, precision) keeps them.
    watcher = Watcher(model, log_every=args.every, sinks=[args.out], is_global_zero=fabric.is_global_zero)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model, optimizer = fabric.setup(model, optimizer)
    # Each process gets its own share of the samples (a distributed sampler): enough for `--steps` steps each.
    data = CorpusDataModule(seq_len=config.seq_len, batch_size=8, seed=0, train_samples=args.steps * 8 * args.devices)
    data.setup()
    loader = fabric.setup_dataloaders(data.train_dataloader())
    try:
        for step, batch in enumerate(loader, start=1):
            out = model(batch["input_ids"])
            loss = F.cross_entropy(out.logits.flatten(0, 1), batch["labels"].flatten()) + out.aux_loss
            optimizer.zero_grad(set_to_none=True)
            fabric.backward(loss)
            optimizer.step()
            watcher.step(step)
            if step == args.steps:
                break
    finally:
        watcher.close()  # every process: the last window is a collective too
    if fabric.is_global_zero:
        print(watcher.layer_frame()[["step", "layer", "tokens", "load_entropy", "max_violation"]].to_string())
    return watcher


if __name__ == "__main__":
    main()
