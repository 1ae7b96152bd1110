"""moe_monitor against MoEWatch 0.1.0 on the same tiny Hugging Face Mixtral, interleaved in one process.

Measures, for ``RouterMonitor`` + ``CollapseDetector`` (ours) and ``moewatch.MoEWatch`` (the one pip-installable
peer, https://pypi.org/project/moewatch/):

1. Step-time overhead of a training step (forward, backward, AdamW) at each tool's default cadence (ours: a window
   every 50 steps, as ``Watcher``'s default ``log_every``; MoEWatch: ``WatchConfig()``, hooks on every 10th
   forward, analysis every 100 steps) and at every step (ours: ``collect`` + detector every step; MoEWatch:
   ``sample_every=1, log_every=1``). One model copy per tool, every step run once on each copy in turn, so drift
   and contention of the machine hit every tool alike; the ratio is each tool's total time over the bare copy's.
2. Detection of a forced collapse: every router's weight zeroed and frozen (all logits tie, so top-k always picks
   experts 0 and 1), both tools attached to the same run at both cadences; the first step each one alerts.
3. Silence on a healthy run (aux loss on, the bundled corpus): alerts each tool raises.

MoEWatch is a benchmark-only dependency: ``pip install --no-deps moewatch==0.1.0``.

Run: ``python benchmarks/peers.py`` (about two minutes on one CPU thread); ``--help`` for the sizes.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from moe_monitor import CollapseDetector, RouterMonitor
from moe_monitor.reference.data import RandomWindows, corpus_splits


def make_model(seed: int, layers: int) -> torch.nn.Module:
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    config = MixtralConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, output_router_logits=True,
        router_aux_loss_coef=0.01,
    )  # fmt: skip
    return MixtralForCausalLM(config)


def corpus_batches(batch_size: int, seq_len: int, seed: int) -> Iterator[torch.Tensor]:
    train_texts, _ = corpus_splits()
    windows = RandomWindows(train_texts, seq_len, num_samples=10**6, seed=seed)
    index = 0
    while True:
        yield torch.stack([windows[index + i]["input_ids"] for i in range(batch_size)])
        index += batch_size


@dataclass
class Tool:
    """One monitor at one cadence: ``attach`` hooks it onto a model, ``after_step`` runs its per-step work."""

    name: str
    attach: Callable[[torch.nn.Module], Any]
    after_step: Callable[[Any, int], list[Any]]
    detach: Callable[[Any], None]
    step: int = 0
    alerts: list[tuple[int, str]] = field(default_factory=list)


def ours(every: int) -> Tool:
    def attach(model):
        return RouterMonitor(model), CollapseDetector()

    def after_step(state, step):
        monitor, detector = state
        if step % every:
            return []
        events = detector.update(monitor.collect(step))
        return [(step, f"{e.layer}: {e.rule}") for e in events if e.kind == "alert"]

    return Tool(f"moe_monitor every {every}", attach, after_step, lambda state: state[0].remove())


def moewatch(every_step: bool) -> Tool:
    from moewatch import MoEWatch, WatchConfig

    def attach(model):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sample_every=1 captures every forward pass"
            config = WatchConfig(output="silent", **({"sample_every": 1, "log_every": 1} if every_step else {}))
        return MoEWatch(model, config=config).start()

    def after_step(watcher, step):
        return [(step, f"{a.layer_name}: {a.message}") for a in watcher.step(step) if a.level.value != "INFO"]

    return Tool(f"moewatch {'every step' if every_step else 'default'}", attach, after_step, lambda w: w.stop())


def train_step(model: torch.nn.Module, ids: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
    loss = model(input_ids=ids, labels=ids).loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def train(model: torch.nn.Module, tools: list[tuple[Tool, Any]], batches: Iterator[torch.Tensor], steps: int,
          optimizer: torch.optim.Optimizer) -> None:  # fmt: skip
    """Runs ``steps`` training steps with ``tools`` attached."""
    for _ in range(steps):
        train_step(model, next(batches), optimizer)
        for tool, state in tools:
            tool.step += 1
            tool.alerts += tool.after_step(state, tool.step)


def overhead(args: argparse.Namespace) -> None:
    """One model copy per tool (same weights, same batches); every step runs once on each copy, in turn, so the
    machine's drift and contention hit every tool alike. Ratio: total time over the bare copy's."""
    tools = [None, ours(50), ours(1), moewatch(False), moewatch(True)]
    runs = []
    for tool in tools:
        model = make_model(0, args.layers)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        train_step(model, next(corpus_batches(args.batch_size, args.seq_len, seed=1)), optimizer)  # warm-up
        runs.append((tool, model, optimizer, None if tool is None else tool.attach(model), []))
    batches = corpus_batches(args.batch_size, args.seq_len, seed=0)
    for step in range(1, args.overhead_steps + 1):
        ids = next(batches)
        order = runs[step % len(runs) :] + runs[: step % len(runs)]  # who goes first rotates too
        for tool, model, optimizer, state, seconds in order:
            start = time.perf_counter()
            train_step(model, ids, optimizer)
            if tool is not None:
                tool.after_step(state, step)
            seconds.append(time.perf_counter() - start)
    for tool, _, _, state, _ in runs:
        if tool is not None:
            tool.detach(state)
    bare = sum(runs[0][4])
    print(f"\nStep-time overhead ({args.overhead_steps} steps per tool, interleaved step by step; Mixtral "
          f"{args.layers} layers, 8 experts top-2, batch {args.batch_size}x{args.seq_len}, "
          f"{torch.get_num_threads()} thread(s))")  # fmt: skip
    print(f"{'tool':24s} {'mean ms':>8s} {'median ms':>10s} {'ratio':>7s}  ratio per fifth of the run")
    fifth = args.overhead_steps // 5
    for tool, _, _, _, seconds in runs:
        parts = " ".join(
            f"{sum(seconds[i : i + fifth]) / sum(runs[0][4][i : i + fifth]):.3f}" for i in range(0, 5 * fifth, fifth)
        )
        name = "bare step" if tool is None else tool.name
        mean, median = 1e3 * statistics.mean(seconds), 1e3 * statistics.median(seconds)
        print(f"{name:24s} {mean:8.2f} {median:10.2f} {sum(seconds) / bare:7.3f}  {parts}")


def detection(args: argparse.Namespace, collapse: bool, seed: int) -> None:
    model = make_model(seed, args.layers)
    if collapse:
        for layer in model.model.layers:
            gate = layer.mlp.gate
            with torch.no_grad():
                gate.weight.zero_()
            gate.weight.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    tools = [ours(50), ours(1), moewatch(False), moewatch(True)]
    states = [(tool, tool.attach(model)) for tool in tools]
    train(model, states, corpus_batches(args.batch_size, args.seq_len, seed=seed), args.steps, optimizer)
    for tool, state in states:
        tool.detach(state)
    run = "forced collapse (routers zeroed, frozen)" if collapse else "healthy run"
    print(f"\n{run}, seed {seed}, {args.steps} steps:")
    for tool in tools:
        steps = sorted({s for s, _ in tool.alerts})
        first = f"first alert at step {steps[0]}: {tool.alerts[0][1][:90]}" if steps else "no alert"
        print(f"  {tool.name:24s} {len(tool.alerts):4d} alerts at {len(steps):3d} steps; {first}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="steps of each detection run")
    parser.add_argument("--overhead-steps", type=int, default=300, help="steps per tool of the overhead run")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--seeds", type=int, default=2, help="seeds of the detection runs")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-overhead", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import moewatch

    print(f"torch {torch.__version__}, moewatch {moewatch.__version__}")
    if not args.skip_overhead:
        overhead(args)
    for seed in range(args.seeds):
        detection(args, collapse=True, seed=seed)
        detection(args, collapse=False, seed=seed)


if __name__ == "__main__":
    main()
