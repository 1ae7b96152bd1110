"""FSDP (PyTorch's ``fully_shard``, FSDP2) on two gloo processes on the CPU.

Lightning's ``FSDPStrategy`` refuses the CPU accelerator ("The strategy `fsdp` requires a GPU accelerator"), so
the CPU proof runs torch's own FSDP2 in a plain loop: every block's parameters, the router gates among them, are
sharded ``DTensor``s that FSDP gathers for each forward. The monitor must count exactly what the routers chose on
every process, and the per-expert bias controller (a buffer, which FSDP2 leaves replicated) must keep identical
biases on both processes.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.ports import free_port

STEPS = 4


def _worker(rank: int, world_size: int, port: int, results) -> None:
    from torch.distributed.fsdp import fully_shard

    from moe_monitor import RouterMonitor
    from moe_monitor.controllers import ExpertBiasController
    from moe_monitor.reference import MoEConfig, MoETransformer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)
        config = MoEConfig(d_model=32, n_layers=2, n_heads=2, seq_len=16, n_experts=4, d_expert=16, expert_bias=True)
        model = MoETransformer(config)
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        monitor = RouterMonitor(model)
        controller = ExpertBiasController(rate=1e-2)
        controller.setup(model, monitor)

        # The independent count: every router output's chosen experts, bincounted on the host per process.
        seen_LE = torch.zeros(len(monitor.layers), config.n_experts, dtype=torch.int64)

        def record(index):
            def hook(module, args, output):
                seen_LE[index] += torch.bincount(output.expert_idx_A, minlength=config.n_experts)

            return hook

        for i, layer in enumerate(monitor.layers):
            layer.module.register_forward_hook(record(i))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        generator = torch.Generator().manual_seed(100 + rank)  # each process its own batches
        for step in range(1, STEPS + 1):
            tokens = torch.randint(0, config.vocab_size, (4, config.seq_len), generator=generator)
            out = model(tokens)
            loss = torch.nn.functional.cross_entropy(
                out.logits[:, :-1].reshape(-1, config.vocab_size).float(), tokens[:, 1:].reshape(-1)
            )
            (loss + out.aux_loss).backward()
            optimizer.step()
            optimizer.zero_grad()
            controller.on_train_step(monitor, step)
        snapshot = monitor.collect(STEPS)
        dist.all_reduce(seen_LE)
        biases = [model.get_submodule(f"blocks.{i}.moe.router").expert_bias.tolist() for i in range(2)]
        gate = model.get_submodule("blocks.0.moe.router.gate").weight
        results[rank] = (snapshot.counts.tolist(), seen_LE.tolist(), snapshot.tokens.tolist(), biases, type(gate))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp2_counts_and_bias_agree_on_every_process():
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        results = manager.dict()
        mp.start_processes(_worker, args=(2, free_port(), results), nprocs=2, join=True, start_method="spawn")
        results = dict(results)
    for rank in (0, 1):
        counts, seen, tokens, biases, gate_type = results[rank]
        assert gate_type.__name__ == "DTensor"  # the gate really was sharded
        assert counts == seen  # exactly the routers' choices, summed over both processes
        assert tokens == [2 * STEPS * 4 * 16] * 2
        assert max(abs(b) for layer in biases for b in layer) > 0  # the controller moved the routers' bias
    assert results[0][3] == results[1][3]  # identical biases on both processes
