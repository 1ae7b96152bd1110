"""The one record every router is normalised to before it is counted.

Shape legend: ``T`` tokens in one forward (batch and sequence flattened), ``E`` experts, ``A`` assignments
(token, expert) pairs chosen by the router in that forward (``T * k`` for a top-k token-choice router,
``E * C`` for expert choice).

A router adapter (``moe_monitor.adapters``) turns whatever a router module returns into a :class:`Routing`;
the counters only ever see this record, so a new model family is one adapter and nothing else.
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
    """

    token_idx_A: torch.Tensor
    expert_idx_A: torch.Tensor
    num_tokens: int
    logits_TE: torch.Tensor | None = None
    probs_TE: torch.Tensor | None = None
    kept_A: torch.Tensor | None = None

    @classmethod
    def from_topk(
        cls,
        topk_idx_TK: torch.Tensor,
        logits_TE: torch.Tensor | None = None,
        probs_TE: torch.Tensor | None = None,
        kept_TK: torch.Tensor | None = None,
    ) -> Routing:
        """Builds the record of a token-choice router from its ``[T, k]`` chosen experts.

        Example:
            >>> r = Routing.from_topk(torch.tensor([[0, 2], [1, 2]]))
            >>> r.token_idx_A.tolist(), r.expert_idx_A.tolist(), r.num_tokens
            ([0, 0, 1, 1], [0, 2, 1, 2], 2)
        """
        num_tokens, k = topk_idx_TK.shape
        token_idx_A = torch.arange(num_tokens, device=topk_idx_TK.device).repeat_interleave(k)
        kept_A = None if kept_TK is None else kept_TK.reshape(-1)
        return cls(token_idx_A, topk_idx_TK.reshape(-1).long(), num_tokens, logits_TE, probs_TE, kept_A)
