"""Forward+backward time of one reference MoE layer against a FLOP-equal dense MLP and a per-expert loop.

Shape legend: ``T`` tokens, ``D`` model width, ``H`` expert hidden width, ``E`` experts, ``K`` experts per token.

Variants, measured interleaved in one process (each repeat times every variant once, in turn, so a change in
machine load hits all of them alike), reported as medians over the repeats and as ratios to ``dense``:

- ``dense``: SwiGLU MLP of hidden ``K * H``: the same FLOPs per token as ``K`` experts, so 1.0 is the limit.
- ``moe[loop]`` / ``moe[grouped]``: ``MoELayer`` (router + experts, dropless) with each dispatch mode.
- ``mixtral``: transformers' ``MixtralSparseMoeBlock`` with the same sizes and its eager per-expert loop
  (skipped when transformers is not installed).

On CUDA the same variants also run under bf16 autocast and the script prints tokens/s.

Usage::

    python benchmarks/moe_layer.py [--tokens 4096] [--repeats 15] [--threads N]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch import nn

from moe_monitor.reference import MoEConfig
from moe_monitor.reference.experts import DenseMLP
from moe_monitor.reference.model import MoELayer


def build_variants(config: MoEConfig, device: torch.device) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    variants: dict[str, nn.Module] = {"dense": DenseMLP(config.d_model, config.top_k * config.d_expert)}
    for dispatch in ("loop", "grouped"):
        layer = MoELayer(config)
        layer.experts.dispatch = dispatch
        variants[f"moe[{dispatch}]"] = layer
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError:
        print('transformers is not installed (pip install "moe-monitor[hf]"): skipping the Mixtral comparison')
    else:
        hf_config = MixtralConfig(
            hidden_size=config.d_model,
            intermediate_size=config.d_expert,
            num_local_experts=config.n_experts,
            num_experts_per_tok=config.top_k,
        )
        hf_config._experts_implementation = "eager"
        block = MixtralSparseMoeBlock(hf_config)
        for parameter in block.parameters():
            nn.init.normal_(parameter, std=config.init_std)
        variants["mixtral"] = block
    return {name: module.to(device) for name, module in variants.items()}


def make_step(module: nn.Module, x_BSD: torch.Tensor, autocast: bool) -> Callable[[], None]:
    grad_BSD = torch.randn_like(x_BSD)
    context = torch.autocast(x_BSD.device.type, dtype=torch.bfloat16) if autocast else nullcontext()

    def step() -> None:
        module.zero_grad(set_to_none=True)
        with context:
            out = module(x_BSD)
        y_BSD = out[0] if isinstance(out, tuple) else out  # MoELayer and older Mixtral blocks return tuples
        y_BSD.float().backward(grad_BSD)

    return step


def measure(steps: dict[str, Callable[[], None]], repeats: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds per forward+backward of each variant, ``repeats`` interleaved samples each."""

    def timed(step: Callable[[], None]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for step in steps.values():  # warm-up: allocator, oneDNN/cuBLAS plans
        step()
        step()
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            samples[name].append(timed(step))
    return samples


def report(samples: dict[str, list[float]], tokens: int) -> None:
    medians = {name: statistics.median(times) for name, times in samples.items()}
    print(f"{'variant':<14}{'median ms':>11}{'min ms':>9}{'x dense':>9}{'tokens/s':>12}")
    for name, median in medians.items():
        print(
            f"{name:<14}{median * 1e3:>11.1f}{min(samples[name]) * 1e3:>9.1f}{median / medians['dense']:>9.2f}"
            f"{tokens / median:>12,.0f}"
        )
    best = min(medians["moe[loop]"], medians["moe[grouped]"])
    if "mixtral" in medians:
        print(f"reference MoE (best dispatch) vs Mixtral per-expert loop: {medians['mixtral'] / best:.2f}x faster")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    config = MoEConfig(d_model=256, n_heads=4, n_experts=8, top_k=2, d_expert=1024, capacity_factor=None)
    print(
        f"MoE layer: E={config.n_experts} k={config.top_k} D={config.d_model} H={config.d_expert} "
        f"T={args.tokens} dropless; dense hidden {config.top_k * config.d_expert}"
    )
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")

    cpu = torch.device("cpu")
    x_BSD = torch.randn(1, args.tokens, config.d_model)
    variants = build_variants(config, cpu)
    print("\nCPU, fp32, forward+backward:")
    report(measure({n: make_step(m, x_BSD, False) for n, m in variants.items()}, args.repeats, cpu), args.tokens)

    if torch.cuda.is_available():
        cuda = torch.device("cuda")
        variants = build_variants(config, cuda)
        x_BSD = x_BSD.to(cuda)
        print(f"\nCUDA ({torch.cuda.get_device_name()}), bf16 autocast, forward+backward:")
        steps = {n: make_step(m, x_BSD, True) for n, m in variants.items()}
        report(measure(steps, args.repeats, cuda), args.tokens)


if __name__ == "__main__":
    main()
