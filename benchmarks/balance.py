"""Load balance and language-model quality of each balancing strategy, trained side by side on the bundled corpus.

Shape legend: ``E`` experts.

Variants (same model, data order and seed; only the balancing differs):

- ``none``: no load-balancing loss (``aux_loss_coef=0``), no controller.
- ``aux 1e-2``: the fixed Switch / GShard loss at 1e-2 (the default of ``MoEConfig``).
- ``aux ctl``: :class:`AuxLossController` on top of ``aux 1e-2`` (raises it while a collapse alert fires).
- ``noise ctl``: :class:`RouterNoiseController` on top of ``aux 1e-2``.
- ``bias ctl``: :class:`ExpertBiasController` at its default rate 1e-3, without aux loss (auxiliary-loss-free).
- ``bias ctl 3e-3``: the same at rate 3e-3, which suits runs this short.
- ``combined``: aux + noise + bias controllers on top of ``aux 1e-2``.

Reported per variant, mean over seeds: MaxVio and load entropy of the last 5 training windows pooled into one
(so the numbers measure the router, not the sampling noise of one window), the dropped fraction (0 when dropless)
and the counterfactual drop at capacity factor 1.25 (what a 1.25 capacity would have dropped), the validation
cross-entropy, and its ratio to ``aux 1e-2``. Seeds are the outer loop, so a change of machine load hits every
variant alike.

Target: some controller configuration reaches MaxVio <= 0.1 with a validation loss at most 1 % above ``aux 1e-2``.

Usage::

    python benchmarks/balance.py [--steps 600] [--seeds 3] [--preset micro|tiny] [--capacity-factor 1.25]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from moe_monitor.controllers import AuxLossController, Controller, ExpertBiasController, RouterNoiseController
from moe_monitor.scenarios import run

# A 2-layer, 32-wide model: 600 steps train in a few seconds on one CPU core.
MICRO = dict(d_model=32, n_layers=2, n_heads=2, seq_len=32, d_expert=64)

VARIANTS: dict[str, tuple[float, Callable[[], list[Controller]]]] = {
    "none": (0.0, lambda: []),
    "aux 1e-2": (1e-2, lambda: []),
    "aux ctl": (1e-2, lambda: [AuxLossController()]),
    "noise ctl": (1e-2, lambda: [RouterNoiseController()]),
    "bias ctl": (0.0, lambda: [ExpertBiasController()]),
    "bias ctl 3e-3": (0.0, lambda: [ExpertBiasController(rate=3e-3)]),
    "combined": (1e-2, lambda: [AuxLossController(), RouterNoiseController(), ExpertBiasController()]),
}


def measure(variant: str, seed: int, args: argparse.Namespace) -> dict[str, float]:
    aux_loss_coef, controllers = VARIANTS[variant]
    sizes: dict[str, Any] = MICRO if args.preset == "micro" else {}
    result = run(
        None,
        steps=args.steps,
        seed=seed,
        controllers=controllers(),
        preset="tiny",
        batch_size=args.batch_size,
        log_every=args.log_every,
        val_batches=None,
        val_per_domain=args.val_per_domain,
        aux_loss_coef=aux_loss_coef,
        capacity_factor=args.capacity_factor,
        **sizes,
    )
    train = result.layer_frame[result.layer_frame.phase == "train"]
    last = sorted(train.step.unique())[-5:]
    return {
        "max_violation": result.pooled("max_violation"),
        "load_entropy": result.pooled("load_entropy"),
        "dropped_fraction": result.pooled("dropped_fraction"),
        "cf_drop@1.25": float(train[train.step.isin(last)]["counterfactual_drop@1.25"].mean()),
        "val_loss": result.val_loss,
        "seconds": result.seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--preset", choices=("micro", "tiny"), default="micro", help="micro: 2x32 model; tiny: preset")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--val-per-domain", type=int, default=64)
    parser.add_argument("--capacity-factor", type=float, default=None, help="default: dropless")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of the variants")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    variants = [v.strip() for v in args.variants.split(",")]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")

    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} thread(s); "
        f"preset {args.preset}, {args.steps} steps x batch {args.batch_size}, seeds {args.seeds}, "
        f"capacity factor {args.capacity_factor}"
    )
    rows: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    start = time.perf_counter()
    for seed in range(args.seeds):
        for variant in variants:
            rows[variant].append(measure(variant, seed, args))
    print(f"total {time.perf_counter() - start:.0f} s\n")

    base = statistics.mean(r["val_loss"] for r in rows["aux 1e-2"]) if "aux 1e-2" in rows else float("nan")
    header = "| variant | MaxVio | load entropy | dropped | cf drop @1.25 | val loss | val / aux 1e-2 | s/run |"
    print(header)
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for variant, runs in rows.items():

        def mean(key: str, runs=runs) -> float:
            return statistics.mean(r[key] for r in runs)

        def spread(key: str, runs=runs) -> str:
            return f" ± {statistics.stdev(r[key] for r in runs):.3f}" if len(runs) > 1 else ""

        print(
            f"| {variant} | {mean('max_violation'):.3f}{spread('max_violation')} | {mean('load_entropy'):.3f} "
            f"| {mean('dropped_fraction'):.3f} | {mean('cf_drop@1.25'):.3f} "
            f"| {mean('val_loss'):.4f}{spread('val_loss')} | {mean('val_loss') / base:.3f} | {mean('seconds'):.1f} |"
        )
    winners = [
        v
        for v, runs in rows.items()
        if v not in ("none", "aux 1e-2")
        and statistics.mean(r["max_violation"] for r in runs) <= 0.1
        and statistics.mean(r["val_loss"] for r in runs) <= 1.01 * base
    ]
    print(f"\ntarget (MaxVio <= 0.1 and val loss <= +1 % of aux 1e-2) met by: {', '.join(winners) or 'none'}")


if __name__ == "__main__":
    main()
