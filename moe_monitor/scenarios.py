"""A small library of router-collapse scenarios for the reference model, and a plain training loop to run them.

Shape legend: ``D`` model width, ``E`` experts, ``V`` vocabulary.

Each :class:`Scenario` is a recipe that makes the tiny reference model collapse on the bundled corpus within a few
hundred CPU steps: configuration overrides, an optional learning rate, and a ``prepare(model)`` that tampers
with the freshly initialised weights. They exist to show (and test) that the detector notices each failure and
that the controllers repair it:

- ``biased_init``: every token's hidden state shares one direction that the gate rows of experts 0 and 1 point
  along, so the router sends everything to them from step 0, and no load-balancing loss pulls it back
  (load entropy ~0.4, dead experts).
- ``unreachable_experts``: the same shared direction pushes the upper half of the experts far down, so the default
  aux loss cannot bring them back within hundreds of steps (dead experts).
- ``no_aux_high_lr``: no load-balancing loss and a 10x learning rate; the router's rich-get-richer dynamics
  concentrate the load (MaxVio, low load entropy, saturation).
- ``low_capacity``: capacity factor 1.0 with the default aux loss; each batch routes far less evenly than the
  window as a whole, so every batch's busy experts overflow (dropped fraction 20-60 %).

:func:`run` trains one of them with a :class:`~moe_monitor.monitor.RouterMonitor`, a
:class:`~moe_monitor.detect.CollapseDetector` and any controllers, in a plain PyTorch loop (the Lightning path is
``moe-monitor train --scenario NAME --control aux,noise,bias``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moe_monitor.controllers import CONTROLLERS, Controller, ExpertBiasController, make_controllers
from moe_monitor.detect import CollapseDetector, CollapseEvent, make_snapshot
from moe_monitor.reference.config import MoEConfig
from moe_monitor.reference.model import MoETransformer

__all__ = ["SCENARIOS", "POOLED_STATS", "Scenario", "RunResult", "make_controllers", "run", "CONTROLLERS"]

# The statistics :meth:`RunResult.pooled` can pool: those a window's counts and drops determine.
POOLED_STATS: tuple[str, ...] = ("max_violation", "load_entropy", "cv", "gini", "dead_experts", "dropped_fraction")


def _transformer(model: nn.Module) -> MoETransformer:
    """The :class:`MoETransformer` inside ``model`` (itself, or e.g. ``ReferenceLM.model``)."""
    for module in model.modules():
        if isinstance(module, MoETransformer):
            return module
    raise ValueError(f"expected the reference MoETransformer (or a module holding one), got {type(model).__name__}.")


def _shared_direction(model: MoETransformer, strength: float, seed: int = 1234) -> torch.Tensor:
    """Adds ``strength * u`` to every token and position embedding (``u`` a random unit vector) and returns ``u``.

    Every token's residual stream then carries ``u``, so a gate row along ``u`` moves all tokens the same way:
    the router equivalent of a bias, which the reference gate (a bias-free linear layer) does not have.
    """
    generator = torch.Generator().manual_seed(seed)
    u_D = torch.randn(model.config.d_model, generator=generator)
    u_D = u_D / u_D.norm()
    with torch.no_grad():
        model.embed.weight.add_(strength * u_D.to(model.embed.weight))
    return u_D


def _bias_gates(model: nn.Module, experts: Sequence[int], scale: float, strength: float) -> None:
    transformer = _transformer(model)
    u_D = _shared_direction(transformer, strength)
    with torch.no_grad():
        for router in transformer.routers:
            weight_ED = router.gate.weight
            for e in experts:
                weight_ED[e] += scale * u_D.to(weight_ED)


def _prepare_biased_init(model: nn.Module) -> None:
    _bias_gates(model, experts=(0, 1), scale=8.0, strength=0.5)


def _prepare_unreachable(model: nn.Module) -> None:
    n_experts = _transformer(model).config.n_experts
    _bias_gates(model, experts=tuple(range(n_experts // 2, n_experts)), scale=-8.0, strength=0.5)


@dataclass(frozen=True)
class Scenario:
    """A recipe for one kind of router collapse on the reference model.

    Attributes:
        name: key in :data:`SCENARIOS` and value of ``--scenario``.
        description: one sentence for ``--help`` and reports.
        config_overrides: :class:`~moe_monitor.reference.MoEConfig` fields to set (over the preset).
        lr: peak learning rate the scenario needs, or ``None`` for the trainer's default.
        expected_rules: detector rules the collapse raises (what the tests wait for).
        prepare_fn: tampers with a freshly initialised model (see :meth:`prepare`), or ``None``.

    Example:
        >>> s = SCENARIOS["low_capacity"]
        >>> s.config_overrides["capacity_factor"], s.expected_rules
        (1.0, ('dropped_fraction',))
    """

    name: str
    description: str
    config_overrides: dict[str, Any] = field(default_factory=dict)
    lr: float | None = None
    expected_rules: tuple[str, ...] = ()
    prepare_fn: Callable[[nn.Module], None] | None = None

    def prepare(self, model: nn.Module) -> None:
        """Applies the scenario to a freshly built reference model (an ``MoETransformer`` or ``ReferenceLM``).

        Call it once, after construction and before training (and not when resuming from a checkpoint, whose
        weights already carry it).
        """
        if self.prepare_fn is not None:
            self.prepare_fn(model)

    def config(self, preset: str = "tiny", **overrides: Any) -> MoEConfig:
        """The scenario's model configuration: ``preset``, then :attr:`config_overrides`, then ``overrides``.

        Example:
            >>> SCENARIOS["no_aux_high_lr"].config().aux_loss_coef
            0.0
        """
        return MoEConfig.from_preset(preset, **{**self.config_overrides, **overrides})


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            "biased_init",
            "the gate rows of experts 0 and 1 point along a direction every token carries, so all tokens go to them, "
            "and no load-balancing loss pulls them back.",
            config_overrides={"aux_loss_coef": 0.0},
            expected_rules=("load_entropy", "dead_experts"),
            prepare_fn=_prepare_biased_init,
        ),
        Scenario(
            "unreachable_experts",
            "the gate rows of the upper half of the experts point away from a direction every token carries: "
            "those experts are never chosen.",
            expected_rules=("dead_experts",),
            prepare_fn=_prepare_unreachable,
        ),
        Scenario(
            "no_aux_high_lr",
            "no load-balancing loss and a 10x learning rate: rich-get-richer routing concentrates the load.",
            config_overrides={"aux_loss_coef": 0.0, "z_loss_coef": 0.0},
            lr=3e-2,
            expected_rules=("max_violation",),
        ),
        Scenario(
            "low_capacity",
            "capacity factor 1.0: each batch's routing is far less even than the window's, so the busy experts of "
            "every batch overflow and a large share of assignments is dropped.",
            config_overrides={"capacity_factor": 1.0},
            expected_rules=("dropped_fraction",),
        ),
    )
}


@dataclass
class RunResult:
    """What :func:`run` returns.

    Attributes:
        scenario: scenario name (``"healthy"`` when none).
        events: every detector and controller event, in order.
        layer_frame: ``RouterMonitor.layer_frame()`` of the run (train and val windows).
        expert_frame: ``RouterMonitor.expert_frame()`` of the run.
        val_loss: validation cross-entropy at the end.
        seconds: wall time of the training loop.
        controllers: the controllers, for their final state and metrics.
    """

    scenario: str
    events: list[CollapseEvent]
    layer_frame: Any
    expert_frame: Any
    val_loss: float
    seconds: float
    controllers: list[Controller]

    def alerts(self, rule: str | None = None, phase: str = "train") -> list[CollapseEvent]:
        """Alert events (optionally of one rule) of ``phase``."""
        return [e for e in self.events if e.kind == "alert" and e.phase == phase and (rule is None or e.rule == rule)]

    def first_alert_window(self, rules: Iterable[str], log_every: int) -> int | None:
        """1-based index of the training window of the first alert of any of ``rules``, or ``None``."""
        steps = [e.step for e in self.alerts() if e.rule in set(rules)]
        return None if not steps else math.ceil(min(steps) / log_every)

    def final(self, stat: str, windows: int = 3) -> float:
        """Mean over layers and over the last ``windows`` training windows of one statistic."""
        frame = self.layer_frame[self.layer_frame.phase == "train"]
        last_steps = sorted(frame.step.unique())[-windows:]
        return float(frame[frame.step.isin(last_steps)][stat].mean())

    def pooled(self, stat: str, windows: int = 5) -> float:
        """One count statistic of the last ``windows`` training windows pooled into one, averaged over layers.

        Pooling gives the statistic many assignments, so a balance measure such as MaxVio reflects the router
        rather than the sampling noise of one small window. ``stat`` is one of :data:`POOLED_STATS`, computed from
        the pooled counts and drops by :func:`moe_monitor.stats.compute` (through
        :func:`~moe_monitor.detect.make_snapshot`), as the monitor computes a window's.
        """
        if stat not in POOLED_STATS:
            raise ValueError(f"stat={stat!r} cannot be pooled; choose one of {', '.join(POOLED_STATS)}.")
        layers = self.layer_frame[self.layer_frame.phase == "train"]
        last_steps = sorted(layers.step.unique())[-windows:]
        dropped_L = layers[layers.step.isin(last_steps)].groupby("layer").dropped.sum()
        experts = self.expert_frame[(self.expert_frame.phase == "train") & self.expert_frame.step.isin(last_steps)]
        count_LE = experts.pivot_table(index="layer", columns="expert", values="count", aggfunc="sum")
        # Every layer of the reference model has the same experts, as make_snapshot assumes.
        pooled = make_snapshot(count_LE.loc[dropped_L.index].to_numpy().tolist(), dropped=dropped_L.tolist())
        return float(pooled.stats[stat].mean())


def run(
    scenario: str | Scenario | None = None,
    *,
    steps: int = 200,
    controllers: str | Iterable[str] | Iterable[Controller] | None = None,
    seed: int = 0,
    log_every: int = 10,
    batch_size: int = 8,
    preset: str = "tiny",
    lr: float | None = None,
    detector: CollapseDetector | None = None,
    val_batches: int | None = 4,
    val_per_domain: int = 16,
    **config_overrides: Any,
) -> RunResult:
    """Trains the reference model on the bundled corpus in a plain loop, with monitor, detector and controllers.

    AdamW (betas 0.9/0.95, weight decay 0.1 on matrices), 10 % linear warm-up then constant learning rate,
    gradient clipping at 1.0; ``collect`` every ``log_every`` steps, then ``detector.update`` and each
    controller's ``on_window``; ``on_train_step`` after every optimizer step. The model gets an ``expert_bias``
    buffer when an :class:`~moe_monitor.controllers.ExpertBiasController` is among the controllers.

    Args:
        scenario: a :data:`SCENARIOS` name or :class:`Scenario`, or ``None`` for a healthy default run.
        steps: optimizer steps.
        controllers: ``"aux,noise,bias"``-style names or controller instances.
        seed: seeds the model initialisation and the data order.
        log_every: steps per monitoring window.
        batch_size: sequences per step (sequence length from the preset).
        preset: :data:`~moe_monitor.reference.PRESETS` name.
        lr: peak learning rate; default the scenario's, else 3e-3.
        detector: the detector (default ``CollapseDetector()``).
        val_batches: validation batches for the final validation loss (also a ``"val"`` window); ``None``
            for the whole validation set.
        val_per_domain: validation sequences per corpus domain.
        **config_overrides: further :class:`MoEConfig` fields.

    Returns:
        A :class:`RunResult`.
    """
    from moe_monitor.monitor import RouterMonitor
    from moe_monitor.reference.data import CorpusDataModule

    if isinstance(scenario, str):
        if scenario not in SCENARIOS:
            raise ValueError(f"scenario={scenario!r} is unknown; choose one of {', '.join(SCENARIOS)}.")
        scenario = SCENARIOS[scenario]
    if controllers is None or isinstance(controllers, str):
        controllers = make_controllers(controllers)
    else:
        controllers = [c if isinstance(c, Controller) else make_controllers([c])[0] for c in controllers]
    if any(isinstance(c, ExpertBiasController) for c in controllers):
        config_overrides.setdefault("expert_bias", True)
    detector = detector if detector is not None else CollapseDetector()
    base = scenario if scenario is not None else Scenario("healthy", "default configuration")
    lr = lr if lr is not None else (base.lr if base.lr is not None else 3e-3)

    torch.manual_seed(seed)
    config = base.config(preset, **config_overrides)
    model = MoETransformer(config)
    base.prepare(model)
    monitor = RouterMonitor(model)
    for controller in controllers:
        controller.setup(model, monitor)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95)
    )
    warmup = max(1, steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    data = CorpusDataModule(
        seq_len=config.seq_len,
        batch_size=batch_size,
        seed=seed,
        train_samples=steps * batch_size,
        val_per_domain=val_per_domain,
    )
    data.setup()

    events: list[CollapseEvent] = []
    start = time.perf_counter()
    model.train()
    for step, batch in enumerate(data.train_dataloader(), start=1):
        out = model(batch["input_ids"])
        loss = F.cross_entropy(out.logits.flatten(0, 1), batch["labels"].flatten()) + out.aux_loss + out.z_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        for controller in controllers:
            controller.on_train_step(monitor, step)
        if step % log_every == 0:
            snapshot = monitor.collect(step, "train")
            detected = detector.update(snapshot)
            events += detected
            # Every controller sees the detector's events only, as in the callback: one controller's knob
            # changes are not alerts for the next.
            for controller in controllers:
                events += controller.on_window(snapshot, detected)
        if step >= steps:
            break
    seconds = time.perf_counter() - start

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i, batch in enumerate(data.val_dataloader()):
            if val_batches is not None and i >= val_batches:
                break
            logits = model(batch["input_ids"]).logits
            total += float(F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="sum"))
            count += batch["labels"].numel()
    events += detector.update(monitor.collect(steps, "val"))
    monitor.remove()
    return RunResult(
        base.name, events, monitor.layer_frame(), monitor.expert_frame(), total / max(count, 1), seconds, controllers
    )
