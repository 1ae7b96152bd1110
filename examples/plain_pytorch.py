"""Watch the routers of the reference MoE transformer in a plain PyTorch training loop (no Lightning).

Run: ``python examples/plain_pytorch.py --steps 200``. Every ``--every`` steps the window is closed and one line
per router is printed; at the end the history is saved as CSV (and parquet when pyarrow is installed).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from moe_monitor import RouterMonitor
from moe_monitor.reference import CorpusDataModule, MoEConfig, MoETransformer


def main(argv: list[str] | None = None) -> RouterMonitor:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=50, help="steps per monitoring window")
    parser.add_argument("--out", default="runs/plain_pytorch", help="where the history is saved")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    config = MoEConfig.from_preset("tiny", n_layers=2, seq_len=64)
    model = MoETransformer(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = CorpusDataModule(seq_len=config.seq_len, batch_size=16, seed=0, train_samples=args.steps * 16)
    data.setup()

    # The monitor finds every router by itself; its hooks only add to on-device counters (no host sync).
    with RouterMonitor(model) as monitor:
        for step, batch in enumerate(data.train_dataloader(), start=1):
            out = model(batch["input_ids"])
            loss = F.cross_entropy(out.logits.flatten(0, 1), batch["labels"].flatten()) + out.aux_loss + out.z_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step % args.every == 0:
                snapshot = monitor.collect(step)  # the only host transfer, once per window
                for name, entropy, maxvio in zip(
                    snapshot.layer_names, snapshot.stats["load_entropy"], snapshot.stats["max_violation"]
                ):
                    print(f"step {step:4d}  loss {loss.item():.3f}  {name}: entropy {entropy:.3f}  MaxVio {maxvio:.3f}")
        print("saved", *monitor.save(args.out))
    return monitor


if __name__ == "__main__":
    main()
