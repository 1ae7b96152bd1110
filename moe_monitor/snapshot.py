"""What one closed window looks like once it reaches the host.

Shape legend: ``L`` monitored router layers, ``E`` experts (the largest expert count of any layer; a layer with
fewer experts has zero-padded columns beyond its own ``num_experts``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# Per-layer statistics of SPEC §3, in the column order of ``RouterMonitor.layer_frame()``.
STAT_NAMES: tuple[str, ...] = (
    "dropped_fraction",
    "load_entropy",
    "max_violation",
    "cv",
    "gini",
    "dead_experts",
    "aux_loss",
    "z_loss",
    "router_entropy",
    "top1_confidence",
    "unrouted_fraction",
    "skipped_fraction",
)


@dataclass(frozen=True)
class Snapshot:
    """The statistics of one window, returned by ``RouterMonitor.collect`` (all tensors on the CPU).

    Attributes:
        step: the step number given to ``collect``.
        phase: ``"train"``, ``"val"`` or any phase name given to ``collect``.
        layer_names: module path of each router, in model order.
        num_experts: experts of each layer.
        top_k: experts chosen per token of each layer.
        counts: ``int64 [L, E]`` assignments selected per expert (before capacity dropping).
        tokens: ``int64 [L]`` tokens routed (padding excluded when a mask was known).
        dropped: ``int64 [L]`` assignments dropped for capacity (only: skipped assignments are in ``skipped``).
        nonfinite_tokens: ``int64 [L]`` tokens whose router logits hold a NaN or +Inf (or are all -Inf), left out
            of every statistic. A -Inf logit alone is a masked expert, not a fault.
        stats: SPEC §3 statistic name (see :data:`STAT_NAMES`) -> ``float64 [L]``; NaN where a router cannot
            provide it or the window was empty.
        extras: further ``float64`` tensors with a leading ``L`` dimension, e.g. ``"coactivation"``
            ``[L, E, E]`` and ``"counterfactual_drop@1.0"`` ``[L]``.
        kept: ``int64 [L, E]`` assignments each expert ran: ``counts`` less the dropped and the skipped ones;
            ``None`` (the default) means nothing was dropped or skipped and reads back as ``counts``.
        skipped: ``int64 [L]`` assignments a random policy of the router skipped (e.g. st-moe's second expert);
            ``None`` (the default) reads back as zeros.

    Example:
        >>> snap = Snapshot(step=1, phase="train", layer_names=["r"], num_experts=[2], top_k=[1],
        ...     counts=torch.tensor([[3, 1]]), tokens=torch.tensor([4]), dropped=torch.tensor([0]),
        ...     nonfinite_tokens=torch.tensor([0]), stats={})
        >>> snap.kept.tolist(), snap.skipped.tolist()
        ([[3, 1]], [0])
    """

    step: int
    phase: str
    layer_names: list[str]
    num_experts: list[int]
    top_k: list[int]
    counts: torch.Tensor
    tokens: torch.Tensor
    dropped: torch.Tensor
    nonfinite_tokens: torch.Tensor
    stats: dict[str, torch.Tensor]
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    kept: torch.Tensor | None = None
    skipped: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.kept is None:
            object.__setattr__(self, "kept", self.counts)
        if self.skipped is None:
            object.__setattr__(self, "skipped", torch.zeros_like(self.dropped))

    @property
    def loads(self) -> torch.Tensor:
        """``float64 [L, E]``: each expert's share of its layer's assignments (NaN for an empty window)."""
        counts = self.counts.double()
        return counts / counts.sum(dim=1, keepdim=True)
