"""GShard-style grouped capacity, shared by the st-moe-pytorch and mixture-of-experts families.

Shape legend: ``B`` groups (sequences), ``N`` tokens per group, ``E`` experts, ``k`` slots (1st, 2nd, ... choice),
``C`` capacity per expert and group.

Both libraries fill each expert's ``C`` places slot by slot (every token's first choice, in sequence order, then every
second choice, ...), after a random policy has skipped some of the later choices, and return only the dispatch
tensor ``[B, N, E, C]`` of what ran. The policy of each assignment is known from the gate values, not its draw:
``ROUTED`` (routed for sure: first choices, and later ones whose routing probability is 1), ``MAYBE`` (a random draw)
or ``NEVER`` (a policy that skips every later choice). An assignment that did not run was *skipped* when its policy
is ``NEVER``, or ``MAYBE`` and its expert still had room at its turn; it was *dropped* (capacity) otherwise: a
``MAYBE`` assignment at an already-full expert could not have run either way, and the libraries do not return the
draw.
"""

from __future__ import annotations

import torch

ROUTED, MAYBE, NEVER = 0, 1, 2
"""Policy of an assignment: routed for sure, routed by a random draw, skipped for sure."""


def capacity_outcome(
    topk_idx_BNK: torch.Tensor, ran_BNE: torch.Tensor, capacity: int, policy_BNK: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kept_BNK, skipped_BNK)`` of slot-by-slot capacity filling, from what ran (no host sync).

    Args:
        topk_idx_BNK: chosen experts per token and slot (slot 0 = first choice).
        ran_BNE: ``True`` where the token's assignment to the expert ran (the dispatch tensor, any over ``C``).
        capacity: ``C``.
        policy_BNK: :data:`ROUTED`, :data:`MAYBE` or :data:`NEVER` per assignment.

    Example:
        >>> idx = torch.tensor([[[0, 1], [0, 1], [0, 2]]])  # 1 group, 3 tokens, capacity 2
        >>> ran = torch.tensor([[[True, True, False], [True, False, False], [False, False, False]]])
        >>> kept, skipped = capacity_outcome(idx, ran, 2, torch.tensor([[[ROUTED, MAYBE]] * 3]))
        >>> kept.tolist(), skipped.tolist()
        ([[[True, True], [True, True], [False, True]]], [[[False, False], [False, True], [False, True]]])
    """
    num_experts = ran_BNE.shape[-1]
    ran_BNK = ran_BNE.gather(-1, topk_idx_BNK)
    topk_idx_KBN = topk_idx_BNK.movedim(-1, 0)
    onehot_KBNE = torch.nn.functional.one_hot(topk_idx_KBN, num_experts) * ran_BNK.movedim(-1, 0)[..., None]
    # Places taken at each assignment's turn: earlier slots in full, then earlier tokens of the same slot.
    per_slot_KB1E = onehot_KBNE.sum(dim=-2, keepdim=True)
    before_slot_KB1E = per_slot_KB1E.cumsum(dim=0) - per_slot_KB1E
    taken_KBNE = before_slot_KB1E + onehot_KBNE.cumsum(dim=-2) - onehot_KBNE
    taken_BNK = taken_KBNE.gather(-1, topk_idx_KBN[..., None])[..., 0].movedim(0, -1)
    room_BNK = taken_BNK < capacity
    skipped_BNK = ~ran_BNK & ((policy_BNK == NEVER) | ((policy_BNK == MAYBE) & room_BNK))
    return ran_BNK | skipped_BNK, skipped_BNK
