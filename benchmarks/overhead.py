"""Training-step overhead of RouterMonitor on the reference model (fwd + bwd + AdamW).

Variants, measured interleaved in one process (one round = ``--steps`` steps of each variant, in rotating order),
each on its own copy of the same model so hooks never have to be re-attached:

- ``none``: no monitor;
- ``every50``: RouterMonitor, ``collect`` every 50 steps;
- ``every1``: RouterMonitor, ``collect`` every step;
- ``every50_nocoact``: ``collect`` every 50 steps, expert co-activation counting off (``coactivation=False``);
- ``naive``: a hook that copies every router's logits to the host each forward and counts there.

Prints each variant's median step time, its ratio to ``none`` (ratio of medians, and the median of the per-round
ratios with a bootstrap 95 % interval of that median and the quartiles of the per-round ratios), and the directly
timed cost of one hook call and one ``collect`` with the overhead they imply.
Targets (CPU, at 1024 tokens per step: ``--batch 8``): every50 <= 1.01x, every1 <= 1.02x.

Usage: ``python benchmarks/overhead.py [--rounds 30] [--steps 10] [--batch 16] [--threads 1] [--preset tiny]
[--clock wall|cpu]`` (``--clock cpu``: the thread's CPU time, for a shared CPU).
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import time

import torch
import torch.nn.functional as F

from moe_monitor import RouterMonitor
from moe_monitor.reference import MoEConfig, MoETransformer


class NaiveMonitor:
    """What the monitor replaces: logits to the host every forward, counted with numpy."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.counts = {}
        self.handles = []
        for name, module in model.named_modules():
            if name.endswith("moe.router"):
                self.handles.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name):
        def hook(module, args, output):
            import numpy as np

            logits = output.logits_TE.detach().cpu().numpy()
            top = np.argsort(-logits, axis=-1)[:, : module.top_k]
            self.counts[name] = self.counts.get(name, 0) + np.bincount(top.reshape(-1), minlength=module.n_experts)

        return hook


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--steps", type=int, default=10)
    # 16 sequences of 128 bytes: the batch `moe-monitor train` trains the tiny preset with.
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    # On a shared CPU the wall clock counts the time a step waits for a core; the thread's CPU time does not (with
    # one torch thread every op of the step runs in this thread). Wall time on a GPU.
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    args = parser.parse_args()
    if args.clock == "cpu" and (args.device != "cpu" or args.threads != 1):
        parser.error("--clock cpu measures the calling thread: use it with --device cpu --threads 1")
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    config = MoEConfig.from_preset(args.preset)
    base = MoETransformer(config).to(device)
    tokens = torch.randint(0, config.vocab_size, (args.batch, config.seq_len + 1), device=device)

    variants = {}
    for name in ("none", "every50", "every1", "every50_nocoact", "naive"):
        model = copy.deepcopy(base)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        monitor = None
        if name.startswith("every"):
            monitor = RouterMonitor(model, coactivation=not name.endswith("nocoact"))
        if name == "naive":
            NaiveMonitor(model)
        variants[name] = dict(model=model, optimizer=optimizer, monitor=monitor, step=0, times=[])

    def run_round(v, name):
        model, optimizer, monitor = v["model"], v["optimizer"], v["monitor"]
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = clock()
        for _ in range(args.steps):
            out = model(tokens[:, :-1])
            loss = F.cross_entropy(out.logits.flatten(0, 1), tokens[:, 1:].flatten()) + out.aux_loss + out.z_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            v["step"] += 1
            if monitor is not None and (name == "every1" or v["step"] % 50 == 0):
                monitor.collect(v["step"])
        if device.type == "cuda":
            torch.cuda.synchronize()
        return clock() - start

    names = list(variants)
    for name in names:  # warm-up round, not timed
        run_round(variants[name], name)
    paired = {name: [] for name in names}
    for r in range(args.rounds):
        # Rotate the order so no variant always runs right after another; ratios are taken within a round,
        # between runs seconds apart, which cancels most of the drift of a shared machine's load.
        order = names[r % len(names) :] + names[: r % len(names)]
        times = {name: run_round(variants[name], name) for name in order}
        for name in names:
            variants[name]["times"].append(times[name])
            paired[name].append(times[name] / times["none"])

    # Direct timings of the two pieces the monitor adds, far less noisy than whole steps on a shared CPU.
    monitored = variants["every1"]
    monitor = monitored["monitor"]
    layer = monitor.layers[0]
    captured = []
    handle = layer.module.register_forward_hook(lambda m, a, o: captured.append((a, o)))
    with torch.no_grad():
        monitored["model"](tokens[:, :-1])
    handle.remove()
    hook = next(iter(layer.module._forward_hooks.values()))
    hook_ms = _median_ms(lambda: hook(layer.module, *captured[0]), device, clock)
    collect_ms = _median_ms(lambda: monitor.collect(0), device, clock)

    base_time = statistics.median(variants["none"]["times"]) / args.steps
    print(
        f"preset={args.preset} batch={args.batch} tokens/step={args.batch * config.seq_len} "
        f"layers={len(monitor.layers)} experts={config.n_experts} top_k={config.top_k} device={device} "
        f"threads={args.threads} rounds={args.rounds} x {args.steps} steps clock={args.clock}"
    )
    print(
        f"{'variant':16s} {'ms/step':>9s} {'ratio of medians':>17s} {'median paired ratio':>20s} "
        f"{'95% CI of median':>17s} {'quartiles':>13s}"
    )
    for name in names:
        median = statistics.median(variants[name]["times"]) / args.steps
        low, high = _median_ci(paired[name])
        q1, _, q3 = statistics.quantiles(paired[name], n=4)
        print(
            f"{name:16s} {1000 * median:9.3f} {median / base_time:17.3f} {statistics.median(paired[name]):20.3f} "
            f"{low:8.3f}-{high:.3f} {q1:6.3f}-{q3:.3f}"
        )
    per_step = len(monitor.layers) * hook_ms
    print(
        f"hook: {hook_ms:.3f} ms per router forward; collect: {collect_ms:.3f} ms. Estimated overhead from these: "
        f"every50 {1 + (per_step + collect_ms / 50) / (1000 * base_time):.4f}x, "
        f"every1 {1 + (per_step + collect_ms) / (1000 * base_time):.4f}x"
    )


def _median_ci(values: list[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Bootstrap 95 % interval of the median of ``values`` (how far another run's median may fall)."""
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    return medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]


def _median_ms(fn, device: torch.device, clock=time.perf_counter, repeats: int = 200) -> float:
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(clock() - start)
    return 1000 * statistics.median(times)


if __name__ == "__main__":
    main()
