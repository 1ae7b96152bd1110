"""Cost of the one collective per window against a training step, two gloo processes on the CPU.

Each process trains its own copy of the reference model (same seed, different batches) with a RouterMonitor and
its gradients all-reduced by DDP, as in a data-parallel run. Measured on rank 0, interleaved:

- ``step``: one training step (forward, backward with DDP's gradient all-reduce, AdamW);
- ``collect``: ``RouterMonitor.collect`` (sum over devices, one ``all_reduce`` of the packed ``[L, F]`` window,
  one host copy, the statistics) right after a step;
- ``all_reduce``: a bare ``all_reduce`` of a tensor of the window's size, to separate the collective from the rest.

Prints medians and ``collect / step``; at a window of ``N`` steps the monitor's share of the run's time is
``collect / (N * step)``.

Usage: ``python benchmarks/reduction.py [--rounds 40] [--batch 8] [--threads 1] [--preset tiny]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, args: argparse.Namespace, port: int) -> None:
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel

    from moe_monitor import RouterMonitor
    from moe_monitor.reference import MoEConfig, MoETransformer

    torch.set_num_threads(args.threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        config = MoEConfig.from_preset(args.preset)
        model = MoETransformer(config)
        monitor = RouterMonitor(model)
        ddp = DistributedDataParallel(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        generator = torch.Generator().manual_seed(rank)

        def step() -> None:
            tokens = torch.randint(0, config.vocab_size, (args.batch, config.seq_len), generator=generator)
            out = ddp(tokens)
            logits = out.logits[:, :-1].reshape(-1, config.vocab_size)
            loss = F.cross_entropy(logits.float(), tokens[:, 1:].reshape(-1)) + out.aux_loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        window = torch.zeros(len(monitor.layers), monitor.layout.width, dtype=torch.float64)
        times: dict[str, list[float]] = {"step": [], "collect": [], "all_reduce": []}
        for _ in range(3):  # warm-up
            step()
            monitor.collect(0)
        for i in range(args.rounds):
            dist.barrier()
            start = time.perf_counter()
            step()
            times["step"].append(time.perf_counter() - start)
            dist.barrier()
            start = time.perf_counter()
            monitor.collect(i)
            times["collect"].append(time.perf_counter() - start)
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(window)
            times["all_reduce"].append(time.perf_counter() - start)
        if rank == 0:
            med = {name: statistics.median(values) * 1e3 for name, values in times.items()}
            print(
                f"preset {args.preset}, batch {args.batch}x{config.seq_len}, {len(monitor.layers)} layers x "
                f"{monitor.layout.width} fields, 2 gloo processes, {args.threads} thread(s) each, {args.rounds} rounds"
            )
            for name, value in med.items():
                print(f"  {name:>10}: {value:8.3f} ms (median)")
            print(
                f"  collect / step = {med['collect'] / med['step']:.4f}; at a 50-step window: "
                f"{med['collect'] / (50 * med['step']):.5f} of the run"
            )
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--preset", default="tiny")
    args = parser.parse_args()
    from tests.ports import free_port

    mp.start_processes(_worker, args=(args, free_port()), nprocs=2, join=True, start_method="spawn")


if __name__ == "__main__":
    main()
