"""The whole monitor in a plain PyTorch loop with ``Watcher``: windows, collapse alerts, controllers, dashboards.

Run: ``python examples/plain_loop_watcher.py --out runs/plain_loop``, then ``tensorboard --logdir runs/plain_loop``.
Three lines do it: build ``Watcher(model, ...)``, call ``watcher.step(step)`` after each optimizer step, close it
(here: the ``with`` block). The history files in ``--out`` grow window by window, so a crash keeps them. The
model, data and training step are those of ``examples/_reference_run.py``.
"""

from __future__ import annotations

import os

import torch
from _reference_run import parse_run, tiny_reference, train_step

from moe_monitor import AuxLossController, Watcher


def main(argv: list[str] | None = None) -> Watcher:
    from torch.utils.tensorboard import SummaryWriter

    args = parse_run(__doc__.splitlines()[0], "runs/plain_loop", argv)
    model, optimizer, data = tiny_reference(args.steps)
    writer = SummaryWriter(os.path.join(args.out, "tensorboard"))

    with Watcher(model, log_every=args.every, controllers=[AuxLossController()], sinks=[writer, args.out]) as watcher:
        for step, batch in enumerate(data.train_dataloader(), start=1):
            watcher.batch(batch)  # its attention_mask, if any, leaves padding out
            train_step(model, optimizer, batch)
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
