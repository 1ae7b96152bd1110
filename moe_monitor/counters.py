"""On-device window counters: what each router forward adds, packed so one collective reduces every layer.

Shape legend: ``L`` monitored layers, ``E`` experts (the largest of any layer), ``T`` tokens in one forward,
``A`` assignments in one forward, ``F`` packed fields per layer, ``S`` sums of one forward, ``C`` rows of its
per-token work matrix (``R`` with the work space rows), ``X`` tokens of one chunk of the router statistics (``N``
in the current chunk), ``Q`` capacities evaluated at once, ``V`` values filed into a row.

Per phase there is one ``float64 [L, F]`` buffer on the routers' device (float64 counts are exact to 2**53). One row
per layer, laid out by :class:`Layout`: ``counts [E] | prob_sum [E] | coactivation [E*E] (optional) | lost [E] |
scalars``; the sums of one forward and its per-token work matrix are laid out by :class:`WorkColumns`.
:func:`forward_update` adds one forward to its layer's row; nothing here ever reads a value back to the host. The
router statistics are exact (means over every token) and read the logits in token chunks that stay in cache, in a
few passes each (see ``_router_statistics``).
``torch.bincount`` is avoided on purpose: on CUDA it reads the input's max to size its output (a host sync) even
when ``minlength`` is given; ``index_add_`` into a fixed-size buffer does not.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from itertools import repeat
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
    """Named entries of the ``[S]`` sums of one forward, and the window field each one is added to.

    :func:`forward_update` adds every sum over the tokens of a forward into one ``float32 [S]`` vector laid out
    here, and :meth:`Layout._scatter` files each entry under the window field given here, so the hook and the
    scatter share this one table instead of two sets of offsets.

    Entries: ``dispatch`` ``[E]`` (assignments per expert), with router probabilities ``probs`` ``[E]`` (the
    probability sums) and ``entropy_terms`` ``[E]`` (per expert, the ``-p log p`` part of the normalised entropy
    not held per token; all ``E`` add to ``entropy_sum``), each one product per token chunk; then the sums of the
    per-token rows of the forward's ``[C, T]`` work matrix (``per_token``; one product sums them all): with
    ``dispatch_rows`` the ``E`` dispatch rows (how often the token chose each expert: the co-activation product
    needs them, and the counts then come with the other sums), ``valid`` (1 for a finite token), ``unrouted`` (1
    when no expert selected the token; only when counted), with probabilities ``top1`` | ``entropy`` (the
    normalised entropy's per-token part), and with logits ``z`` (``logsumexp**2``). Without ``dispatch_rows`` the
    counts are added from the assignment indices into the first block.

    Example:
        >>> columns = WorkColumns(num_experts=3, has_probs=True, has_logits=False)
        >>> columns.width, columns.probs, columns.top1, columns.per_token
        (13, slice(3, 6, None), slice(11, 12, None), slice(9, 13, None))
        >>> columns.work("top1"), columns.sums[:3]
        (2, (('dispatch', 'counts'), ('valid', 'tokens'), ('unrouted', 'unrouted_tokens')))
        >>> WorkColumns(3, True, False, dispatch_rows=True).work("valid")
        3
    """

    def __init__(
        self, num_experts: int, has_probs: bool, has_logits: bool, unrouted: bool = True, dispatch_rows: bool = False
    ) -> None:
        e = num_experts
        first = 0 if dispatch_rows else e
        self.probs = slice(first, first + e) if has_probs else None
        self.entropy_terms = slice(first + e, first + 2 * e) if has_probs else None
        first += 2 * e if has_probs else 0
        self.dispatch = slice(first, first + e) if dispatch_rows else slice(0, e)
        names = ("valid",) + (("unrouted",) if unrouted else ()) + (("top1", "entropy") if has_probs else ())
        names += ("z",) if has_probs and has_logits else ()
        rows0 = first + (e if dispatch_rows else 0)
        self.per_token = slice(first, rows0 + len(names))
        for name in ("valid", "unrouted", "top1", "entropy", "z"):
            row = rows0 + names.index(name) if name in names else None
            setattr(self, name, None if row is None else slice(row, row + 1))
        self.width = self.per_token.stop
        self.key = (e, has_probs, has_logits, unrouted, dispatch_rows)
        # (entry, window field): the field each sum is added to.
        sums = [("dispatch", "counts"), ("valid", "tokens")] + ([("unrouted", "unrouted_tokens")] if unrouted else [])
        if has_probs:
            sums += [("probs", "prob_sum"), ("valid", "prob_tokens"), ("top1", "top1_sum"), ("entropy", "entropy_sum")]
            sums += [("entropy_terms", "entropy_sum")]  # E partial sums, all added to the one field
            if has_logits:
                sums += [("valid", "logit_tokens"), ("z", "z_sum")]
        self.sums: tuple[tuple[str, str], ...] = tuple(sums)

    def work(self, name: str) -> int:
        """First row of a per-token entry (``dispatch``, ``valid``, ``unrouted``, ``top1``, ``entropy``, ``z``)."""
        return getattr(self, name).start - self.per_token.start


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

    def work_columns(
        self, e: int, has_probs: bool, has_logits: bool, unrouted: bool = True, dispatch_rows: bool = False
    ) -> WorkColumns:
        """The :class:`WorkColumns` of a forward of ``e`` experts (made once per kind of forward)."""
        key = ("columns", e, has_probs, has_logits, unrouted, dispatch_rows)
        return self._cached(key, lambda: WorkColumns(e, has_probs, has_logits, unrouted, dispatch_rows))

    def field(self, name: str) -> slice:
        """Columns of a window field: ``counts``, ``prob_sum``, ``coact``, ``lost`` or a scalar (one column)."""
        if name in ("counts", "prob_sum", "coact", "lost"):
            return getattr(self, name)
        column = self.scalar(name)
        return slice(column, column + 1)

    def _scatter(
        self,
        columns: WorkColumns,
        coactivation: bool,
        extras: tuple[str, ...],
        device: torch.device,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Which of forward_update's values (its [S] sums, then with co-activation the [E, E] counts, flattened, then
        # the extra scalars) goes to which window column. The extras are scalars, except "lost": one value per
        # expert of this forward.
        def make() -> tuple[torch.Tensor, torch.Tensor]:
            pairs = []
            for entry, field_name in columns.sums:
                source, destination = getattr(columns, entry), self.field(field_name)
                size, into_one = source.stop - source.start, destination.stop - destination.start == 1
                pairs += [(source.start + j, destination.start + (0 if into_one else j)) for j in range(size)]
            offset, e = columns.width, columns.dispatch.stop - columns.dispatch.start
            if coactivation:
                stride = self.num_experts
                pairs += [(offset + i * e + j, self.coact.start + i * stride + j) for i in range(e) for j in range(e)]
                offset += e * e
            for name in extras:
                destination = self.field(name)
                size = e if name == "lost" else 1
                pairs += [(offset + j, destination.start + j) for j in range(size)]
                offset += size
            source, destination = torch.tensor(pairs, dtype=torch.int64).T
            return source.to(device), destination.to(device)

        return self._cached(("scatter", columns.key, coactivation, extras, device), make)


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
    # Every sum over the tokens lands in one [S] vector (entries named by WorkColumns), which one index_add_ files
    # into the row: the per-expert counts straight from the assignment indices, the router statistics from a few
    # passes over each token chunk of the logits (see _router_statistics), the per-token ones from one product.
    # NOTE every tensor made here names its dtype: Lightning's "-true" precisions (bf16-true, 16-true, 64-true) run
    # the forward, and so this hook, under a changed default dtype, and the statistics are defined in fp32.
    e = num_experts
    device = routing.expert_idx_A.device
    num_tokens = routing.num_tokens
    coactivation = coactivation and layout.coactivation
    # Explicit widths: reshape(0, -1) cannot infer the width of a forward with no tokens.
    logits_TE = None if routing.logits_TE is None else _rows(routing.logits_TE, num_tokens)
    probs_TE = None if routing.probs_TE is None else _rows(routing.probs_TE, num_tokens)
    for values_TE in (logits_TE, probs_TE):
        if values_TE is not None and values_TE.shape[1] != e:
            raise ExpertCountMismatch(values_TE.shape[1], e)
    has_logits, has_probs = logits_TE is not None, logits_TE is not None or probs_TE is not None
    col = layout.work_columns(e, has_probs, has_logits, unrouted, dispatch_rows=coactivation)

    sums_S = torch.zeros(col.width, dtype=torch.float32, device=device)
    # The per-token rows: the work matrix's, then 3 of _router_statistics; rows, not columns, per quantity, as a
    # compiled graph accepts only contiguous out= tensors. Then the two chunk buffers of _router_statistics.
    rows = col.per_token.stop - col.per_token.start
    chunk = max(1, min(num_tokens, CHUNK_ELEMENTS // e))
    scratch = _scratch((rows + 3) * num_tokens + (2 * chunk * e if has_probs else 0), device)
    tokens_RT = scratch[: (rows + 3) * num_tokens].view(rows + 3, num_tokens)
    work_CT = tokens_RT[:rows]
    # Per-token weight of every sum: the padding mask, times 1 for a finite token (0 for a non-finite one, whose
    # values the statistics below leave finite, so that 0 times them is 0); None when every weight is 1.
    mask_T = None if mask_T is None else mask_T.to(device, torch.float32)
    weight_T = mask_T
    if has_probs:
        chunks_2XE = scratch[(rows + 3) * num_tokens :].view(2, chunk, e)
        weight_T = _router_statistics(layout, logits_TE, probs_TE, weight_T, col, tokens_RT, chunks_2XE, sums_S)
    else:
        work_CT[col.work("valid")].fill_(1.0)

    # An expert index outside [0, E) (some routers mark "no expert" with -1 or E) is not an assignment. Masking it
    # instead of indexing with it matters on CUDA, where an out-of-range index is a device-side assert that ends the
    # process, and checking for one would need a host sync.
    expert_idx_A = routing.expert_idx_A
    clamped_A = expert_idx_A.clamp(0, e - 1)
    in_range_A = (clamped_A == expert_idx_A).to(torch.float32)
    weight_A = None
    if coactivation:
        # The [E, T] dispatch rows, which the product below sums with the weights into the counts.
        dispatch_ET = work_CT[col.work("dispatch") : col.work("dispatch") + e].zero_()
        dispatch_ET.view(-1).index_add_(0, routing.token_idx_A.add(clamped_A, alpha=num_tokens), in_range_A)
    else:
        weight_A = in_range_A if weight_T is None else weight_T.index_select(0, routing.token_idx_A) * in_range_A
        sums_S[col.dispatch].index_add_(0, clamped_A, weight_A)
    if unrouted:
        # Expert choice leaves tokens no expert picked: routed nowhere, they would otherwise go uncounted.
        work_CT[col.work("unrouted")].zero_().index_add_(0, routing.token_idx_A, in_range_A).eq_(0.0)
    if weight_T is None:
        torch.sum(work_CT, dim=1, out=sums_S[col.per_token])
    else:
        torch.mv(work_CT, weight_T, out=sums_S[col.per_token])
    tokens = sums_S[col.valid.start]

    values = [sums_S]
    extras = []
    if coactivation:
        # The [E, E] co-selection counts: the token-by-expert choices, weighted, times the unweighted ones.
        values.append(((dispatch_ET if weight_T is None else dispatch_ET * weight_T) @ dispatch_ET.T).view(-1))
    if has_probs:
        extras.append("nonfinite_tokens")
        total = num_tokens if mask_T is None else mask_T.sum()
        values.append((total - tokens).reshape(1))
    if routing.kept_A is not None or routing.skipped_A is not None:
        # Assignments that did not run: dropped for capacity (kept_A False) or skipped by a random policy
        # (skipped_A True), per expert into "lost" (kept = counts - lost), with the weights of the counts.
        if weight_A is None:
            weight_A = in_range_A if weight_T is None else weight_T.index_select(0, routing.token_idx_A) * in_range_A
        ran_A = weight_A
        if routing.kept_A is not None:
            kept_A = routing.kept_A.reshape(-1)
            extras.append("dropped")
            values.append((weight_A * ~kept_A).sum().reshape(1))
            ran_A = ran_A * kept_A
        if routing.skipped_A is not None:
            skipped_A = routing.skipped_A.reshape(-1)
            extras.append("skipped")
            values.append((weight_A * skipped_A).sum().reshape(1))
            ran_A = ran_A * ~skipped_A
        extras.append("lost")
        lost_E = torch.zeros(e, dtype=torch.float32, device=device)
        values.append(lost_E.index_add_(0, clamped_A, weight_A - ran_A))
    # Counts of the forward minus each capacity, for all capacities at once (a capacity of 0 gives the total).
    capacity_fields = ("drop_unknown",) if routing.kept_A is None and not dropless else ()
    if counterfactual:
        capacity_fields += layout._counterfactual_fields
    if capacity_fields:
        counts_E1 = sums_S[col.dispatch, None]
        capacity_Q = torch.ceil(tokens * layout._capacity_rates(capacity_fields, top_k, e, device))
        extras += capacity_fields
        values.append((counts_E1 - capacity_Q).clamp_min(0).sum(dim=0))

    values_V = values[0] if len(values) == 1 else torch.cat(values)
    source, destination = layout._scatter(col, coactivation, tuple(extras), device)
    out_F.index_add_(0, destination, values_V.index_select(0, source).to(out_F.dtype))


# Logits (or probabilities) per token chunk of the router statistics: the chunk's two fp32 work buffers (512 KiB
# each) stay in a core's L2 cache through its passes, where the whole [T, E] matrix at production shapes (4 MiB at
# 4096 x 256) would be read from memory in every pass.
CHUNK_ELEMENTS = 1 << 17


def _router_statistics(
    layout: Layout,
    logits_TE: torch.Tensor | None,
    probs_TE: torch.Tensor | None,
    weight_T: torch.Tensor | None,
    col: WorkColumns,
    tokens_RT: torch.Tensor,
    chunks_2XE: torch.Tensor,
    sums_S: torch.Tensor,
) -> torch.Tensor:
    # Fills the valid, top1, entropy and z rows of the work matrix (the first rows of tokens_RT; its last 3 rows are
    # work space), adds the probability sums and the entropy terms to sums_S, and returns the per-token weight of
    # the sums, 0 for a non-finite token. chunks_2XE: the two buffers of a token chunk.
    #
    # A token with a NaN or +inf logit (or a non-finite probability) is counted apart and masked out of every
    # statistic. A -inf logit is a legitimate mask (an expert the router may not choose, e.g. group-limited
    # routing): probability 0. Only a token whose logits are all -inf has no distribution. The row max tells them
    # apart for free: it is NaN or infinite exactly for the non-finite tokens (amax propagates NaN).
    #
    # From the logits, per chunk: the row max m, s = x - m, e = exp(s), S = sum e; then p = e / S, the logsumexp
    # lse = m + log S (z = lse**2), the top-1 probability exp(0) / S = 1 / S and the entropy
    # H = -sum p log p = log S - sum(e * s) / S: log S per token, and the weighted sum over the tokens of the second
    # part, like the probability sums, as one product per chunk ((w / S) @ (e * s), (w / S) @ e), with no p or
    # p * log p temporary. s is cleaned in place before the exp: -inf (a masked expert) becomes -1e30, whose e is 0
    # and e * s 0 (not the NaN of 0 * -inf); the NaNs of a non-finite token become -1e30 too, so its e row is all 0
    # and its S, at least 1 for every finite token (the max's own e is exactly 1), is clamped to 1: every value of
    # such a token is finite, it adds nothing to the products, and its weight 0 removes it from the rest.
    num_tokens, e = (logits_TE if logits_TE is not None else probs_TE).shape
    shifted_XE, exp_XE = chunks_2XE
    chunk = shifted_XE.shape[0]
    token_rows = tokens_RT.unbind(0)
    max_T, sumexp_T, psum_T = token_rows[-3:]
    valid_T, top1_T, entropy_T = (token_rows[col.work(name)] for name in ("valid", "top1", "entropy"))
    device = tokens_RT.device
    ones_E = layout._cached(("ones", e, device), lambda: torch.ones(e, dtype=torch.float32, device=device))
    probs_E, terms_E = sums_S[col.probs], sums_S[col.entropy_terms]
    # -1 / log E: the entropy terms enter the normalised entropy with a minus sign.
    scale = -1.0 / math.log(e) if e > 1 else 0.0  # one expert: a point mass, entropy 0 of a range of 0
    # One view per chunk of every per-token vector, each from one split call (a slice per chunk costs more); a
    # forward of one chunk (every forward at a few experts) needs no views at all.
    per_chunk = [
        repeat(None) if values is None else (values,) if chunk == num_tokens else values.split(chunk)
        for values in (logits_TE, probs_TE, max_T, sumexp_T, psum_T, top1_T, weight_T)
    ]
    for x_XE, q_XE, max_X, sumexp_X, psum_X, top1_X, w_X in zip(*per_chunk):
        n = max_X.shape[0]
        shifted_NE, exp_NE = (shifted_XE, exp_XE) if n == chunk else (shifted_XE[:n], exp_XE[:n])
        if x_XE is not None:
            x_XE = x_XE if x_XE.dtype == torch.float32 else x_XE.to(torch.float32)
            torch.amax(x_XE, dim=-1, out=max_X)
            s_NE = torch.sub(x_XE, max_X[:, None], out=shifted_NE).nan_to_num_(-1e30, 0.0, -1e30)
            p_NE = torch.exp(s_NE, out=exp_NE)
            torch.mv(p_NE, ones_E, out=sumexp_X).clamp_min_(1.0)  # row sums as a product: faster than sum
            if q_XE is None:
                weight_X = torch.reciprocal(sumexp_X, out=top1_X)
                weight_X = weight_X if w_X is None else weight_X * w_X
                terms_NE = s_NE.mul_(p_NE)
        if q_XE is not None:
            q_XE = q_XE if q_XE.dtype == torch.float32 else q_XE.to(torch.float32)
            torch.mv(q_XE, ones_E, out=psum_X)  # finite exactly for the finite rows (probabilities do not overflow)
            p_NE = torch.nan_to_num(q_XE, 0.0, 0.0, 0.0, out=shifted_NE)
            torch.amax(p_NE, dim=-1, out=top1_X)
            # p log p as p log(max(p, tiny)): exactly 0 for p = 0, where xlogy costs many times more on the CPU.
            terms_NE = torch.clamp_min(p_NE, torch.finfo(torch.float32).tiny, out=exp_NE).log_().mul_(p_NE)
            weight_X = torch.sub(psum_X, psum_X).eq_(0.0)  # 1 for a finite row sum, 0 otherwise (see below)
            weight_X = weight_X if x_XE is None else weight_X.mul_(torch.sub(max_X, max_X).eq_(0.0))
            weight_X = weight_X if w_X is None else weight_X.mul_(w_X)
        probs_E.addmv_(p_NE.T, weight_X)
        terms_E.addmv_(terms_NE.T, weight_X, alpha=scale)

    # The per-token rows, over all the tokens at once. x - x is 0 exactly for a finite x and NaN for the others:
    # two ops where isfinite costs four.
    finite_T = max_T if logits_TE is not None else psum_T
    torch.sub(finite_T, finite_T, out=valid_T).eq_(0.0)
    if logits_TE is not None and probs_TE is not None:
        valid_T.mul_(torch.sub(psum_T, psum_T).eq_(0.0))
    log_sumexp_T = None if logits_TE is None else sumexp_T.log_()
    if probs_TE is None:
        torch.mul(log_sumexp_T, -scale, out=entropy_T)
    else:
        entropy_T.zero_()  # given probabilities: all of the entropy is in the terms
    if logits_TE is not None:
        torch.square(max_T.nan_to_num_(0.0, 0.0, 0.0).add_(log_sumexp_T), out=token_rows[col.work("z")])
    return valid_T if weight_T is None else valid_T * weight_T


_SCRATCH = threading.local()


def _scratch(numel: int, device: torch.device) -> torch.Tensor:
    # The hook's fp32 work space, [numel]. On the CPU one buffer per thread, grown to the largest forward seen and
    # reused by every layer: allocating the chunk buffers afresh costs an mmap and its page faults per forward
    # there (they are over glibc's mmap threshold). CUDA's and MPS's caching allocators make a fresh tensor cheap
    # (and keep it ordered with the stream), and a compiled graph must not capture a tensor from outside.
    if device.type != "cpu" or torch.compiler.is_compiling():
        return torch.empty(numel, dtype=torch.float32, device=device)
    buffer = getattr(_SCRATCH, "buffer", None)
    if buffer is None or buffer.numel() < numel:
        with torch.inference_mode(False):  # a buffer first made under inference mode could not be reused outside
            buffer = _SCRATCH.buffer = torch.empty(numel, dtype=torch.float32)
    return buffer[:numel]


def _rows(values_TE: torch.Tensor, num_tokens: int) -> torch.Tensor:
    # In the router's dtype (bf16, fp16, fp64): each token chunk is read in fp32, where the statistics are defined.
    return values_TE.detach().reshape(num_tokens, values_TE.shape[-1])
