"""Watch the routers of the reference MoE transformer in a plain PyTorch training loop (no Lightning).

Run: ``python examples/plain_pytorch.py --steps 200``. Every ``--every`` steps the window is closed and one line
per router is printed; at the end the history is saved as CSV (and parquet when pyarrow is installed). The model,
data and training step are those of ``examples/_reference_run.py``.
"""

from __future__ import annotations

from _reference_run import parse_run, tiny_reference, train_step

from moe_monitor import RouterMonitor


def main(argv: list[str] | None = None) -> RouterMonitor:
    args = parse_run(__doc__.splitlines()[0], "runs/plain_pytorch", argv)
    model, optimizer, data = tiny_reference(args.steps)

    # The monitor finds every router by itself; its hooks only add to on-device counters (no host sync).
    with RouterMonitor(model) as monitor:
        for step, batch in enumerate(data.train_dataloader(), start=1):
            loss = train_step(model, optimizer, batch)
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
