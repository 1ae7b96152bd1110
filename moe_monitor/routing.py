"""The one record every router is normalised to before it is counted.

Shape legend: ``T`` tokens in one forward (batch and sequence flattened), ``E`` experts, ``A`` assignments
(token, expert) pairs chosen by the router in that forward (``T * k`` for a top-k token-choice router,
``E * C`` for expert choice).

A model family (``moe_monitor.families``) turns whatever a router module returns into a :class:`Routing`;
the counters only ever see this record, so a new model family is one family file and nothing else.

What happened to each assignment: it was *selected* (every assignment is counted in ``count[e]``); it was
*dropped* when its expert was over capacity (``kept_A`` False); it was *skipped* when a random policy of the
router decided not to run it (``skipped_A`` True, e.g. DeepSpeed's and st-moe's random second expert); it *ran*
(the expert processed it) when it was neither: ``kept_A & ~skipped_A``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Routing(NamedTuple):
    """One forward's routing decisions for one router.

    Attributes:
        token_idx_A: ``int64 [A]`` index into the ``T`` flattened tokens of each assignment.
        expert_idx_A: ``int64 [A]`` expert of each assignment, in ``[0, E)``.
        num_tokens: ``T``, the number of tokens routed in this forward (padding included; a padding mask,
            when known, is applied by the counters).
        logits_TE: router logits, or ``None`` when the router does not expose them. Any dtype; the counters
            reduce in fp32.
        probs_TE: router probabilities (softmax of the logits for softmax routers, the router's own
            normalised scores otherwise), or ``None`` to derive them from ``logits_TE`` with a softmax.
        kept_A: ``bool [A]``, ``False`` where the assignment was dropped because its expert was over
            capacity; ``None`` for dropless routers.
        skipped_A: ``bool [A]``, ``True`` where a random policy of the router skipped the assignment (not a
            capacity drop: ``kept_A`` stays ``True`` there); ``None`` when the router has no such policy.

    Example:
        >>> r = Routing(torch.tensor([0, 0, 1]), torch.tensor([2, 0, 1]), num_tokens=2)
        >>> r.num_tokens, r.logits_TE is None, r.kept_A is None
        (2, True, True)
    """

    token_idx_A: torch.Tensor
    expert_idx_A: torch.Tensor
    num_tokens: int
    logits_TE: torch.Tensor | None = None
    probs_TE: torch.Tensor | None = None
    kept_A: torch.Tensor | None = None
    skipped_A: torch.Tensor | None = None

    @classmethod
    def from_topk(
        cls,
        topk_idx_TK: torch.Tensor,
        logits_TE: torch.Tensor | None = None,
        probs_TE: torch.Tensor | None = None,
        kept_TK: torch.Tensor | None = None,
        skipped_TK: torch.Tensor | None = None,
    ) -> Routing:
        """Builds the record of a token-choice router from its chosen experts ``[..., k]``.

        Leading dimensions are flattened in order (``[B, S, k]`` is ``B * S`` tokens), and so are those of
        ``logits_TE`` / ``probs_TE`` (``[..., E]``) and of ``kept_TK`` / ``skipped_TK`` (``[..., k]``).

        Example:
            >>> r = Routing.from_topk(torch.tensor([[0, 2], [1, 2]]))
            >>> r.token_idx_A.tolist(), r.expert_idx_A.tolist(), r.num_tokens
            ([0, 0, 1, 1], [0, 2, 1, 2], 2)
            >>> Routing.from_topk(torch.zeros(2, 3, 1, dtype=torch.long), logits_TE=torch.zeros(2, 3, 4)).num_tokens
            6
        """
        k = topk_idx_TK.shape[-1] if topk_idx_TK.dim() > 0 else 1
        topk_idx_TK = topk_idx_TK.reshape(-1, k)
        num_tokens = topk_idx_TK.shape[0]
        token_idx_A = torch.arange(num_tokens, device=topk_idx_TK.device).repeat_interleave(k)
        if logits_TE is not None:
            logits_TE = logits_TE.reshape(num_tokens, logits_TE.shape[-1])
        if probs_TE is not None:
            probs_TE = probs_TE.reshape(num_tokens, probs_TE.shape[-1])
        kept_A = None if kept_TK is None else kept_TK.reshape(-1)
        skipped_A = None if skipped_TK is None else skipped_TK.reshape(-1)
        return cls(token_idx_A, topk_idx_TK.reshape(-1).long(), num_tokens, logits_TE, probs_TE, kept_A, skipped_A)
