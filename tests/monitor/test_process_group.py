"""The ``process_group`` option: two gloo processes on the CPU, each alone in its own group vs the default group.

Alone in its group, a process's window and its bias controller's step counts are its own; over the default group
they are both processes' sums."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.ports import free_port

TINY = dict(d_model=16, n_layers=2, n_heads=2, seq_len=8, n_experts=4, top_k=2, d_expert=16, expert_bias=True)
RATE = 0.1


def _worker(rank: int, world_size: int, port: int, results) -> None:
    from moe_monitor import ExpertBiasController, RouterMonitor
    from moe_monitor.reference import MoEConfig
    from moe_monitor.reference.model import MoETransformer

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        groups = [dist.new_group([r]) for r in range(world_size)]  # every process creates every group, in order
        torch.manual_seed(0)
        model = MoETransformer(MoEConfig(**TINY))
        own = RouterMonitor(model, process_group=groups[rank])
        world = RouterMonitor(model)
        controller = ExpertBiasController(rate=RATE)
        controller.setup(model, own)
        plain = []  # each router's own selections, read off its output by a plain count
        for layer in own.layers:
            layer.module.register_forward_hook(
                lambda module, args, output: plain.append(
                    torch.bincount(output.expert_idx_A, minlength=TINY["n_experts"]).tolist()
                )
            )
        generator = torch.Generator().manual_seed(100 + rank)  # each process sees its own tokens
        with torch.no_grad():
            model(torch.randint(0, 256, (2 + rank, TINY["seq_len"]), generator=generator))
        controller.on_train_step(own, step=1)
        biases = [layer.module.expert_bias.tolist() for layer in own.layers]
        results[rank] = (plain, own.collect(1).counts.tolist(), world.collect(1).counts.tolist(), biases)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_a_process_alone_in_its_group_counts_its_own_tokens_and_the_default_group_sums():
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        results = manager.dict()
        mp.start_processes(_worker, args=(2, free_port(), results), nprocs=2, join=True, start_method="spawn")
        results = dict(results)
    summed = [[a + b for a, b in zip(results[0][0][i], results[1][0][i])] for i in range(TINY["n_layers"])]
    for rank in (0, 1):
        plain, own, world, biases = results[rank]
        assert own == plain  # only this process's tokens
        assert world == summed  # both processes' tokens
        for counts, bias in zip(plain, biases):
            # One controller step from this process's counts alone: rate * sign(mean - count), centred.
            step = [RATE * (1.0 if c < sum(counts) / len(counts) else -1.0 if c > sum(counts) / len(counts) else 0.0)
                    for c in counts]
            expected = [s - sum(step) / len(step) for s in step]
            assert bias == pytest.approx(expected, abs=1e-6)
    assert results[0][0] != results[1][0]  # the processes did see different tokens
