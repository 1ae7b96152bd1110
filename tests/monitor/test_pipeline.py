"""Pipeline parallelism: stages that hold different MoE layers, or none, agree on one layer layout and reduce into one
snapshot of every layer.

Real gloo processes on the CPU run the reference model split into stages under ``torch.distributed.pipelining``'s
GPipe schedule (2 micro-batches, forward and backward), watched by a ``Watcher`` with the expert-bias controller.
Judged against independent numbers: each router's own choices counted by a plain hook, and a single process running
the whole model on the same micro-batches with the same controller."""

from __future__ import annotations

import functools
import os
import warnings
from datetime import timedelta

import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from moe_monitor import ExpertBiasController, RouterMonitor
from moe_monitor.monitor import NoRoutersFoundError, agree_layers
from moe_monitor.reference import MoEConfig, MoETransformer
from tests.ports import free_port

TINY = dict(d_model=16, n_layers=4, n_heads=2, seq_len=8, n_experts=4, top_k=2, d_expert=16, expert_bias=True)
RATE, STEPS, BATCH, MICRO = 0.05, 3, 4, 2
TWO_STAGES = ((0, 1), (2, 3))
EMPTY_FIRST = ((), (0, 1), (2, 3))  # stage 0: the embeddings only, no MoE layer


class Stage(nn.Module):
    """Blocks ``ids`` of the full model, keyed by their global index (torchtitan-style names, unique across stages);
    the first stage embeds, the last projects onto the (tied) vocabulary."""

    def __init__(self, full: MoETransformer, ids: tuple[int, ...], first: bool, last: bool) -> None:
        super().__init__()
        self.first, self.last = first, last
        self.embed = full.embed if first or last else None
        self.pos = full.pos if first else None
        self.blocks = nn.ModuleDict({str(i): full.blocks[i] for i in ids})
        self.norm = full.norm if last else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.first:
            x = self.embed(x) + self.pos(torch.arange(x.shape[1]))
        for block in self.blocks.values():
            x, _, _ = block(x)
        return F.linear(self.norm(x), self.embed.weight) if self.last else x


def _batches(pipeline: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + pipeline)  # each data-parallel replica of the pipeline: its own
    return [torch.randint(0, 256, (BATCH, TINY["seq_len"]), generator=generator) for _ in range(STEPS)]


def _plain_counts(routers: dict[str, nn.Module]) -> dict[str, list[int]]:
    """Each router's choices summed by a plain hook on its output (independent of the monitor)."""
    counts = {name: [0] * TINY["n_experts"] for name in routers}

    def hook(name):
        def count(module, args, output):
            for expert in output.expert_idx_A.tolist():
                counts[name][expert] += 1

        return count

    for name, router in routers.items():
        router.register_forward_hook(hook(name))
    return counts


def _pipeline_step(schedule, stage: int, stages: int, tokens: torch.Tensor) -> None:
    """One forward and backward of the batch (the next tokens are the targets; what they are does not matter here)."""
    if stage == 0:
        schedule.step(tokens)
    elif stage == stages - 1:
        schedule.step(target=tokens)
    else:
        schedule.step()


def _stage_worker(rank: int, world: int, port: int, stages: tuple, history_dir: str, results) -> None:
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # A collective that some process skips fails after 30 s instead of hanging the test.
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=30))
    try:
        n = len(stages)
        pipeline, stage = divmod(rank, n)
        groups = [dist.new_group([p * n + s for s in range(n)]) for p in range(world // n)]  # all, in order
        torch.manual_seed(0)
        ids = stages[stage]
        module = Stage(MoETransformer(MoEConfig(**TINY)), ids, stage == 0, stage == n - 1)
        schedule = ScheduleGPipe(
            PipelineStage(module, stage, n, torch.device("cpu"), group=groups[pipeline]),
            n_microbatches=MICRO,
            loss_fn=lambda out, target: F.cross_entropy(out.flatten(0, 1), target.flatten()),
        )
        batches = _batches(pipeline)
        # The first step of a schedule infers the stages' shapes by running a forward of its own first (stage 0 on
        # the first micro-batch, the later stages on uninitialised tensors): build the monitor after it (see
        # docs/distributed.md). Without an optimizer step it changes nothing the monitored steps compute.
        _pipeline_step(schedule, stage, n, batches[0])
        plain = _plain_counts({f"blocks.{i}.moe.router": module.blocks[str(i)].moe.router for i in ids})
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if history_dir:
                from moe_monitor import Watcher
                from moe_monitor.sinks.base import Sink

                class Metrics(Sink):
                    def log_window(self, snapshot, metrics, events):
                        logged.append({k: v for k, v in metrics.items() if k.startswith("controller/")})

                # The whole Watcher: detector, controller, files and dashboards from rank zero.
                logged: list[dict[str, float]] = []
                watcher = Watcher(
                    module,
                    log_every=STEPS,
                    detector="default",
                    controllers=[ExpertBiasController(rate=RATE)],
                    sinks=[history_dir, Metrics()] if rank == 0 else [],
                    console=False,
                )
                monitor, after_step = watcher.monitor, watcher.step
            else:  # the monitor and the controller alone: spares each process the import of the dashboards' libraries
                watcher, monitor, controller = None, RouterMonitor(module), ExpertBiasController(rate=RATE)
                controller.setup(module, monitor)
                after_step = functools.partial(controller.on_train_step, monitor)
            for step, tokens in enumerate(batches, start=1):
                _pipeline_step(schedule, stage, n, tokens)
                after_step(step)
            if watcher is None:
                monitor.collect(STEPS)  # the Watcher closes its window at step STEPS by itself
                events, logged = [], []
            else:
                events = watcher.event_frame()[["kind", "rule", "layer", "value"]].values.tolist()
            frame, experts = monitor.layer_frame(), monitor.expert_frame()
            if watcher is not None:
                watcher.close()
        biases = {f"blocks.{i}.moe.router": module.blocks[str(i)].moe.router.expert_bias.tolist() for i in ids}
        results[rank] = {
            "local": [layer.name for layer in monitor.layers],
            "pipelined": monitor.pipelined,
            "layers": frame.to_dict("list"),
            "experts": experts[["layer", "expert", "count"]].values.tolist(),
            "plain": plain,
            "events": repr(events),  # repr: NaN values compare equal
            "control": [(rule, layer) for kind, rule, layer, _ in events if kind == "control"],
            "logged": logged,
            "biases": biases,
            "warnings": [str(w.message) for w in caught if "moe_monitor" in str(w.message)],
        }
    finally:
        dist.destroy_process_group()


def _single_process_reference(pipelines: int) -> tuple[dict[str, list[int]], dict[str, list[float]]]:
    """The whole model in one process, the same micro-batches, the same controller: counts and final biases."""
    torch.manual_seed(0)
    model = MoETransformer(MoEConfig(**TINY))
    monitor = RouterMonitor(model)
    controller = ExpertBiasController(rate=RATE)
    controller.setup(model, monitor)
    batches = [_batches(p) for p in range(pipelines)]
    with torch.no_grad():
        for step in range(STEPS):
            for p in range(pipelines):
                for micro in batches[p][step].tensor_split(MICRO):
                    model(micro)
            controller.on_train_step(monitor, step + 1)
    snapshot = monitor.collect(STEPS)
    counts = dict(zip(snapshot.layer_names, snapshot.counts.tolist()))
    biases = {layer.name: layer.module.expert_bias.tolist() for layer in monitor.layers}
    return counts, biases


def _spawn(worker, world: int, *args) -> dict:
    """Runs ``worker(rank, world, port, *args, results)`` in ``world`` gloo processes; their results by rank."""
    with mp.get_context("spawn").Manager() as manager:
        results = manager.dict()
        mp.start_processes(worker, args=(world, free_port(), *args, results), nprocs=world, start_method="spawn")
        return dict(results)


def _run(stages: tuple, world: int, tmp_path=None) -> dict:
    """The stages under GPipe; with ``tmp_path``, watched by a ``Watcher`` writing the history there."""
    return _spawn(_stage_worker, world, stages, "" if tmp_path is None else str(tmp_path / "history"))


def _check(results: dict, stages: tuple, tmp_path=None) -> None:
    world, n = len(results), len(stages)
    names = [f"blocks.{i}.moe.router" for stage in stages for i in stage]
    # Each layer's counts: the sum of its routers' own choices over every process that holds it.
    expected = {name: [0] * TINY["n_experts"] for name in names}
    for result in results.values():
        for name, counts in result["plain"].items():
            expected[name] = [a + b for a, b in zip(expected[name], counts)]
    reference_counts, reference_biases = _single_process_reference(world // n)
    assert reference_counts == expected  # the split run routes exactly as the whole model in one process
    first = results[0]
    assert first["layers"]["layer"] == names  # every layer on every process, in stage order
    for rank, result in results.items():
        assert result["local"] == [f"blocks.{i}.moe.router" for i in stages[rank % n]] and result["pipelined"]
        assert result["layers"] == first["layers"] and result["experts"] == first["experts"]  # identical snapshots
        assert result["events"] == first["events"]  # identical decisions: alerts, and every stage's control events
        got = {name: [0] * TINY["n_experts"] for name in names}
        for name, expert, count in result["experts"]:
            got[name][expert] = count
        assert got == expected
        assert result["layers"]["tokens"] == [STEPS * BATCH * TINY["seq_len"] * (world // n)] * len(names)
        # Each stage's biases: updated from every layer's global counts, exactly as in one process.
        for name, bias in result["biases"].items():
            assert bias == pytest.approx(reference_biases[name], abs=1e-7)
            assert max(map(abs, bias)) > 0  # the controller did act
        assert result["warnings"] == []  # a layer another stage holds is no lost knob
    if tmp_path is None:
        return
    # Every stage's bias knobs reach rank zero's dashboards and every process's events, whichever stage logs.
    assert first["control"] == [("expert_bias", name) for name in names]
    (logged,) = results[0]["logged"]
    assert logged["controller/bias/active_knobs"] == len(names)
    for label, name in zip(["L00", "L01", "L02", "L03"], names):
        bias = next(r["biases"][name] for r in results.values() if name in r["biases"])
        assert logged[f"controller/bias/{label}/range"] == pytest.approx(max(bias) - min(bias), abs=1e-6)
    # Rank zero writes the history of every layer, whichever layers it holds itself.
    written = pd.read_csv(tmp_path / "history" / "layers.csv")
    assert written["layer"].tolist() == names
    assert written["assignments"].tolist() == [sum(expected[name]) for name in names]


@pytest.mark.slow
def test_two_stages_under_a_gpipe_schedule_give_every_layer_on_every_process():
    results = _run(TWO_STAGES, 2)
    assert sorted(results) == [0, 1]  # both stages reported back
    _check(results, TWO_STAGES)


@pytest.mark.slow
def test_a_stage_without_moe_layers_joins_every_collective_and_sees_every_layer(tmp_path):
    results = _run(EMPTY_FIRST, 3, tmp_path)
    assert results[0]["local"] == [] and results[0]["biases"] == {}
    _check(results, EMPTY_FIRST, tmp_path)


@pytest.mark.slow
def test_two_stages_times_two_data_parallel_replicas_sum_the_replicas():
    results = _run(TWO_STAGES, 4)
    assert results[0]["plain"] != results[2]["plain"]  # the replicas saw different tokens
    _check(results, TWO_STAGES)


def _watcher(model: nn.Module):
    from moe_monitor import Watcher
    from moe_monitor.controllers import ExpertBiasController

    return Watcher(model, controllers=[ExpertBiasController()], sinks=())


def _setup_error_worker(rank: int, world: int, port: int, results) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=30))

    def tiny(**overrides) -> MoETransformer:
        return MoETransformer(MoEConfig(**{**TINY, "expert_bias": False, **overrides}))

    cases = {
        # Each stage names its blocks locally: rank 1's `blocks.0` is not rank 0's.
        "overlap": lambda: RouterMonitor(tiny(n_layers=2 - rank)),
        "experts": lambda: RouterMonitor(tiny(n_layers=1, n_experts=4 + 4 * rank)),
        "nowhere": lambda: RouterMonitor(nn.Sequential(nn.Linear(4, 4), nn.ReLU())),
        "one_rank_fails": lambda: RouterMonitor(tiny(n_layers=1), routers=["blocks.0.moe.nope"] if rank else None),
        # Stage 0 has a router without an expert bias, stage 1 no router: only stage 0's controller setup fails.
        "controller": lambda: _watcher(tiny(n_layers=1) if rank == 0 else nn.Sequential(nn.Linear(4, 4))),
    }
    out = {}
    try:
        for case, build in cases.items():  # each construction is a collective: every process runs every case
            try:
                build()
                out[case] = ("built", "")
            except ValueError as error:
                out[case] = (type(error).__name__, str(error))
        results[rank] = out
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_setup_errors_are_raised_on_every_process_instead_of_a_hang():
    results = _spawn(_setup_error_worker, 2)
    for rank in (0, 1):
        kind, text = results[rank]["overlap"]
        assert kind == "ValueError" and "processes 0 and 1 both hold router 'blocks.0.moe.router'" in text
        kind, text = results[rank]["experts"]
        assert kind == "ValueError" and "has 4 experts, top-2 on process 0 but 8 experts, top-2 on process 1" in text
        kind, text = results[rank]["nowhere"]
        assert kind == "NoRoutersFoundError" and "No MoE router found in Sequential" in text
    assert results[1]["one_rank_fails"][1].startswith("No module named 'blocks.0.moe.nope'")  # its own error
    kind, text = results[0]["one_rank_fails"]
    assert kind == "ValueError"
    assert "setup failed on process 1 of the process group (ValueError: No module named" in text
    assert "ExpertBiasController" in results[0]["controller"][1]  # its own error
    kind, text = results[1]["controller"]
    assert kind == "ValueError" and "a controller's setup failed on process 0 of the process group" in text


def test_the_layout_is_the_union_in_stage_order_with_replicas_counted_once():
    stage0 = [("embed.router", 4, 1), ("blocks.0", 8, 2)]
    stage1 = [("blocks.1", 8, 2), ("blocks.2", 16, 1)]
    names, experts, top_k = agree_layers([stage0, stage1, [], stage0, stage1, []], ranks=range(6))
    assert names == ["embed.router", "blocks.0", "blocks.1", "blocks.2"]
    assert (experts, top_k) == ([4, 8, 8, 16], [1, 2, 2, 1])
    assert agree_layers([[], []]) == ([], [], [])
    # Order comes from the processes, not from the names.
    assert agree_layers([[("z", 2, 1)], [("a", 2, 1)]])[0] == ["z", "a"]


@pytest.mark.parametrize(
    "records, message",
    [
        ([[("a", 8, 2)], [("a", 8, 1)]], "'a' has 8 experts, top-2 on process 4 but 8 experts, top-1 on process 6"),
        ([[("a", 8, 2), ("b", 8, 2)], [("b", 8, 2), ("c", 8, 2)]], "processes 4 and 6 both hold router 'b'"),
    ],
    ids=["top_k", "partial_overlap"],
)
def test_processes_that_disagree_on_a_layer_are_refused_with_the_ranks_named(records, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")) as caught:
        agree_layers(records, ranks=[4, 6])
    assert "process_group=" in str(caught.value)


def test_one_process_without_routers_still_raises_at_once():
    with pytest.raises(NoRoutersFoundError, match="No MoE router found in Sequential"):
        RouterMonitor(nn.Sequential(nn.Linear(4, 4)))
