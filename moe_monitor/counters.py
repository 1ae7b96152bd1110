"""On-device window counters: what each router forward adds, packed so one collective reduces every layer.

Shape legend: ``L`` monitored layers, ``E`` experts (the largest of any layer), ``T`` tokens in one forward,
``A`` assignments in one forward, ``F`` packed fields per layer, ``C`` counterfactual capacity factors.

Per phase there is one ``float64 [L, F]`` buffer on the routers' device (float64 counts are exact to 2**53). One row
per layer, laid out by :class:`Layout`: ``counts [E] | prob_sum [E] | coactivation [E*E] (optional) | scalars``.
A forward adds one row vector built by :func:`forward_update`; nothing here ever reads a value back to the host.
``torch.bincount`` is avoided on purpose: on CUDA it reads the input's max to size its output (a host sync) even
when ``minlength`` is given; ``index_add_`` into a fixed-size buffer does not.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from moe_monitor.routing import Routing

# Per-layer scalar fields, after the per-expert blocks.
SCALARS: tuple[str, ...] = (
    "tokens",  # routed tokens, padding and non-finite tokens excluded
    "nonfinite_tokens",  # non-padding tokens whose router logits had a NaN or +inf, or were all -inf
    "prob_tokens",  # tokens whose router probabilities were known
    "logit_tokens",  # tokens whose router logits were known
    "z_sum",  # sum of logsumexp(logits)**2
    "entropy_sum",  # sum of normalised router entropies
    "top1_sum",  # sum of largest router probabilities
    "dropped",  # assignments dropped for capacity
    "drop_unknown",  # assignments of a router with a capacity that did not say which it dropped
    "cf_assignments",  # assignments of the forwards where the counterfactual drop was evaluated
    "disabled",  # 0 from the hooks; set to 1 at collect time by a process that stopped monitoring the layer
)


class ExpertCountMismatch(ValueError):
    """A router's logits or probabilities have ``width`` columns, but its layer was registered with ``num_experts``.

    Their statistics would silently mix up experts (or index past the buffer), so the counters refuse the forward.
    """

    def __init__(self, width: int, num_experts: int) -> None:
        super().__init__(f"router scores have {width} expert columns, but num_experts={num_experts}")
        self.width, self.num_experts = width, num_experts


class Layout:
    """Column layout of the packed ``[L, F]`` window buffer.

    Example:
        >>> layout = Layout(num_experts=4, coactivation=True, capacity_factors=(1.0, 1.25))
        >>> layout.width, layout.scalar("tokens")
        (37, 24)
    """

    def __init__(self, num_experts: int, coactivation: bool, capacity_factors: Sequence[float]) -> None:
        e = num_experts
        self.num_experts = e
        self.coactivation = coactivation
        self.capacity_factors = tuple(float(cf) for cf in capacity_factors)
        self.counts = slice(0, e)
        self.prob_sum = slice(e, 2 * e)
        self.coact = slice(2 * e, 2 * e + (e * e if coactivation else 0))
        self._scalar0 = self.coact.stop
        names = SCALARS + tuple(f"cf_dropped@{float(cf)!r}" for cf in self.capacity_factors)
        self._scalar_index = {name: self._scalar0 + i for i, name in enumerate(names)}
        self.width = self._scalar0 + len(names)

    @property
    def scalar_names(self) -> tuple[str, ...]:
        """Names of the scalar fields, in column order."""
        return tuple(self._scalar_index)

    def scalar(self, name: str) -> int:
        """Column of a scalar field (see :data:`SCALARS`, plus ``cf_dropped@<cf>``)."""
        return self._scalar_index[name]


def forward_update(
    routing: Routing,
    num_experts: int,
    top_k: int,
    layout: Layout,
    mask_T: torch.Tensor | None = None,
    coactivation: bool = False,
    counterfactual: bool = False,
    dropless: bool = True,
) -> torch.Tensor:
    """What one router forward adds to its layer's row of the window buffer: ``float64 [F]``, on the router's device.

    Runs inside a forward hook, so it only launches device work: no value is read back to the host, and no
    Python branch depends on a tensor value (only on shapes, dtypes and which fields the router provides).

    Args:
        routing: the forward's routing decisions.
        num_experts: ``E`` of this layer (``<= layout.num_experts``).
        top_k: ``k`` of this layer (for the counterfactual capacity).
        layout: the buffer layout.
        mask_T: ``[T]`` 1 for real tokens, 0 for padding; ``None`` counts every token.
        coactivation: add the ``[E, E]`` co-selection counts.
        counterfactual: evaluate the drop a capacity ``ceil(T / E * k * cf)`` would cause (dropless routers).
        dropless: the router has no capacity limit, so ``routing.kept_A is None`` means nothing was dropped; when
            ``False`` such a forward's assignments count as ``drop_unknown`` (its dropped fraction is not known).

    Raises:
        ExpertCountMismatch: the logits or probabilities are not ``num_experts`` wide (a shape check, no sync).

    Example:
        >>> layout = Layout(num_experts=3, coactivation=False, capacity_factors=())
        >>> update = forward_update(Routing.from_topk(torch.tensor([[0], [2], [2]])), 3, 1, layout)
        >>> update[layout.counts].tolist(), update[layout.scalar("tokens")].item()
        ([1.0, 0.0, 2.0], 3.0)
    """
    # Under the caller's autocast (bf16-mixed training) the matrix products below would run in bf16 and round the
    # sums (z_loss, aux_loss, co-activation counts above 256); the router statistics are defined in fp32.
    device = routing.expert_idx_A.device
    if not _autocast_on(device):  # entering an autocast context costs more than this check
        return _update(routing, num_experts, top_k, layout, mask_T, coactivation, counterfactual, dropless)
    with torch.autocast(device.type, enabled=False):
        return _update(routing, num_experts, top_k, layout, mask_T, coactivation, counterfactual, dropless)


def _autocast_on(device: torch.device) -> bool:
    available = getattr(torch.amp, "is_autocast_available", lambda kind: kind in ("cpu", "cuda"))
    return available(device.type) and torch.is_autocast_enabled(device.type)


def _update(
    routing: Routing,
    num_experts: int,
    top_k: int,
    layout: Layout,
    mask_T: torch.Tensor | None,
    coactivation: bool,
    counterfactual: bool,
    dropless: bool,
) -> torch.Tensor:
    e, width = num_experts, layout.num_experts
    device = routing.expert_idx_A.device
    num_tokens = routing.num_tokens
    scalars = dict.fromkeys(SCALARS)

    mask_T = None if mask_T is None else mask_T.to(device, torch.float32)
    # Explicit widths: reshape(0, -1) cannot infer the width of a forward with no tokens.
    logits_TE = None if routing.logits_TE is None else _rows(routing.logits_TE, num_tokens)
    probs_TE = None if routing.probs_TE is None else _rows(routing.probs_TE, num_tokens)

    for values_TE in (logits_TE, probs_TE):
        if values_TE is not None and values_TE.shape[1] != e:
            raise ExpertCountMismatch(values_TE.shape[1], e)

    has_logits, has_probs = logits_TE is not None, logits_TE is not None or probs_TE is not None
    prob_sum_E = None
    if has_probs:
        # A token with a NaN or +inf logit (or a non-finite probability) is counted apart and masked out of every
        # statistic. A -inf logit is a legitimate mask (an expert the router may not choose, e.g. group-limited
        # routing): probability 0. Only a token whose logits are all -inf has no distribution. The row max tells
        # all three apart in one reduction (NaN propagates through amax), and it is the softmax shift anyway.
        columns_TC = []
        if has_logits:
            # Softmax, logsumexp, entropy and top-1 probability from one exp: torch.logsumexp alone costs more on
            # the CPU than all of this. Masked (-inf) entries give exp 0, so z_loss is the logsumexp over the finite
            # entries.
            max_T1 = logits_TE.amax(dim=-1, keepdim=True)
            finite_T = max_T1.squeeze(1).isfinite()
            shifted_TE = logits_TE - max_T1
            exp_TE = shifted_TE.exp()
            sumexp_T1 = exp_TE.sum(dim=-1, keepdim=True)
            log_sumexp_T1 = sumexp_T1.log()
            columns_TC.append((max_T1 + log_sumexp_T1).square())
            if probs_TE is not None:
                finite_T = finite_T & probs_TE.isfinite().all(dim=-1)
        else:
            finite_T = probs_TE.isfinite().all(dim=-1)
        if probs_TE is None:
            probs_TE = exp_TE / sumexp_T1
            top1_T1 = sumexp_T1.reciprocal()  # the largest probability is exp(0) / sum
            # A masked expert has p = 0 and shifted = -inf; clamping makes its p * shifted 0 (0 ln 0 = 0), not NaN.
            entropy_T1 = log_sumexp_T1 - (probs_TE * shifted_TE.clamp_min(-1e30)).sum(dim=-1, keepdim=True)
        else:
            top1_T1 = probs_TE.amax(dim=-1, keepdim=True)
            entropy_T1 = -torch.special.xlogy(probs_TE, probs_TE).sum(dim=-1, keepdim=True)
        entropy_T1 = entropy_T1 * (1.0 / math.log(e) if e > 1 else 0.0)
        if mask_T is None:
            scalars["nonfinite_tokens"] = (~finite_T).sum()
            valid_T = finite_T.float()
        else:
            scalars["nonfinite_tokens"] = (mask_T * ~finite_T).sum()
            valid_T = mask_T * finite_T
        # One matrix-vector product gives every per-token sum at once; torch.where (not the 0 weight alone) keeps a
        # non-finite token's NaN out of the sums, as NaN * 0 is NaN.
        columns_TC = torch.where(finite_T[:, None], torch.cat([probs_TE, top1_T1, entropy_T1, *columns_TC], dim=1), 0.0)
        sums_C = valid_T @ columns_TC
        prob_sum_E = sums_C[:e]
        scalars["top1_sum"], scalars["entropy_sum"] = sums_C[e], sums_C[e + 1]
        if has_logits:
            scalars["z_sum"] = sums_C[e + 2]
    else:
        valid_T = torch.ones(num_tokens, device=device) if mask_T is None else mask_T

    weight_A = valid_T.index_select(0, routing.token_idx_A)
    # An expert index outside [0, E) (some routers mark "no expert" with -1 or E) is not an assignment. Masking it
    # instead of indexing with it matters on CUDA, where an out-of-range index is a device-side assert that ends the
    # process, and checking for one would need a host sync.
    expert_idx_A = routing.expert_idx_A
    in_range_A = (expert_idx_A >= 0) & (expert_idx_A < e)
    weight_A = weight_A * in_range_A
    expert_idx_A = expert_idx_A.clamp(0, e - 1)
    counts_E = torch.zeros(e, device=device).index_add_(0, expert_idx_A, weight_A)
    tokens = valid_T.sum()
    scalars["tokens"] = tokens
    # Probabilities / logits are known for every counted token, or for none (then their statistics are NaN).
    scalars["prob_tokens"] = tokens if has_probs else None
    scalars["logit_tokens"] = tokens if has_logits else None
    if routing.kept_A is not None:
        scalars["dropped"] = (weight_A * ~routing.kept_A.reshape(-1)).sum()
    elif not dropless:
        scalars["drop_unknown"] = counts_E.sum()

    parts = [_pad(counts_E, width), _pad(prob_sum_E, width) if prob_sum_E is not None else counts_E.new_zeros(width)]
    if layout.coactivation:
        coact = counts_E.new_zeros(width, width)
        if coactivation:
            # index_add_ into the flattened [T, E] dispatch matrix: known sync-free on CUDA, like the counts above.
            flat_idx_A = routing.token_idx_A * e + expert_idx_A
            dispatch_TE = torch.zeros(num_tokens * e, device=device).index_add_(0, flat_idx_A, weight_A)
            dispatch_TE = dispatch_TE.view(num_tokens, e)
            coact[:e, :e] = dispatch_TE.T @ dispatch_TE
        parts.append(coact.reshape(-1))

    cf_dropped = []
    if counterfactual:
        scalars["cf_assignments"] = counts_E.sum()
        for cf in layout.capacity_factors:
            capacity = torch.ceil(tokens * (top_k * cf / e))
            cf_dropped.append((counts_E - capacity).clamp_min(0).sum())
    zero = counts_E.new_zeros(())
    scalar_values = [zero if v is None else v for v in scalars.values()]
    scalar_values += cf_dropped or [zero] * len(layout.capacity_factors)
    parts.append(torch.stack(scalar_values))
    return torch.cat(parts).to(torch.float32 if device.type == "mps" else torch.float64)  # MPS has no float64


def _rows(values_TE: torch.Tensor, num_tokens: int) -> torch.Tensor:
    return values_TE.detach().reshape(num_tokens, values_TE.shape[-1]).float()


def _pad(values_E: torch.Tensor, width: int) -> torch.Tensor:
    return values_E if values_E.shape[0] == width else torch.nn.functional.pad(values_E, (0, width - values_E.shape[0]))
