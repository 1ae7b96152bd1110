"""Hook cost per router forward of each model family, relative to the router's own forward.

Shape legend: ``T`` tokens per forward, ``D`` model width, ``E`` experts, ``k`` experts chosen per token.

For each family, one router (the module the monitor hooks) of ``E=8`` experts, ``k=2``, ``D=256`` is called on
``T`` tokens, alternately without and with a :class:`~moe_monitor.RouterMonitor` attached (its hook, the family's
extract function and the counter update; co-activation and counterfactual capacities on, the defaults), in one
process, interleaved so that a change of machine load hits both alike. Reported: the router's own forward time, the
hook's extra time, and their ratio (median of rounds). Families whose library is not installed are skipped;
Megatron-Core needs CUDA and is skipped on a CPU machine.

Usage::

    python benchmarks/families.py [--tokens 1024] [--rounds 15] [--threads 1]
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from moe_monitor import RouterMonitor

D, E, K = 256, 8, 2


def reference(tokens: int) -> tuple[nn.Module, Callable[[], object]]:
    from moe_monitor.reference import MoEConfig, MoETransformer

    config = MoEConfig(d_model=D, n_layers=1, n_heads=4, seq_len=tokens, n_experts=E, top_k=K, d_expert=64)
    model = MoETransformer(config)
    x = torch.randn(tokens, D)
    router = model.blocks[0].moe.router
    return model, lambda: router(x)


def hf_mixtral(tokens: int) -> tuple[nn.Module, Callable[[], object]]:
    import transformers

    config = transformers.MixtralConfig(
        vocab_size=64, hidden_size=D, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=1, num_local_experts=E, num_experts_per_tok=K,
    )  # fmt: skip
    model = transformers.MixtralForCausalLM(config)
    x = torch.randn(tokens, D)
    gate = model.model.layers[0].mlp.gate
    return model, lambda: gate(x)


def torchtitan(tokens: int) -> tuple[nn.Module, Callable[[], object]]:
    from torchtitan.models.common import moe
    from torchtitan.models.common.linear import Linear
    from torchtitan.models.common.token_dispatcher import LocalTokenDispatcher

    config = moe.MoE.Config(
        num_experts=E,
        routed_experts=moe.RoutedExperts.Config(
            inner_experts=moe.GroupedExperts.Config(dim=D, hidden_dim=64, num_experts=E),
            token_dispatcher=LocalTokenDispatcher.Config(num_experts=E, top_k=K),
        ),
        router=moe.TokenChoiceTopKRouter.Config(
            num_experts=E, gate=Linear.Config(in_features=D, out_features=E), top_k=K
        ),
    )
    layer = config.build()
    nn.init.normal_(layer.router.gate.weight, std=0.02)
    model = nn.ModuleDict({"moe": layer})
    x = torch.randn(1, tokens, D)
    return model, lambda: layer.router(x, layer.expert_bias_E)


def deepspeed(tokens: int) -> tuple[nn.Module, Callable[[], object]]:
    from deepspeed.moe.layer import MoE

    layer = MoE(hidden_size=D, expert=nn.Linear(D, D), num_experts=E, k=K, min_capacity=1)
    model = nn.ModuleDict({"moe": layer})
    x = torch.randn(tokens, D)
    gate = layer.deepspeed_moe.gate
    return model, lambda: gate(x, None, True)


def olmo_core(tokens: int) -> tuple[nn.Module, Callable[[], object]]:
    from olmo_core.nn.moe.router import MoELinearRouter

    router = MoELinearRouter(d_model=D, num_experts=E, top_k=K)
    model = nn.ModuleDict({"router": router})
    x = torch.randn(1, tokens, D)
    return model, lambda: router(x)


def st_moe(tokens: int) -> tuple[nn.Module, Callable[[], object]]:
    from st_moe_pytorch import MoE

    layer = MoE(dim=D, num_experts=E)
    model = nn.ModuleDict({"moe": layer})
    x = torch.randn(1, tokens, D)
    return model, lambda: layer.gate(x)


def lucidrains(tokens: int) -> tuple[nn.Module, Callable[[], object]]:
    from mixture_of_experts import MoE

    layer = MoE(dim=D, num_experts=E)
    model = nn.ModuleDict({"moe": layer})
    x = torch.randn(1, tokens, D)
    return model, lambda: layer.gate(x)


def generic(tokens: int) -> tuple[nn.Module, Callable[[], object]]:
    class Router(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj, self.top_k = nn.Linear(D, E, bias=False), K

        def forward(self, x):
            logits = self.proj(x)
            return logits, logits.topk(K, dim=-1).indices

    block = nn.Module()
    block.router, block.experts = Router(), nn.ModuleList(nn.Identity() for _ in range(E))
    model = nn.ModuleDict({"block": block})
    x = torch.randn(tokens, D)
    return model, lambda: block.router(x)


FAMILIES: dict[str, tuple[str | None, Callable[[int], tuple[nn.Module, Callable[[], object]]]]] = {
    "reference": (None, reference),
    "hf (Mixtral)": ("transformers", hf_mixtral),
    "torchtitan": ("torchtitan", torchtitan),
    "deepspeed": ("deepspeed", deepspeed),
    "olmo-core": ("olmo_core", olmo_core),
    "st-moe": ("st_moe_pytorch", st_moe),
    "mixture-of-experts": ("mixture_of_experts", lucidrains),
    "generic": (None, generic),
}


def _time(call: Callable[[], object], repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    return (time.perf_counter() - start) / repeats


def measure(build, tokens: int, rounds: int, repeats: int = 20) -> tuple[float, float]:
    """``(router forward seconds, hook seconds)``, medians over interleaved rounds."""
    import warnings

    model, call = build(tokens)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            call()
        bare, extra = [], []
        for _ in range(rounds):
            without = _time(call, repeats)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                monitor = RouterMonitor(model)
            for _ in range(3):
                call()
            with_hook = _time(call, repeats)
            monitor.remove()
            call()  # lets self-removing stashes go
            bare.append(without)
            extra.append(with_hook - without)
    return statistics.median(bare), statistics.median(extra)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, threads={args.threads}, "
          f"T={args.tokens}, D={D}, E={E}, k={K}")  # fmt: skip
    print(f"{'family':<20} {'router ms':>10} {'hook ms':>9} {'hook / router':>14}")
    for name, (library, build) in FAMILIES.items():
        if library is not None and importlib.util.find_spec(library) is None:
            print(f"{name:<20} skipped: {library} not installed")
            continue
        bare, extra = measure(build, args.tokens, args.rounds)
        print(f"{name:<20} {bare * 1e3:>10.3f} {extra * 1e3:>9.3f} {extra / bare:>14.2f}")
    if not torch.cuda.is_available():
        print(f"{'megatron':<20} skipped: its router forward needs CUDA")


if __name__ == "__main__":
    main()
