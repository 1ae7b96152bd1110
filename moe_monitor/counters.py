"""On-device window counters: what each router forward adds, packed so one collective reduces every layer.

Shape legend: ``L`` monitored layers, ``E`` experts (the largest of any layer), ``T`` tokens in one forward,
``A`` assignments in one forward, ``F`` packed fields per layer, ``C`` counterfactual capacity factors.

Per phase there is one ``float64 [L, F]`` buffer on the routers' device (float64 counts are exact to 2**53). One row
per layer, laid out by :class:`Layout`: ``counts [E] | prob_sum [E] | coactivation [E*E] (optional) | lost [E] |
scalars``;
the per-token work matrix of one forward is laid out by :class:`WorkColumns`.
:func:`forward_update` adds one forward to its layer's row; nothing here ever reads a value back to the host.
``torch.bincount`` is avoided on purpose: on CUDA it reads the input's max to size its output (a host sync) even
when ``minlength`` is given; ``index_add_`` into a fixed-size buffer does not.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from moe_monitor.routing import Routing

# Per-layer scalar fields, after the per-expert blocks.
SCALARS: tuple[str, ...] = (
    "tokens",  # routed tokens, padding and non-finite tokens excluded
    "nonfinite_tokens",  # non-padding tokens whose router logits had a NaN or +inf, or were all -inf
    "unrouted_tokens",  # counted tokens that no expert selected (expert choice: picked by none of the experts)
    "prob_tokens",  # tokens whose router probabilities were known
    "logit_tokens",  # tokens whose router logits were known
    "z_sum",  # sum of logsumexp(logits)**2
    "entropy_sum",  # sum of normalised router entropies
    "top1_sum",  # sum of largest router probabilities
    "dropped",  # assignments dropped for capacity
    "skipped",  # assignments a random policy of the router skipped (not a capacity drop)
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


class WorkColumns:
    """Named rows of the ``[C, T]`` per-token work matrix of one forward, and the window field each one sums into.

    :func:`forward_update` writes every per-token quantity into a row of this matrix and sums all of them over the
    tokens with one matrix product; :meth:`Layout._scatter` files each sum under the window field given here, so
    the hook and the scatter share this one table instead of two sets of offsets.

    Rows: ``dispatch`` ``[E]`` (how often the token chose each expert) | ``valid`` (1 for a finite token) |
    ``unrouted`` (1 when no expert selected the token), then with router probabilities ``probs`` ``[E]`` |
    ``top1`` | ``entropy`` (normalised), and with logits ``z`` (``logsumexp**2``).

    Example:
        >>> columns = WorkColumns(num_experts=3, has_probs=True, has_logits=False)
        >>> columns.width, columns.probs, columns.top1
        (10, slice(5, 8, None), slice(8, 9, None))
        >>> columns.sums[:3]
        (('dispatch', 'counts'), ('valid', 'tokens'), ('unrouted', 'unrouted_tokens'))
    """

    def __init__(self, num_experts: int, has_probs: bool, has_logits: bool) -> None:
        e = num_experts
        self.dispatch = slice(0, e)
        self.valid = slice(e, e + 1)
        self.weights = slice(0, e + 1)  # dispatch | valid: the rows of the product (co-activation, then the sums)
        self.unrouted = slice(e + 1, e + 2)
        self.probs = slice(e + 2, 2 * e + 2) if has_probs else None
        self.top1 = slice(2 * e + 2, 2 * e + 3) if has_probs else None
        self.entropy = slice(2 * e + 3, 2 * e + 4) if has_probs else None
        self.z = slice(2 * e + 4, 2 * e + 5) if has_probs and has_logits else None
        self.width = e + 2 + (e + 2 + has_logits if has_probs else 0)
        self.key = (e, has_probs, has_logits)
        # (row, window field): the field each row's sum over the tokens is added to.
        sums = [("dispatch", "counts"), ("valid", "tokens"), ("unrouted", "unrouted_tokens")]
        if has_probs:
            sums += [("probs", "prob_sum"), ("valid", "prob_tokens"), ("top1", "top1_sum"), ("entropy", "entropy_sum")]
            if has_logits:
                sums += [("valid", "logit_tokens"), ("z", "z_sum")]
        self.sums: tuple[tuple[str, str], ...] = tuple(sums)


class Layout:
    """Column layout of the packed ``[L, F]`` window buffer.

    Example:
        >>> layout = Layout(num_experts=4, coactivation=True, capacity_factors=(1.0, 1.25))
        >>> layout.width, layout.scalar("tokens")
        (43, 28)

    ``lost [E]`` holds, per expert, the assignments that did not run (dropped for capacity or skipped by a random
    policy); a router that reports neither adds nothing there, so the kept counts ``counts - lost`` cost it nothing.
    """

    def __init__(self, num_experts: int, coactivation: bool, capacity_factors: Sequence[float]) -> None:
        e = num_experts
        self.num_experts = e
        self.coactivation = coactivation
        self.capacity_factors = tuple(float(cf) for cf in capacity_factors)
        self.counts = slice(0, e)
        self.prob_sum = slice(e, 2 * e)
        self.coact = slice(2 * e, 2 * e + (e * e if coactivation else 0))
        self.lost = slice(self.coact.stop, self.coact.stop + e)
        self._scalar0 = self.lost.stop
        names = SCALARS + tuple(f"cf_dropped@{float(cf)!r}" for cf in self.capacity_factors)
        self._scalar_index = {name: self._scalar0 + i for i, name in enumerate(names)}
        self.width = self._scalar0 + len(names)
        self._constants: dict[tuple, Any] = {}
        self._counterfactual_fields = ("cf_assignments", *names[len(SCALARS) :])

    @property
    def scalar_names(self) -> tuple[str, ...]:
        """Names of the scalar fields, in column order."""
        return tuple(self._scalar_index)

    def scalar(self, name: str) -> int:
        """Column of a scalar field (see :data:`SCALARS`, plus ``cf_dropped@<cf>``)."""
        return self._scalar_index[name]

    # Small constant device tensors of forward_update, made once per shape of forward (never per call: on CUDA a
    # tensor made from a Python list is a host-to-device copy).
    def _cached(self, key: tuple, make: Callable[[], Any]) -> Any:
        value = self._constants.get(key)
        if value is None:
            value = self._constants[key] = make()
        return value

    def _capacity_rates(self, fields: tuple[str, ...], top_k: int, e: int, device: torch.device) -> torch.Tensor:
        # Capacity per routed token: k * cf / E for a counterfactual, 0 (nothing kept) for a total of the counts.
        def make() -> torch.Tensor:
            cfs = dict(zip(self.scalar_names[len(SCALARS) :], self.capacity_factors))
            rates = [top_k * cfs[name] / e if name in cfs else 0.0 for name in fields]
            return torch.tensor(rates, dtype=torch.float32, device=device)

        return self._cached(("rates", fields, top_k, e, device), make)

    def work_columns(self, e: int, has_probs: bool, has_logits: bool) -> WorkColumns:
        """The :class:`WorkColumns` of a forward of ``e`` experts (made once per kind of forward)."""
        return self._cached(("columns", e, has_probs, has_logits), lambda: WorkColumns(e, has_probs, has_logits))

    def field(self, name: str) -> slice:
        """Columns of a window field: ``counts``, ``prob_sum``, ``coact``, ``lost`` or a scalar (one column)."""
        if name in ("counts", "prob_sum", "coact", "lost"):
            return getattr(self, name)
        column = self.scalar(name)
        return slice(column, column + 1)

    def _scatter(
        self,
        columns: WorkColumns,
        rows: int,
        coactivation: bool,
        extras: tuple[str, ...],
        device: torch.device,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Which of forward_update's values (its [rows, C] product, flattened, then the extra scalars) goes to which
        # window column. The product's last row holds the sums over the tokens, one per work row. The extras are
        # scalars, except "lost": one value per expert of this forward.
        def make() -> tuple[torch.Tensor, torch.Tensor]:
            width, last = columns.width, (rows - 1) * columns.width
            pairs = []
            for row_name, field_name in columns.sums:
                source, destination = getattr(columns, row_name), self.field(field_name)
                pairs += [(last + source.start + j, destination.start + j) for j in range(source.stop - source.start)]
            if coactivation:
                e, stride = columns.dispatch.stop, self.num_experts
                pairs += [(i * width + j, self.coact.start + i * stride + j) for i in range(e) for j in range(e)]
            offset = rows * width
            for name in extras:
                destination = self.field(name)
                size = columns.dispatch.stop if name == "lost" else 1
                pairs += [(offset + j, destination.start + j) for j in range(size)]
                offset += size
            source, destination = torch.tensor(pairs, dtype=torch.int64).T
            return source.to(device), destination.to(device)

        return self._cached(("scatter", columns.key, rows, coactivation, extras, device), make)


def forward_update(
    routing: Routing,
    num_experts: int,
    top_k: int,
    layout: Layout,
    mask_T: torch.Tensor | None = None,
    coactivation: bool = False,
    counterfactual: bool = False,
    dropless: bool = True,
    out_F: torch.Tensor | None = None,
    unrouted: bool = True,
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
        out_F: the ``[F]`` buffer row to add the update to (float64, or float32 on MPS); ``None`` adds it to a new
            zero row.
        unrouted: count the tokens no expert selected (``unrouted_tokens``). A caller that knows every token is
            routed (token choice without "no expert" marks: each token gets its ``k`` experts) may pass ``False``
            to save the two ops per forward; the count then reads 0.

    Returns:
        ``out_F``, or the new row.

    Raises:
        ExpertCountMismatch: the logits or probabilities are not ``num_experts`` wide (a shape check, no sync).

    Example:
        >>> layout = Layout(num_experts=3, coactivation=False, capacity_factors=())
        >>> update = forward_update(Routing.from_topk(torch.tensor([[0], [2], [2]])), 3, 1, layout)
        >>> update[layout.counts].tolist(), update[layout.scalar("tokens")].item()
        ([1.0, 0.0, 2.0], 3.0)
    """
    device = routing.expert_idx_A.device
    if out_F is None:
        out_F = torch.zeros(layout.width, dtype=torch.float32 if device.type == "mps" else torch.float64, device=device)
    # Under the caller's autocast (bf16-mixed training) the matrix product below would run in bf16 and round the
    # sums (z_loss, aux_loss, co-activation counts above 256); the router statistics are defined in fp32.
    if not _autocast_on(device):  # entering an autocast context costs more than this check
        _update(routing, num_experts, top_k, layout, mask_T, coactivation, counterfactual, dropless, out_F, unrouted)
    else:
        with torch.autocast(device.type, enabled=False):
            _update(
                routing, num_experts, top_k, layout, mask_T, coactivation, counterfactual, dropless, out_F, unrouted
            )
    return out_F


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
    out_F: torch.Tensor,
    unrouted: bool,
) -> None:
    # Every per-token quantity is a row of one matrix values_CT (rows named by WorkColumns) and every sum over
    # tokens comes out of one matrix product, then one index_add_ scatters the sums into the row: a few dozen small
    # ops per forward, as the CPU cost of a hook is per op, not per element.
    # NOTE every tensor made here names its dtype: Lightning's "-true" precisions (bf16-true, 16-true, 64-true) run
    # the forward, and so this hook, under a changed default dtype, and the statistics are defined in fp32.
    e = num_experts
    device = routing.expert_idx_A.device
    num_tokens = routing.num_tokens
    weight_1T = None  # per-token weight of the sums beyond the 0 of a non-finite token's values: none, or a tensor
    coactivation = coactivation and layout.coactivation

    mask_T = None if mask_T is None else mask_T.to(device, torch.float32)
    # Explicit widths: reshape(0, -1) cannot infer the width of a forward with no tokens.
    logits_TE = None if routing.logits_TE is None else _rows(routing.logits_TE, num_tokens)
    probs_TE = None if routing.probs_TE is None else _rows(routing.probs_TE, num_tokens)

    for values_TE in (logits_TE, probs_TE):
        if values_TE is not None and values_TE.shape[1] != e:
            raise ExpertCountMismatch(values_TE.shape[1], e)
    has_logits, has_probs = logits_TE is not None, logits_TE is not None or probs_TE is not None
    col = layout.work_columns(e, has_probs, has_logits)

    # The [E, T] dispatch rows: how often each token chose each expert. An expert index outside [0, E) (some
    # routers mark "no expert" with -1 or E) is not an assignment. Masking it instead of indexing with it matters on
    # CUDA, where an out-of-range index is a device-side assert that ends the process, and checking for one would
    # need a host sync.
    expert_idx_A = routing.expert_idx_A
    clamped_A = expert_idx_A.clamp(0, e - 1)
    in_range_A = (clamped_A == expert_idx_A).to(torch.float32)
    # Each per-token quantity is written in place (out=) into a row of the [C, T] matrix, which costs less than
    # concatenating them (and a compiled graph accepts only contiguous out= tensors).
    values_CT = torch.zeros(col.width, num_tokens, dtype=torch.float32, device=device)
    values_CT.view(-1).index_add_(0, routing.token_idx_A.add(clamped_A, alpha=num_tokens), in_range_A)
    valid_1T = values_CT[col.valid]
    if unrouted:
        # Expert choice leaves tokens no expert picked: routed nowhere, they would otherwise go uncounted.
        torch.sum(values_CT[col.dispatch], dim=0, keepdim=True, out=values_CT[col.unrouted]).eq_(0.0)

    if has_probs:
        # A token with a NaN or +inf logit (or a non-finite probability) is counted apart and masked out of every
        # statistic. A -inf logit is a legitimate mask (an expert the router may not choose, e.g. group-limited
        # routing): probability 0. Only a token whose logits are all -inf has no distribution.
        derived = probs_TE is None
        if has_logits:
            # Softmax, logsumexp, entropy and top-1 probability from one exp: torch.logsumexp alone costs more on
            # the CPU than all of this. Masked (-inf) entries give exp 0, so z_loss is the logsumexp over the finite
            # entries. The row max is the softmax shift; when it is NaN or infinite (a NaN or +inf logit, or all
            # -inf) every shifted entry is NaN, so the sum of exps is NaN exactly for the non-finite tokens.
            max_T1 = logits_TE.amax(dim=-1, keepdim=True)
            shifted_TE = logits_TE - max_T1
            exp_TE = shifted_TE.exp()
            sumexp_T1 = exp_TE.sum(dim=-1, keepdim=True)
            log_sumexp_T1 = sumexp_T1.log()
            sumexp_1T = sumexp_T1.T
            torch.square((max_T1 + log_sumexp_T1).T, out=values_CT[col.z])
            if not derived:
                finite_T1 = (sumexp_T1 == sumexp_T1) & probs_TE.isfinite().all(dim=-1, keepdim=True)
        else:
            finite_T1 = probs_TE.isfinite().all(dim=-1, keepdim=True)
        if derived:
            probs_ET = torch.div(exp_TE.T, sumexp_1T, out=values_CT[col.probs])
            torch.reciprocal(sumexp_1T, out=values_CT[col.top1])  # the largest p is exp(0) / sum
            # A masked expert has p = 0 and shifted = -inf; clamping makes its p * shifted 0 (0 ln 0 = 0), not NaN.
            entropy_T1 = log_sumexp_T1 - (probs_ET.T * shifted_TE.clamp_min(-1e30)).sum(dim=-1, keepdim=True)
            # 1 for a finite token; NaN, like every other value of a non-finite token, for the others.
            torch.clamp(sumexp_1T, max=1.0, out=valid_1T)
        else:
            values_CT[col.probs] = probs_TE.T
            torch.amax(probs_TE.T, dim=0, keepdim=True, out=values_CT[col.top1])
            entropy_T1 = -torch.special.xlogy(probs_TE, probs_TE).sum(dim=-1, keepdim=True)
            valid_1T.fill_(1.0)
        # One expert: the router has no choice, its distribution is a point mass (entropy 0 of a range of 0).
        torch.mul(entropy_T1.T, 1.0 / math.log(e) if e > 1 else 0.0, out=values_CT[col.entropy])
        # A non-finite token's NaN must stay out of the sums (a 0 weight would not do: NaN * 0 is NaN). Derived from
        # the logits, every value of such a token is NaN and no other value is, so zeroing the NaNs (one fast
        # elementwise pass; +-inf stay) masks those tokens' statistics, and the valid weight below their dispatch.
        if derived:
            values_CT.nan_to_num_(0.0, math.inf, -math.inf)
            weight_1T = valid_1T
        else:
            values_CT = torch.where(finite_T1.T, values_CT, 0.0)
            valid_1T = values_CT[col.valid]
    else:
        valid_1T.fill_(1.0)
    if mask_T is not None:
        weight_1T = mask_T[None] if weight_1T is None else mask_T[None] * weight_1T

    # The last row of the product: sums over the counted tokens; rows 0..E-1: co-activation counts.
    if coactivation:
        weights_RT = values_CT[col.weights] if weight_1T is None else weight_1T * values_CT[col.weights]
    else:
        weights_RT = valid_1T if weight_1T is None else weight_1T
    sums_RC = weights_RT @ values_CT.T
    sums_C = sums_RC[-1]
    tokens = sums_C[col.valid.start]

    extras, extra_values = [], []
    if has_probs:
        extras.append("nonfinite_tokens")
        total = num_tokens if mask_T is None else mask_T.sum()
        extra_values.append((total - tokens).reshape(1))
    if routing.kept_A is not None or routing.skipped_A is not None:
        # Assignments that did not run: dropped for capacity (kept_A False) or skipped by a random policy
        # (skipped_A True), per expert into "lost" (kept = counts - lost), with the weights of the counts.
        valid_T = valid_1T[0] if mask_T is None else mask_T * valid_1T[0]
        weight_A = valid_T.index_select(0, routing.token_idx_A) * in_range_A
        ran_A = weight_A
        if routing.kept_A is not None:
            kept_A = routing.kept_A.reshape(-1)
            extras.append("dropped")
            extra_values.append((weight_A * ~kept_A).sum().reshape(1))
            ran_A = ran_A * kept_A
        if routing.skipped_A is not None:
            skipped_A = routing.skipped_A.reshape(-1)
            extras.append("skipped")
            extra_values.append((weight_A * skipped_A).sum().reshape(1))
            ran_A = ran_A * ~skipped_A
        extras.append("lost")
        lost_E = torch.zeros(e, dtype=torch.float32, device=device)
        extra_values.append(lost_E.index_add_(0, clamped_A, weight_A - ran_A))
    # Counts of the forward minus each capacity, for all capacities at once (a capacity of 0 gives the total).
    capacity_fields = ("drop_unknown",) if routing.kept_A is None and not dropless else ()
    if counterfactual:
        capacity_fields += layout._counterfactual_fields
    if capacity_fields:
        counts_E1 = sums_C[col.dispatch, None]
        capacity_X = torch.ceil(tokens * layout._capacity_rates(capacity_fields, top_k, e, device))
        extras += capacity_fields
        extra_values.append((counts_E1 - capacity_X).clamp_min(0).sum(dim=0))

    values = sums_RC.view(-1)
    if extra_values:
        values = torch.cat([values, *extra_values])
    source, destination = layout._scatter(col, sums_RC.shape[0], coactivation, tuple(extras), device)
    out_F.index_add_(0, destination, values.index_select(0, source).to(out_F.dtype))


def _rows(values_TE: torch.Tensor, num_tokens: int) -> torch.Tensor:
    # fp32 whatever the router's dtype (bf16, fp16, fp64): the statistics are defined in fp32.
    return values_TE.detach().reshape(num_tokens, values_TE.shape[-1]).float()
