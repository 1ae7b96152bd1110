"""Cost of the monitor at production shapes: history memory and checkpoint size, hook and ``collect`` time.

Sections (``--only history|hook|collect`` runs one):

- ``history``: memory (``tracemalloc``: held after the run, and the peak) and ``state_dict`` size (pickled) after
  1,000 and 10,000 windows of 94 layers x 128 experts, in memory only (default ``keep_windows``) and with the
  history written to files in a temporary directory. Goal: under 10 MB, flat.
- ``hook``: one router of each model's shape at its width (DeepSeek-V3 58 x 256 top-8 d 7168, Qwen3-235B 94 x 128
  top-8 d 4096, GPT-OSS-120B 36 x 128 top-4 d 2880, Mixtral 8x22B 56 x 8 top-2 d 6144), ``T = 4096`` tokens: the
  router's own gate matmul against the monitor's hook on that forward, co-activation as ``"auto"`` decides and forced
  on. Goal: hook at most 2 % of the gate matmul.
- ``collect``: ``RouterMonitor.collect`` at 94 x 128 (and 58 x 256), history append included, in memory and with
  files. Goal: under 10 ms.

Usage: ``python benchmarks/scale.py [--windows 10000] [--threads 1] [--repeats 5] [--only SECTION]
[--baseline OLD_COUNTERS.py]`` (``--baseline``: the hook section also times the hook with another version of
``moe_monitor/counters.py``, in the same rounds).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import os
import pickle
import statistics
import tempfile
import time
import tracemalloc
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from moe_monitor import RouterMonitor
from moe_monitor import monitor as monitor_module
from moe_monitor.adapters import RouterSpec
from moe_monitor.history import History
from moe_monitor.routing import Routing
from moe_monitor.snapshot import STAT_NAMES, Snapshot

SHAPES = {
    # name: (layers, experts, top_k, d_model)
    "DeepSeek-V3": (58, 256, 8, 7168),
    "Qwen3-235B-A22B": (94, 128, 8, 4096),
    "GPT-OSS-120B": (36, 128, 4, 2880),
    "Mixtral-8x22B": (56, 8, 2, 6144),
}


class Gate(nn.Module):
    """A router: the gate matmul, then top-k (returns ``(logits_TE, topk_idx_TK)``)."""

    def __init__(self, d_model: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_experts, d_model) / d_model**0.5)
        self.top_k = top_k

    def forward(self, x_TD: torch.Tensor):
        logits_TE = x_TD @ self.weight.T
        return logits_TE, logits_TE.topk(self.top_k, dim=-1).indices


def _extract(module, args, output) -> Routing:
    logits_TE, topk_idx_TK = output
    return Routing.from_topk(topk_idx_TK, logits_TE=logits_TE)


def _spec(name: str, num_experts: int, top_k: int) -> RouterSpec:
    return RouterSpec(name=name, num_experts=num_experts, top_k=top_k, extract=_extract)


# ------------------------------------------------------------------------------------------------ history
def _window(step: int, names: list[str], experts: int, generator: torch.Generator) -> Snapshot:
    layers = len(names)
    counts = torch.randint(0, 4096, (layers, experts), generator=generator)
    stats = {name: torch.rand(layers, generator=generator, dtype=torch.float64) for name in STAT_NAMES}
    return Snapshot(
        step=step,
        phase="train",
        layer_names=names,
        num_experts=[experts] * layers,
        top_k=[8] * layers,
        counts=counts,
        tokens=counts.sum(1) // 8,
        dropped=torch.zeros(layers, dtype=torch.int64),
        nonfinite_tokens=torch.zeros(layers, dtype=torch.int64),
        stats=stats,
        extras={"counterfactual_drop@1.0": torch.rand(layers, generator=generator, dtype=torch.float64)},
    )


def bench_history(
    windows: int, modes: Sequence[str] = ("memory", "files"), layers: int = 94, experts: int = 128
) -> None:
    names = [f"model.layers.{i}.mlp.gate" for i in range(layers)]
    checkpoints = sorted({min(1000, windows), windows})
    print(f"\n## history: {layers} layers x {experts} experts, memory (tracemalloc) and pickled state_dict")
    print(f"{'mode':8s} {'windows':>8s} {'held MB':>8s} {'peak MB':>8s} {'state KB':>9s} {'files MB':>9s} {'s':>6s}")
    import pandas  # noqa: F401  (imported before tracing: module objects are not history)
    import pyarrow.parquet  # noqa: F401

    for mode in modes:
        with tempfile.TemporaryDirectory() as directory:
            generator = torch.Generator().manual_seed(0)
            tracemalloc.start()
            start = time.perf_counter()
            history = History(names, [experts] * layers, [8] * layers, capacity_factors=(1.0,))
            if mode == "files":
                history.open(directory)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the one eviction warning of the in-memory mode
                for step in range(1, windows + 1):
                    history.append(_window(step, names, experts, generator))
                    if step in checkpoints:
                        state = len(pickle.dumps(history.state_dict()))
                        held, peak = tracemalloc.get_traced_memory()
                        files = sum(
                            os.path.getsize(os.path.join(root, f)) for root, _, fs in os.walk(directory) for f in fs
                        )
                        print(
                            f"{mode:8s} {step:8d} {held / 2**20:8.2f} {peak / 2**20:8.2f} {state / 1024:9.1f} "
                            f"{files / 2**20:9.1f} {time.perf_counter() - start:6.1f}"
                        )
            tracemalloc.stop()
    print(f"keep_windows (default, {layers} x {experts}): {history.keep_windows}")


# ------------------------------------------------------------------------------------------------ hook
def _load_counters(path: str):
    """A counters module from a file (e.g. ``git show main:moe_monitor/counters.py > /tmp/old_counters.py``)."""
    spec = importlib.util.spec_from_file_location("baseline_counters", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def _counters_of(monitor: RouterMonitor, module):
    """The monitor's hooks run ``module``'s ``forward_update`` on ``module``'s ``Layout`` (same buffer layout)."""
    layout = monitor.layout
    monitor.layout = module.Layout(layout.num_experts, layout.coactivation, layout.capacity_factors)
    saved, monitor_module.forward_update = monitor_module.forward_update, module.forward_update
    try:
        yield
    finally:
        monitor.layout, monitor_module.forward_update = layout, saved


def bench_hook(repeats: int, tokens: int, baseline: str | None = None, interleaved: bool = True) -> None:
    old = None if baseline is None else _load_counters(baseline)
    print(f"\n## hook per router forward, T = {tokens} tokens, fp32 on the CPU (CPU time of this thread, medians)")
    print(
        "rounds interleave the gate matmul and every hook variant (caches as a model leaves them; a change in load "
        "hits all alike)"
        if interleaved
        else "each variant's calls back to back (its data and code in the caches)"
    )
    head = f"{'model':16s} {'E':>4s} {'k':>2s} {'d':>5s} {'gate ms':>8s} {'coact':>6s} {'hook ms':>8s} {'% gate':>7s}"
    print(head + (f" {'base ms':>8s} {'% gate':>7s} {'speed-up':>8s}" if old else ""))
    for model_name, (_, experts, top_k, d_model) in SHAPES.items():
        torch.manual_seed(0)
        gate = Gate(d_model, experts, top_k)
        x_TD = torch.randn(tokens, d_model)
        with torch.no_grad():
            output = gate(x_TD)
        variants = {"gate": functools.partial(torch.matmul, x_TD, gate.weight.T)}
        monitors = []
        for coactivation in ("auto", True):
            monitor = RouterMonitor(
                nn.Sequential(gate), routers=[_spec("0", experts, top_k)], coactivation=coactivation
            )
            hook = gate._forward_hooks[next(reversed(gate._forward_hooks))]
            monitors.append((monitor, monitor._coactivation[0]))
            variants[("new", coactivation)] = functools.partial(hook, gate, (x_TD,), output)
            if old is not None:
                variants[("old", coactivation)] = _with_counters(monitor, old, variants[("new", coactivation)])
            if coactivation == "auto" and monitor._coactivation[0]:
                break  # "auto" already counts co-activation: forcing it on times the same
        with torch.no_grad():
            times = _timed_s(variants, repeats, interleaved)
        for monitor, _ in monitors:
            monitor.remove()
        gate_s = times["gate"]
        for (_, on), coactivation in zip(monitors, ("auto", True)):
            hook_s = times[("new", coactivation)]
            row = (
                f"{model_name:16s} {experts:4d} {top_k:2d} {d_model:5d} {1000 * gate_s:8.2f} {str(on):>6s} "
                f"{1000 * hook_s:8.2f} {100 * hook_s / gate_s:6.2f}%"
            )
            if old is not None:
                old_s = times[("old", coactivation)]
                row += f" {1000 * old_s:8.2f} {100 * old_s / gate_s:6.2f}% {old_s / hook_s:7.2f}x"
            print(row)


def _with_counters(monitor: RouterMonitor, module, call):
    def run() -> None:
        with _counters_of(monitor, module):
            call()

    return run


def _timed_s(variants: dict, repeats: int, interleaved: bool = True) -> dict:
    """Median CPU seconds (this thread) per call of each variant.

    Interleaved: rounds that call every variant once, so each hook runs right after the gate matmul or another
    hook has been through the caches (as in a model, where other layers run between two calls of one hook).
    Otherwise each variant's calls back to back: the hook finds its own data and code in the caches.
    """
    for fn in variants.values():
        fn()  # warm-up
    times = {key: [] for key in variants}
    schedule = (
        [key for _ in range(repeats) for key in variants]
        if interleaved
        else [key for key in variants for _ in range(repeats)]
    )
    for key in schedule:
        start = time.thread_time()
        variants[key]()
        times[key].append(time.thread_time() - start)
    return {key: statistics.median(values) for key, values in times.items()}


# ------------------------------------------------------------------------------------------------ collect
def bench_collect(repeats: int) -> None:
    print("\n## collect (reduce, statistics, history append), after one forward per router of 256 tokens")
    print("wall: elapsed; cpu: this thread's CPU time (a shared machine's waits left out); mean includes part writes")
    print(f"{'shape':10s} {'mode':7s} {'wall median':>12s} {'cpu median':>11s} {'cpu mean':>9s} {'cpu max':>8s}")
    for layers, experts, top_k in ((94, 128, 8), (58, 256, 8)):
        torch.manual_seed(0)
        model = nn.Sequential(*[Gate(64, experts, top_k) for _ in range(layers)])
        specs = [_spec(str(i), experts, top_k) for i in range(layers)]
        x_TD = torch.randn(256, 64)
        for mode in ("memory", "files"):
            with tempfile.TemporaryDirectory() as directory:
                monitor = RouterMonitor(model, routers=specs, history_dir=directory if mode == "files" else None)
                wall, cpu = _collect_times(monitor, model, x_TD, repeats)
                monitor.remove()
            print(
                f"{layers}x{experts:<7d} {mode:7s} {1000 * statistics.median(wall):12.2f} "
                f"{1000 * statistics.median(cpu):11.2f} {1000 * statistics.mean(cpu):9.2f} {1000 * max(cpu):8.2f}"
            )


def _collect_times(
    monitor: RouterMonitor, model: nn.Sequential, x_TD: torch.Tensor, repeats: int
) -> tuple[list[float], list[float]]:
    """Wall and CPU (this thread) seconds of each ``collect``, after one forward of every router."""
    wall, cpu = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(repeats + 1):
            with torch.no_grad():
                for gate in model:
                    gate(x_TD)
            start, start_cpu = time.perf_counter(), time.thread_time()
            monitor.collect(step)
            wall.append(time.perf_counter() - start)
            cpu.append(time.thread_time() - start_cpu)
    return wall[1:], cpu[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--windows", type=int, default=10_000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--only", choices=("history", "hook", "collect"))
    parser.add_argument(
        "--hook-order",
        choices=("interleaved", "back-to-back"),
        default="interleaved",
        help="hook section: time the variants in interleaved rounds, or each one's calls back to back",
    )
    parser.add_argument(
        "--baseline",
        help="hook section: also time the hook with the counters module in this file, side by side "
        "(e.g. git show main:moe_monitor/counters.py > /tmp/old_counters.py)",
    )
    parser.add_argument("--history-modes", default="memory,files", help="history section: memory, files or both")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s)")
    if args.only in (None, "hook"):
        bench_hook(args.repeats, args.tokens, args.baseline, args.hook_order == "interleaved")
    if args.only in (None, "collect"):
        bench_collect(max(args.repeats, 60))
    if args.only in (None, "history"):
        bench_history(args.windows, args.history_modes.split(","))


if __name__ == "__main__":
    main()
