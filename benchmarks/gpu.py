"""GPU proof in one call (under 8 minutes on one H200): the CUDA tests, HF Mixtral, throughput, monitor overhead.

Sections, in this order (``--sections`` picks some; the correctness checks go first, so that a tight budget cuts
the benchmarks, not the proof):

1. ``tests``: every test file of the suite that runs something on CUDA when it is there (found by
   :func:`cuda_test_files`: a ``skipif(not torch.cuda.is_available())`` mark or a device picked by
   ``torch.cuda.is_available()``), through pytest in a subprocess: the training steps under
   ``torch.cuda.set_sync_debug_mode("error")``, CUDA counts against CPU counts, Megatron-Core's CUDA forward,
   Lightning runs with the controllers on a GPU (32-bit, ``bf16-true``, ``FSDPStrategy``). On CUDA the section
   passes only if nothing failed and nothing was skipped (a skip there means a missing package or device).
   Skipped with ``--device cpu``.
2. ``hf``: a tiny random-weight Hugging Face Mixtral on the device, bf16 autocast, a few AdamW steps: the monitor's
   counts of one forward against a top-k of the model's own ``output_router_logits``.
3. ``tokens``: training tokens/s (forward, backward, AdamW) of the reference presets under bf16 autocast, with the
   experts' ``loop`` and ``grouped`` (``torch._grouped_mm``) dispatch; passes if both dispatches give the same
   first-step loss (bf16 tolerance).
4. ``overhead``: step time of the reference model with no monitor; ours (``RouterMonitor`` + ``CollapseDetector``,
   a window every 50 steps and every step); a naive monitor that copies every router's logits to the host each
   forward (``benchmarks/overhead.py``); and MoEWatch at its default cadence and every step when it is installed
   (the adapter of ``benchmarks/peers.py``). Interleaved rounds in one process; ratios to no monitor (median of the
   per-round ratios) and their spread (min-max). Passes if ours counted every token.

Each section ends with one line ``[name] PASS|FAIL|SKIP|OVER (seconds): detail``; the last lines are one summary
line per section and the total wall time. ``OVER`` is a section left out because the time budget (``--budget``)
would not hold it; it fails the run like ``FAIL``. ``SKIP`` (``tests`` off CUDA, ``hf`` without transformers) does
not. ``--json PATH`` writes every number (rewritten after each section, so a killed run keeps what it measured).
Exit status: 0 if no section failed or ran over, else 1.

``--device cpu --quick`` runs every section but ``tests`` in seconds: the CPU side of the script is tested
(``tests/monitor/test_cuda.py``, ``tests/benchmarks/test_device_scripts.py``) so nothing in it runs for the first
time on a GPU. ``benchmarks/device/run.sh`` is the command that runs it on the device machine.

Usage: ``python benchmarks/gpu.py [--device cuda] [--quick] [--sections tests,hf,tokens,overhead] [--budget 420]
[--json gpu.json] [--tests-k EXPR]`` (``--tests-k``: only the CUDA tests matching a pytest ``-k`` expression, for a
rerun of the ones that failed).
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from overhead import NaiveMonitor  # noqa: E402  (the naive monitor lives beside this script)
from peers import Tool, moewatch, ours  # noqa: E402  (the MoEWatch adapter and ours, as benchmarks/peers.py runs them)

from moe_monitor import RouterMonitor  # noqa: E402
from moe_monitor.reference import MoEConfig, MoETransformer  # noqa: E402

SECTIONS = ("tests", "hf", "tokens", "overhead")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Seconds each section is expected to take on one H200 (full sizes), counted before starting it against the budget:
# tests ~4 pytest files with 7 Lightning runs and their imports; tokens 3 presets x 2 dispatches x 23 steps;
# overhead 6 variants x 9 rounds x 25 steps of the base preset (MoEWatch every step copies to the host each forward).
ESTIMATE_S = {"tests": 150, "hf": 20, "tokens": 40, "overhead": 120}
QUICK_ESTIMATE_S = {"tests": 90, "hf": 10, "tokens": 10, "overhead": 10}
# A file runs something on CUDA when it is there: a skip mark for machines without CUDA, or a device chosen by it.
CUDA_MARK = re.compile(r"not torch\.cuda\.is_available\(\)|[\"']cuda[\"'] if torch\.cuda\.is_available\(\)")
# bf16 matmuls with fp32 accumulation in a different order: the loop and grouped dispatch agree to a few 1e-3.
LOSS_TOLERANCE = 2e-2
# Packages whose versions the report records (the device image's may differ from the ones tested here).
VERSIONED = ("torch", "lightning", "transformers", "megatron-core", "moewatch", "pandas", "pyarrow", "numpy", "triton")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few steps (a test of the script)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument(
        "--budget", type=float, default=420.0,
        help="seconds for the whole run; a section whose estimate no longer fits is left out (OVER)",
    )  # fmt: skip
    parser.add_argument("--json", default=None, help="write every number to this JSON file")
    parser.add_argument("--tests-k", default=None, help="pytest -k expression for the tests section (a rerun)")
    args = parser.parse_args(argv)
    args.sections = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    if not args.budget > 0:
        parser.error(f"--budget {args.budget} must be a positive number of seconds")
    return args


@dataclass
class Outcome:
    """What a section found: ``status`` PASS / FAIL / SKIP / OVER, a one-line ``detail`` and its numbers."""

    status: str
    detail: str
    results: Any = None
    seconds: float = 0.0


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


def make_step(model: MoETransformer, tokens_BS: torch.Tensor, device: torch.device) -> Callable[[], torch.Tensor]:
    """One training step (bf16 autocast forward, backward, AdamW) of ``model`` on a fixed batch; returns the loss
    (a device tensor: reading it is the caller's choice)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step() -> torch.Tensor:
        with _autocast(device):
            out = model(tokens_BS[:, :-1])
            logits = out.logits.float().flatten(0, 1)
            loss = F.cross_entropy(logits, tokens_BS[:, 1:].flatten()) + out.aux_loss + out.z_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def _time(step: Callable[[], Any], steps: int, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - start) / steps


QUICK = dict(seq_len=16, n_layers=2, d_model=32, n_heads=2, d_expert=32)  # --quick: seconds on a CPU


def bench_tokens(device: torch.device, quick: bool) -> Outcome:
    presets = {"tiny": 2} if quick else {"tiny": 32, "small": 32, "base": 16}
    steps, warmup = (1, 1) if quick else (20, 3)
    rows = []
    print("\n## tokens/s, bf16 autocast, forward + backward + AdamW")
    print(f"{'preset':8s} {'dispatch':9s} {'batch':>5s} {'ms/step':>9s} {'tokens/s':>12s} {'first loss':>11s}")
    for preset, batch in presets.items():
        config = MoEConfig.from_preset(preset, **(QUICK if quick else {}))
        torch.manual_seed(0)
        base = MoETransformer(config).to(device)
        tokens_BS = torch.randint(0, config.vocab_size, (batch, config.seq_len + 1), device=device)
        for dispatch in ("loop", "grouped"):
            model = copy.deepcopy(base)
            set_dispatch(model, dispatch)
            step = make_step(model, tokens_BS, device)
            first_loss = float(step())  # same weights and batch for both dispatches: the same loss
            for _ in range(warmup - 1):
                step()
            seconds = _time(step, steps, device)
            row = dict(preset=preset, dispatch=dispatch, batch=batch, ms=1000 * seconds,
                       tokens_per_s=batch * config.seq_len / seconds, first_loss=first_loss)  # fmt: skip
            rows.append(row)
            print(f"{preset:8s} {dispatch:9s} {batch:5d} {row['ms']:9.2f} {row['tokens_per_s']:12,.0f} "
                  f"{first_loss:11.5f}")  # fmt: skip
    return judge_tokens(rows)


def judge_tokens(rows: list[dict]) -> Outcome:
    """PASS when every preset's loop and grouped dispatch gave the same first-step loss and a finite rate.

    Example:
        >>> rows = [dict(preset="tiny", dispatch=d, tokens_per_s=1e5, first_loss=5.0) for d in ("loop", "grouped")]
        >>> judge_tokens(rows).status
        'PASS'
        >>> judge_tokens([rows[0], {**rows[1], "first_loss": 5.5}]).detail
        'tiny: loss loop 5.00000 vs grouped 5.50000'
    """
    problems = []
    for preset in dict.fromkeys(row["preset"] for row in rows):
        loop, grouped = (next(r for r in rows if r["preset"] == preset and r["dispatch"] == d) for d in
                         ("loop", "grouped"))  # fmt: skip
        if not all(math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0 for r in (loop, grouped)):
            problems.append(f"{preset}: no finite tokens/s")
        if not abs(loop["first_loss"] - grouped["first_loss"]) <= LOSS_TOLERANCE * abs(loop["first_loss"]):
            problems.append(f"{preset}: loss loop {loop['first_loss']:.5f} vs grouped {grouped['first_loss']:.5f}")
    best = max(rows, key=lambda r: r["tokens_per_s"])
    detail = "; ".join(problems) or f"best {best['tokens_per_s']:,.0f} tokens/s ({best['preset']} {best['dispatch']})"
    return Outcome("FAIL" if problems else "PASS", detail, rows)


def _plain(name: str, attach: Callable[[torch.nn.Module], Any]) -> Tool:
    return Tool(name, attach, lambda state, step: [], lambda state: None)


def overhead_tools() -> dict[str, Tool]:
    """The variants of the overhead section; MoEWatch's only when it is installed."""
    tools = {
        "none": _plain("none", lambda model: None),
        "every50": ours(50),
        "every1": ours(1),
        "naive": _plain("naive", NaiveMonitor),
    }
    try:
        tools.update(moewatch=moewatch(every_step=False), moewatch1=moewatch(every_step=True))
    except ModuleNotFoundError:
        print("MoEWatch: not installed (pip install --no-deps moewatch==0.1.0), not measured")
    return tools


def bench_overhead(device: torch.device, quick: bool) -> Outcome:
    preset, batch = ("tiny", 2) if quick else ("base", 16)
    rounds, steps = (2, 1) if quick else (8, 25)
    config = MoEConfig.from_preset(preset, **(QUICK if quick else {}))
    torch.manual_seed(0)
    base = MoETransformer(config).to(device)
    tokens_BS = torch.randint(0, config.vocab_size, (batch, config.seq_len + 1), device=device)
    variants: dict[str, dict] = {}
    for name, tool in overhead_tools().items():
        model = copy.deepcopy(base)
        state = tool.attach(model)
        variants[name] = dict(step=make_step(model, tokens_BS, device), tool=tool, state=state, count=0, times=[])

    def run(name: str) -> float:
        v = variants[name]
        _sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            v["step"]()
            v["count"] += 1
            v["tool"].after_step(v["state"], v["count"])
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
    print(f"{'variant':10s} {'ms/step':>9s} {'paired ratio':>13s} {'min-max':>15s}")
    results = {}
    for name in names:
        ms = 1000 * statistics.median(variants[name]["times"])
        ratio = statistics.median(ratios[name])
        results[name] = dict(ms=ms, ratio=ratio, low=min(ratios[name]), high=max(ratios[name]))
        print(f"{name:10s} {ms:9.2f} {ratio:13.3f} {min(ratios[name]):7.3f}-{max(ratios[name]):.3f}")
    # Ours must have counted every token of every step since its last window (all routers see the whole batch).
    monitor = variants["every50"]["state"][0]
    tokens = monitor.collect(variants["every50"]["count"] + 1).tokens.tolist()
    since_window = variants["every50"]["count"] % 50
    want = [since_window * batch * config.seq_len] * config.n_layers
    for v in variants.values():
        v["tool"].detach(v["state"])
    ok = tokens == want and all(math.isfinite(r["ratio"]) for r in results.values())
    detail = ", ".join(f"{name} {r['ratio']:.3f}x" for name, r in results.items() if name != "none")
    return Outcome("PASS" if ok else "FAIL", detail if ok else f"counted tokens {tokens}, expected {want}", results)


def cuda_test_files(root: str = ROOT) -> list[str]:
    """Every test file under ``tests/`` that runs something on CUDA when it is there, relative to ``root``.

    Example:
        >>> files = cuda_test_files()
        >>> "tests/monitor/test_cuda.py" in files and "tests/reference/test_cli.py" not in files
        True
    """
    found = []
    for folder, _, names in os.walk(os.path.join(root, "tests")):
        for name in names:
            if name.startswith("test_") and name.endswith(".py"):
                path = os.path.join(folder, name)
                with open(path, encoding="utf-8") as file:
                    if CUDA_MARK.search(file.read()):
                        found.append(os.path.relpath(path, root).replace(os.sep, "/"))
    return sorted(found)


def cuda_test_command(
    files: Sequence[str], junit: str, keyword: str | None = None, python: str = sys.executable
) -> list[str]:
    """The pytest command of the ``tests`` section (run from the repository root): one line per test as it ends
    (what a killed run leaves in the log), short tracebacks, the slowest tests, a JUnit report."""
    selection = ["-k", keyword] if keyword else []
    return [python, "-m", "pytest", "-v", "--tb=short", "--durations=10", "-p", "no:cacheprovider", "-rs",
            f"--junitxml={junit}", *selection, *files]  # fmt: skip


def read_junit(path: str) -> dict[str, Any]:
    """Counts and per-test outcomes of a pytest JUnit XML file: ``passed``, ``failed`` (errors included),
    ``skipped``, and ``tests``: ``[{"name", "outcome", "seconds", "message"}]``."""
    tests = []
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            element = case.find(tag)
            if element is not None:
                outcome = "skipped" if tag == "skipped" else "failed"
                message = (element.get("message") or "")[:300]
                break
        tests.append(dict(name=name, outcome=outcome, seconds=float(case.get("time") or 0.0), message=message))
    counts = {key: sum(t["outcome"] == key for t in tests) for key in ("passed", "failed", "skipped")}
    return {**counts, "tests": tests}


def run_cuda_tests(files: Sequence[str], timeout: float, allow_skips: bool, keyword: str | None = None) -> Outcome:
    """Runs ``files`` (the tests matching ``keyword``, a pytest ``-k`` expression, if given) through pytest in a
    subprocess (its output streams through); PASS when pytest succeeded and, unless ``allow_skips``, nothing was
    skipped."""
    with tempfile.TemporaryDirectory() as folder:
        junit = os.path.join(folder, "junit.xml")
        command = cuda_test_command(files, junit, keyword)
        print("$", " ".join(command), flush=True)
        try:
            code = subprocess.run(command, cwd=ROOT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            return Outcome("FAIL", f"pytest ran past its {timeout:.0f} s")
        if not os.path.exists(junit):
            return Outcome("FAIL", f"pytest exit code {code}, no report written")
        report = read_junit(junit)
    skips = sorted({t["message"] for t in report["tests"] if t["outcome"] == "skipped"})
    counts = f"{report['passed']} passed, {report['failed']} failed, {report['skipped']} skipped"
    if code != 0 or report["failed"]:
        return Outcome("FAIL", f"{counts} (pytest exit code {code})", report)
    if skips and not allow_skips:
        return Outcome("FAIL", f"{counts}: on CUDA nothing may skip ({'; '.join(skips)})", report)
    return Outcome("PASS", counts, report)


def hf_mixtral(device: torch.device, quick: bool) -> Outcome:
    """Tiny Mixtral on ``device``: the monitor's counts against the model's own router logits."""
    print("\n## Hugging Face Mixtral (tiny random config), bf16 autocast")
    try:
        import transformers
    except ModuleNotFoundError:
        return Outcome("SKIP", 'transformers is not installed (pip install "moe-monitor[hf]")')
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
    counts = snap.counts.tolist()
    monitor.remove()
    print(f"routers: {[layer.name for layer in monitor.layers]}; counts {counts}")
    if counts == expected and snap.tokens.tolist() == [64, 64]:
        return Outcome("PASS", "counts equal a top-k of output_router_logits", dict(counts=counts))
    return Outcome("FAIL", f"counts {counts}, expected {expected}", dict(counts=counts, expected=expected))


def tests_section(
    device: torch.device, left_s: float, later_s: float, keyword: str | None = None, files: Sequence[str] | None = None
) -> Outcome:
    """The ``tests`` section: SKIP off CUDA; on CUDA the CUDA test files (``files``, default
    :func:`cuda_test_files`) with whatever the budget leaves after ``later_s`` seconds of later sections (at least a
    minute), and no skip allowed."""
    print("\n## CUDA tests")
    files = cuda_test_files() if files is None else list(files)
    if device.type != "cuda":
        return Outcome("SKIP", f"not on a CUDA device ({len(files)} files: {', '.join(files)})")
    return run_cuda_tests(files, timeout=max(60.0, left_s - later_s), allow_skips=False, keyword=keyword)


def _section(name: str, args: argparse.Namespace, device: torch.device, left_s: float, estimates: dict) -> Outcome:
    if name == "tests":
        later_s = sum(estimates[s] for s in args.sections[args.sections.index(name) + 1 :])
        return tests_section(device, left_s, later_s, args.tests_k)
    if name == "hf":
        return hf_mixtral(device, args.quick)
    if name == "tokens":
        return bench_tokens(device, args.quick)
    return bench_overhead(device, args.quick)


def versions(names: Sequence[str] = VERSIONED) -> dict[str, str]:
    """Installed versions of ``names`` (``"-"`` for one that is not installed).

    Example:
        >>> versions(["torch", "no-such-package"])["no-such-package"]
        '-'
    """
    found = {}
    for package in names:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = "-"
    return found


def _write_json(path: str | None, report: dict[str, Any]) -> None:
    if path is None:
        return
    with open(path + ".tmp", "w", encoding="utf-8") as file:
        json.dump(report, file, indent=1, default=str)
    os.replace(path + ".tmp", path)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.sections = [s for s in SECTIONS if s in args.sections]
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"gpu.py: --device {args.device}, but this torch ({torch.__version__}) sees no CUDA device; run it on "
              "the GPU machine, or pass --device cpu to try the script here", flush=True)  # fmt: skip
        return 1
    start = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    quick = " (quick)" if args.quick else ""
    print(f"device {name}, torch {torch.__version__}, sections {','.join(args.sections)}, budget {args.budget:.0f} s"
          f"{quick}", flush=True)  # fmt: skip
    estimates = QUICK_ESTIMATE_S if args.quick else ESTIMATE_S
    report: dict[str, Any] = dict(device=name, torch=torch.__version__, quick=args.quick, budget_s=args.budget,
                                  python=sys.version.split()[0], versions=versions(), sections={})  # fmt: skip
    print("versions:", ", ".join(f"{k} {v}" for k, v in report["versions"].items()))
    for section in args.sections:
        left_s = args.budget - (time.perf_counter() - start)
        began = time.perf_counter()
        if estimates[section] > left_s:
            outcome = Outcome("OVER", f"left out: needs about {estimates[section]} s, {left_s:.0f} s of budget left")
        else:
            try:
                outcome = _section(section, args, device, left_s, estimates)
            except Exception as error:  # one broken section must not hide the others' results
                traceback.print_exc()
                outcome = Outcome("FAIL", f"{type(error).__name__}: {error}".splitlines()[0][:300])
        outcome.seconds = time.perf_counter() - began
        print(f"[{section}] {outcome.status} ({outcome.seconds:.0f} s): {outcome.detail}", flush=True)
        report["sections"][section] = dict(status=outcome.status, seconds=outcome.seconds, detail=outcome.detail,
                                           results=outcome.results)  # fmt: skip
        report["total_s"] = time.perf_counter() - start
        _write_json(args.json, report)
    total = time.perf_counter() - start
    print("\n## summary")
    for section, entry in report["sections"].items():
        print(f"{section:9s} {entry['status']:4s} {entry['seconds']:6.0f} s  {entry['detail']}")
    bad = [s for s, e in report["sections"].items() if e["status"] in ("FAIL", "OVER")]
    verdict = "FAILED: " + ", ".join(bad) if bad else "all checks passed"
    print(f"total {total:.0f} s; {verdict}", flush=True)
    report.update(total_s=total, ok=not bad)
    _write_json(args.json, report)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
