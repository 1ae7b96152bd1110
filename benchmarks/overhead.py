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

``--ci-halfwidth 0.004`` keeps adding rounds (up to ``--max-rounds``) until the 95 % interval of every monitored
variant's median paired ratio is at most that wide on each side, so that a target 1 point away is resolved; it
prints the half-widths reached.

``--instructions`` measures instead the deterministic count of instructions executed (valgrind's callgrind, with
instrumentation on only around the measured steps): ``--steps`` steps without a monitor, the same steps with the
monitor's hooks, and one ``collect``, each counted once, in one process under valgrind. The ratios it prints are
``(hooks + collect / 50) / none`` and ``(hooks + collect) / none`` per step. Instructions do not count cache misses
or memory stalls, which is what wall and CPU time add; the two measures together bound the overhead. Needs
``valgrind`` and a C compiler (for the four-function callgrind control library it builds in a temporary folder);
9 minutes at ``--batch 2 --steps 1`` and 46 at ``--batch 8 --steps 3`` on a loaded 2-core machine, mostly the import
of torch and the warm-up steps under valgrind.

Usage: ``python benchmarks/overhead.py [--rounds 30] [--steps 10] [--batch 16] [--threads 1] [--preset tiny]
[--clock wall|cpu] [--ci-halfwidth H --max-rounds 400] [--instructions]`` (``--clock cpu``: the thread's CPU time,
for a shared CPU).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
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


def _parse_args() -> argparse.Namespace:
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
    parser.add_argument("--ci-halfwidth", type=float, help="add rounds until every 95 %% interval is this narrow")
    parser.add_argument("--max-rounds", type=int, default=400)
    parser.add_argument("--instructions", action="store_true", help="count instructions under callgrind instead")
    parser.add_argument("--callgrind-child", help=argparse.SUPPRESS)  # the control library, in the child
    args = parser.parse_args()
    if args.clock == "cpu" and (args.device != "cpu" or args.threads != 1):
        parser.error("--clock cpu measures the calling thread: use it with --device cpu --threads 1")
    if args.instructions and args.device != "cpu":
        parser.error("--instructions counts CPU instructions: use it with --device cpu")
    return args


def main() -> None:
    args = _parse_args()
    if args.instructions and args.callgrind_child is None:
        _instructions_parent(args)
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    config = MoEConfig.from_preset(args.preset)
    base = MoETransformer(config).to(device)
    tokens = torch.randint(0, config.vocab_size, (args.batch, config.seq_len + 1), device=device)
    names = ("none", "hooks") if args.callgrind_child else ("none", "every50", "every1", "every50_nocoact", "naive")
    variants = {name: _variant(name, base) for name in names}
    if args.callgrind_child:
        _instructions_child(args, variants, tokens)
        return
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter

    def run_round(v, name):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = clock()
        _steps(v, name, tokens, args.steps)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return clock() - start

    for name in names:  # warm-up round, not timed
        run_round(variants[name], name)
    paired = {name: [] for name in names}
    monitored = [name for name in names if name.startswith("every")]
    rounds = 0
    while rounds < args.rounds or (
        args.ci_halfwidth is not None
        and rounds < args.max_rounds
        and max(_halfwidth(paired[name]) for name in monitored) > args.ci_halfwidth
    ):
        # Rotate the order so no variant always runs right after another; ratios are taken within a round,
        # between runs seconds apart, which cancels most of the drift of a shared machine's load.
        order = names[rounds % len(names) :] + names[: rounds % len(names)]
        times = {name: run_round(variants[name], name) for name in order}
        for name in names:
            variants[name]["times"].append(times[name])
            paired[name].append(times[name] / times["none"])
        rounds += 1

    # Direct timings of the two pieces the monitor adds, far less noisy than whole steps on a shared CPU.
    hook_ms, collect_ms, monitor = _direct_ms(variants["every1"], tokens, device, clock)

    base_time = statistics.median(variants["none"]["times"]) / args.steps
    print(
        f"preset={args.preset} batch={args.batch} tokens/step={args.batch * config.seq_len} "
        f"layers={len(monitor.layers)} experts={config.n_experts} top_k={config.top_k} device={device} "
        f"threads={args.threads} rounds={rounds} x {args.steps} steps clock={args.clock}"
    )
    print(
        f"{'variant':16s} {'ms/step':>9s} {'ratio of medians':>17s} {'median paired ratio':>20s} "
        f"{'95% CI of median':>17s} {'half-width':>10s} {'quartiles':>13s}"
    )
    for name in names:
        median = statistics.median(variants[name]["times"]) / args.steps
        low, high = _median_ci(paired[name])
        q1, _, q3 = statistics.quantiles(paired[name], n=4)
        print(
            f"{name:16s} {1000 * median:9.3f} {median / base_time:17.3f} {statistics.median(paired[name]):20.3f} "
            f"{low:8.3f}-{high:.3f} {(high - low) / 2:10.4f} {q1:6.3f}-{q3:.3f}"
        )
    if args.ci_halfwidth is not None:
        widest = max(_halfwidth(paired[name]) for name in monitored)
        verdict = "reached" if widest <= args.ci_halfwidth else f"NOT reached in {args.max_rounds} rounds"
        print(f"CI half-width target {args.ci_halfwidth:.4f}: {verdict} (widest {widest:.4f})")
    per_step = len(monitor.layers) * hook_ms
    print(
        f"hook: {hook_ms:.3f} ms per router forward; collect: {collect_ms:.3f} ms. Estimated overhead from these: "
        f"every50 {1 + (per_step + collect_ms / 50) / (1000 * base_time):.4f}x, "
        f"every1 {1 + (per_step + collect_ms) / (1000 * base_time):.4f}x"
    )


def _variant(name: str, base: torch.nn.Module) -> dict:
    """A copy of the model with its optimizer and the variant's monitor (``hooks``: a monitor never collected)."""
    model = copy.deepcopy(base)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    monitor = None
    if name.startswith("every") or name == "hooks":
        monitor = RouterMonitor(model, coactivation=not name.endswith("nocoact"))
    if name == "naive":
        NaiveMonitor(model)
    return dict(model=model, optimizer=optimizer, monitor=monitor, step=0, times=[])


def _steps(v: dict, name: str, tokens: torch.Tensor, steps: int) -> None:
    model, optimizer, monitor = v["model"], v["optimizer"], v["monitor"]
    for _ in range(steps):
        out = model(tokens[:, :-1])
        loss = F.cross_entropy(out.logits.flatten(0, 1), tokens[:, 1:].flatten()) + out.aux_loss + out.z_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        v["step"] += 1
        if name.startswith("every") and (name == "every1" or v["step"] % 50 == 0):
            monitor.collect(v["step"])


def _direct_ms(v: dict, tokens: torch.Tensor, device: torch.device, clock) -> tuple[float, float, RouterMonitor]:
    """Median ms of one hook call (the first router's, on a captured forward) and of one ``collect``."""
    monitor = v["monitor"]
    layer = monitor.layers[0]
    captured = []
    handle = layer.module.register_forward_hook(lambda m, a, o: captured.append((a, o)))
    with torch.no_grad():
        v["model"](tokens[:, :-1])
    handle.remove()
    hook = next(iter(layer.module._forward_hooks.values()))
    hook_ms = _median_ms(lambda: hook(layer.module, *captured[0]), device, clock)
    return hook_ms, _median_ms(lambda: monitor.collect(0), device, clock), monitor


# ------------------------------------------------------------------------------------------- instruction counts
_CALLGRIND_CONTROL = """
#include <valgrind/callgrind.h>
void cg_start(void) { CALLGRIND_START_INSTRUMENTATION; }
void cg_stop(void) { CALLGRIND_STOP_INSTRUMENTATION; }
void cg_zero(void) { CALLGRIND_ZERO_STATS; }
void cg_dump(const char *name) { CALLGRIND_DUMP_STATS_AT(name); }
"""


def _instructions_parent(args: argparse.Namespace) -> None:
    """Runs this script under callgrind (instrumentation off but around the measured parts) and reads the counts."""
    for tool in ("valgrind", "cc"):
        if shutil.which(tool) is None:
            sys.exit(f"--instructions needs {tool!r} on the PATH (e.g. apt-get install valgrind gcc)")
    with tempfile.TemporaryDirectory() as directory:
        source, library = os.path.join(directory, "cg.c"), os.path.join(directory, "libcg.so")
        with open(source, "w") as file:
            file.write(_CALLGRIND_CONTROL)
        subprocess.run(["cc", "-O1", "-shared", "-fPIC", "-o", library, source], check=True)
        child = [a for a in sys.argv[1:] if a != "--instructions"]
        command = [
            "valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={directory}/cg.out",
            sys.executable, os.path.abspath(__file__), *child, "--instructions", "--callgrind-child", library,
        ]  # fmt: skip
        start = time.perf_counter()
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONHASHSEED="0")
        subprocess.run(command, check=True, env=env, stderr=subprocess.DEVNULL)
        counts = {}
        for name in os.listdir(directory):
            if name.startswith("cg.out."):
                with open(os.path.join(directory, name)) as file:
                    text = file.read()
                label = re.search(r"^desc: Trigger: Client Request: (\S+)", text, re.M)
                total = re.search(r"^(?:summary|totals): (\d+)", text, re.M)
                if label and total:
                    counts[label.group(1)] = int(total.group(1))
    none, hooks, collect = counts["none"], counts["hooks"], counts["collect"]
    print(
        f"instructions (callgrind), preset={args.preset} batch={args.batch} steps={args.steps}: "
        f"{time.perf_counter() - start:.0f} s under valgrind"
    )
    print(f"no monitor: {none / args.steps:,.0f} per step; with the hooks: {hooks / args.steps:,.0f} per step")
    print(f"hooks: {(hooks - none) / args.steps:,.0f} per step; one collect: {collect:,.0f}")
    every50, every1 = (hooks + args.steps * collect / 50) / none, (hooks + args.steps * collect) / none
    print(f"every50 {every50:.4f}x, every1 {every1:.4f}x")


def _instructions_child(args: argparse.Namespace, variants: dict, tokens: torch.Tensor) -> None:
    control = ctypes.CDLL(args.callgrind_child)
    for name, v in variants.items():
        _steps(v, name, tokens, 2)  # warm-up: first-call allocations and caches are not the steady state
    pieces = [(name, lambda name=name: _steps(variants[name], name, tokens, args.steps)) for name in variants]
    pieces.append(("collect", lambda: variants["hooks"]["monitor"].collect(0)))
    for label, run in pieces:
        control.cg_start()
        control.cg_zero()
        run()
        control.cg_dump(label.encode())
        control.cg_stop()


def _halfwidth(values: list[float]) -> float:
    if len(values) < 5:
        return float("inf")
    low, high = _median_ci(values, resamples=500)
    return (high - low) / 2


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
