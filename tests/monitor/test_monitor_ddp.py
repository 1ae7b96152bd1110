"""Two gloo processes on the CPU: collect() sums every process's window with one collective."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.ports import free_port


def _worker(rank: int, world_size: int, port: int, results) -> None:
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    import warnings

    from monitor_toys import Replay, replay_spec
    from torch import nn

    from moe_monitor import RouterMonitor, RouterSpec
    from moe_monitor.routing import Routing

    def fails_on_rank_1(module, args, output):
        if rank == 1:
            raise RuntimeError("adapter bug on rank 1")
        return Routing.from_topk(output[1], logits_TE=output[0])

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        model = nn.ModuleDict({"a": Replay(), "b": Replay(), "c": Replay()})
        monitor = RouterMonitor(
            model,
            routers=[
                replay_spec("a", 3, 1),
                replay_spec("b", 3, 1),
                RouterSpec(name="c", num_experts=3, top_k=1, extract=fails_on_rank_1),
            ],
        )
        calls = []
        real_all_reduce = dist.all_reduce
        dist.all_reduce = lambda *args, **kwargs: calls.append(1) or real_all_reduce(*args, **kwargs)
        # Rank r routes r + 1 tokens, all to expert r, in both layers; the logits are irrelevant here.
        idx_TK = torch.full((rank + 1, 1), rank)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            for name in ("a", "b", "c"):
                model[name](torch.zeros(rank + 1, 3), idx_TK)
        snap = monitor.collect(step=1)
        # A phase that only rank 0 ran: rank 1 has no window buffer yet and must still join the collective.
        if rank == 0:
            with monitor.phase("val"):
                model["a"](torch.zeros(2, 3), torch.tensor([[2], [2]]))
        val = monitor.collect(step=1, phase="val")
        # repr() so that NaN compares equal to NaN across processes.
        stats = {name: repr(value.tolist()) for name, value in snap.stats.items()}
        results[rank] = (snap.counts.tolist(), snap.tokens.tolist(), len(calls), val.counts.tolist(), stats)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_collect_reduces_across_two_processes():
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        results = manager.dict()
        mp.start_processes(_worker, args=(2, free_port(), results), nprocs=2, join=True, start_method="spawn")
        results = dict(results)
    # Layer "c" is disabled on rank 1 only: only rank 0's token reached its counters.
    expected_counts = [[1, 2, 0], [1, 2, 0], [1, 0, 0]]
    for rank in (0, 1):
        counts, tokens, all_reduce_calls, val_counts, stats = results[rank]
        assert counts == expected_counts
        assert tokens == [3, 3, 1]
        assert all_reduce_calls == 2  # one per collect, for all layers together
        assert val_counts == [[0, 0, 2], [0, 0, 0], [0, 0, 0]]
        assert stats["load_entropy"].startswith("[") and stats["load_entropy"].endswith(", nan]")
    # Every process sees the same statistics (the disabled layer NaN everywhere), so decisions agree.
    assert results[0][4] == results[1][4]
