"""Two gloo processes on the CPU: the expert-bias and aux-loss controllers take identical decisions on every rank."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.detect.detect_toys import expected_bias
from tests.ports import free_port

RATE = 0.01
STEPS = 6
WINDOW_AT = 3  # a window closes after this step, so the per-step differencing must restart


def _worker(rank: int, world_size: int, port: int, results) -> None:
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from detect_toys import MICRO

    from moe_monitor.controllers import AuxLossController, ExpertBiasController
    from moe_monitor.detect import CollapseDetector
    from moe_monitor.monitor import RouterMonitor
    from moe_monitor.reference import MoEConfig, MoETransformer

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)  # same weights on both ranks
        model = MoETransformer(MoEConfig(**{**MICRO, "expert_bias": True, "init_std": 0.3}))
        monitor = RouterMonitor(model)
        bias = ExpertBiasController(rate=RATE)
        aux = AuxLossController()
        bias.setup(model, monitor)
        aux.setup(model, monitor)
        detector = CollapseDetector(patience=1)
        generator = torch.Generator().manual_seed(100 + rank)  # different data on each rank
        local_steps, coefs = [], []
        for step in range(1, STEPS + 1):
            before = monitor.window_counts().clone()
            # Rank 1 sees a skewed batch (one repeated byte), rank 0 a random one: local counts differ.
            if rank == 0:
                tokens = torch.randint(0, 256, (4, 32), generator=generator)
            else:
                tokens = torch.full((4, 32), 101)
            model(tokens)
            local_steps.append((monitor.window_counts() - before).tolist())
            bias.on_train_step(monitor, step)
            if step % WINDOW_AT == 0:
                snapshot = monitor.collect(step)
                events = detector.update(snapshot)
                aux.on_window(snapshot, events)
                bias.on_window(snapshot, events)
                coefs.append([router.aux_loss_coef for router in model.routers])
        results[rank] = ([router.expert_bias.tolist() for router in model.routers], local_steps, coefs)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_expert_bias_is_identical_on_both_ranks_and_uses_the_global_counts():
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        results = manager.dict()
        mp.start_processes(_worker, args=(2, free_port(), results), nprocs=2, join=True, start_method="spawn")
        results = dict(results)
    bias0, local0, coefs0 = results[0]
    bias1, local1, coefs1 = results[1]
    assert bias0 == bias1
    assert local0 != local1  # the ranks really routed different tokens
    for layer in range(len(bias0)):
        global_steps = [[a + b for a, b in zip(s0[layer], s1[layer])] for s0, s1 in zip(local0, local1)]
        assert bias0[layer] == pytest.approx(expected_bias(global_steps, RATE), abs=1e-6)
        local_only = expected_bias([s[layer] for s in local0], RATE)
        assert bias0[layer] != pytest.approx(local_only, abs=1e-6)
    assert coefs0 == coefs1
