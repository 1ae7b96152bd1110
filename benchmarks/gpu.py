"""GPU proof in one call (under 10 minutes on one GPU): throughput, monitor overhead, the CUDA tests, HF Mixtral.

Sections, in order (``--sections`` picks some; each prints its own table and a PASS/FAIL line where it checks
something):

1. ``tokens``: training tokens/s (forward, backward, AdamW) of the reference presets under bf16 autocast, with the
   experts' ``loop`` and ``grouped`` (``torch._grouped_mm``) dispatch.
2. ``overhead``: step time with no monitor, ``RouterMonitor`` with ``collect`` every 50 steps and every step, and a
   naive monitor that copies every router's logits to the host each forward (``benchmarks/overhead.py``), interleaved
   rounds in one process; ratios to no monitor (median of the per-round ratios) and their spread (min-max).
   MoEWatch (``pip install moewatch``) is not driven here: this script has no adapter for its API, so it prints
   whether it is installed and leaves it out.
3. ``tests``: the test suite's CUDA tests (``tests/monitor/test_cuda.py``: training steps under
   ``torch.cuda.set_sync_debug_mode("error")`` and more, and the sync test of ``test_monitor_hooks.py``), through
   pytest in a subprocess. Skipped with ``--device cpu`` (they skip without CUDA).
4. ``hf``: a tiny random-weight Hugging Face Mixtral on the device, bf16 autocast, a few AdamW steps: the monitor's
   counts of one forward against a top-k of the model's own ``output_router_logits``, recomputed here.

``--device cpu --quick`` runs every section but ``tests`` in seconds: the CPU-side logic of the script is tested
(``tests/monitor/test_cuda.py``) so nothing in it runs for the first time on a GPU.

Usage: ``python benchmarks/gpu.py [--device cuda] [--quick] [--sections tokens,overhead,tests,hf]``
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from overhead import NaiveMonitor  # noqa: E402  (the naive monitor lives beside this script)

from moe_monitor import RouterMonitor  # noqa: E402
from moe_monitor.reference import MoEConfig, MoETransformer  # noqa: E402

SECTIONS = ("tokens", "overhead", "tests", "hf")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_TESTS = (
    "tests/monitor/test_cuda.py",
    "tests/monitor/test_monitor_hooks.py::test_hooks_never_synchronise_with_the_host",
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few steps (a test of the script)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    args = parser.parse_args(argv)
    args.sections = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    return args


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16)


def set_dispatch(model: torch.nn.Module, dispatch: str) -> int:
    """Sets the experts' dispatch mode of every MoE layer; returns how many were set."""
    count = 0
    for module in model.modules():
        if hasattr(module, "dispatch") and isinstance(module.dispatch, str):
            module.dispatch = dispatch
            count += 1
    return count


def make_step(model: MoETransformer, tokens_BS: torch.Tensor, device: torch.device) -> Callable[[], None]:
    """One training step (bf16 autocast forward, backward, AdamW) of ``model`` on a fixed batch."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step() -> None:
        with _autocast(device):
            out = model(tokens_BS[:, :-1])
            logits = out.logits.float().flatten(0, 1)
            loss = F.cross_entropy(logits, tokens_BS[:, 1:].flatten()) + out.aux_loss + out.z_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def _time(step: Callable[[], None], steps: int, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - start) / steps


QUICK = dict(seq_len=16, n_layers=2, d_model=32, n_heads=2, d_expert=32)  # --quick: seconds on a CPU


def bench_tokens(device: torch.device, quick: bool) -> list[dict]:
    presets = {"tiny": 2} if quick else {"tiny": 32, "small": 32, "base": 16}
    steps, warmup = (1, 1) if quick else (20, 3)
    rows = []
    print("\n## tokens/s, bf16 autocast, forward + backward + AdamW")
    print(f"{'preset':8s} {'dispatch':9s} {'batch':>5s} {'ms/step':>9s} {'tokens/s':>12s}")
    for preset, batch in presets.items():
        config = MoEConfig.from_preset(preset, **(QUICK if quick else {}))
        torch.manual_seed(0)
        base = MoETransformer(config).to(device)
        tokens_BS = torch.randint(0, config.vocab_size, (batch, config.seq_len + 1), device=device)
        for dispatch in ("loop", "grouped"):
            model = copy.deepcopy(base)
            set_dispatch(model, dispatch)
            step = make_step(model, tokens_BS, device)
            for _ in range(warmup):
                step()
            seconds = _time(step, steps, device)
            row = dict(preset=preset, dispatch=dispatch, batch=batch, ms=1000 * seconds,
                       tokens_per_s=batch * config.seq_len / seconds)
            rows.append(row)
            print(f"{preset:8s} {dispatch:9s} {batch:5d} {row['ms']:9.2f} {row['tokens_per_s']:12,.0f}")
    return rows


def bench_overhead(device: torch.device, quick: bool) -> dict[str, dict]:
    preset, batch = ("tiny", 2) if quick else ("base", 16)
    rounds, steps = (2, 1) if quick else (8, 25)
    config = MoEConfig.from_preset(preset, **(QUICK if quick else {}))
    torch.manual_seed(0)
    base = MoETransformer(config).to(device)
    tokens_BS = torch.randint(0, config.vocab_size, (batch, config.seq_len + 1), device=device)
    variants: dict[str, dict] = {}
    for name in ("none", "every50", "every1", "naive"):
        model = copy.deepcopy(base)
        monitor = RouterMonitor(model) if name.startswith("every") else None
        if name == "naive":
            NaiveMonitor(model)
        variants[name] = dict(step=make_step(model, tokens_BS, device), monitor=monitor, count=0, times=[])

    def run(name: str) -> float:
        v = variants[name]
        _sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            v["step"]()
            v["count"] += 1
            if v["monitor"] is not None and (name == "every1" or v["count"] % 50 == 0):
                v["monitor"].collect(v["count"])
        _sync(device)
        return (time.perf_counter() - start) / steps

    names = list(variants)
    for name in names:
        run(name)  # warm-up
    ratios: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        times = {name: run(name) for name in order}
        for name in names:
            variants[name]["times"].append(times[name])
            ratios[name].append(times[name] / times["none"])
    print(f"\n## monitor overhead: preset {preset}, batch {batch}, bf16, {rounds} rounds x {steps} steps, interleaved")
    print(f"{'variant':8s} {'ms/step':>9s} {'paired ratio':>13s} {'min-max':>15s}")
    results = {}
    for name in names:
        ms = 1000 * statistics.median(variants[name]["times"])
        ratio = statistics.median(ratios[name])
        results[name] = dict(ms=ms, ratio=ratio, low=min(ratios[name]), high=max(ratios[name]))
        print(f"{name:8s} {ms:9.2f} {ratio:13.3f} {min(ratios[name]):7.3f}-{max(ratios[name]):.3f}")
    try:
        import moewatch  # noqa: F401
    except ModuleNotFoundError:
        print("MoEWatch: not installed, not measured")
    else:
        print("MoEWatch: installed, not measured (this script has no adapter for its API)")
    return results


def cuda_test_command(python: str = sys.executable) -> list[str]:
    """The pytest command of the ``tests`` section (run from the repository root)."""
    return [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", *CUDA_TESTS]


def run_cuda_tests(device: torch.device) -> int | None:
    """Runs the CUDA tests in a subprocess; ``None`` (skipped) off CUDA."""
    print("\n## CUDA tests:", " ".join(cuda_test_command("python")))
    if device.type != "cuda":
        print("skipped: not on a CUDA device")
        return None
    result = subprocess.run(cuda_test_command(), cwd=ROOT, timeout=300)
    print("PASS" if result.returncode == 0 else f"FAIL (pytest exit code {result.returncode})")
    return result.returncode


def hf_mixtral(device: torch.device, quick: bool) -> bool | None:
    """Tiny Mixtral on ``device``: the monitor's counts against the model's own router logits; ``None`` without
    transformers."""
    print("\n## Hugging Face Mixtral (tiny random config), bf16 autocast")
    try:
        import transformers
    except ModuleNotFoundError:
        print('skipped: transformers is not installed (pip install "moe-monitor[hf]")')
        return None
    torch.manual_seed(0)
    width = 32 if quick else 64
    config = transformers.MixtralConfig(
        vocab_size=128, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
    )  # fmt: skip
    model = transformers.MixtralForCausalLM(config).to(device)
    monitor = RouterMonitor(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids_BS = torch.randint(0, 128, (4, 16), device=device)
    for _ in range(1 if quick else 10):
        with _autocast(device):
            loss = model(ids_BS, labels=ids_BS).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    monitor.collect(step=1)
    with torch.no_grad(), _autocast(device), monitor.phase("check"):
        out = model(ids_BS, output_router_logits=True)
    snap = monitor.collect(step=2, phase="check")
    expected = []
    for logits_TE in out.router_logits:
        idx_A = torch.softmax(logits_TE.float(), -1).topk(2, -1).indices.reshape(-1).cpu()
        expected.append(torch.zeros(8, dtype=torch.int64).index_add_(0, idx_A, torch.ones_like(idx_A)).tolist())
    ok = snap.counts.tolist() == expected and snap.tokens.tolist() == [64, 64]
    print(f"routers: {[layer.name for layer in monitor.layers]}; counts {snap.counts.tolist()}")
    print("PASS: counts equal a top-k of output_router_logits" if ok else f"FAIL: expected counts {expected}")
    monitor.remove()
    return ok


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    start = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    quick = " (quick)" if args.quick else ""
    print(f"device {name}, torch {torch.__version__}, sections {','.join(args.sections)}{quick}")
    failures = []
    if "tokens" in args.sections:
        bench_tokens(device, args.quick)
    if "overhead" in args.sections:
        bench_overhead(device, args.quick)
    if "tests" in args.sections and run_cuda_tests(device) not in (0, None):
        failures.append("tests")
    if "hf" in args.sections and hf_mixtral(device, args.quick) is False:
        failures.append("hf")
    verdict = "FAILED: " + ", ".join(failures) if failures else "all checks passed"
    print(f"\ndone in {time.perf_counter() - start:.0f} s; {verdict}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
