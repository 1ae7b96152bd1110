"""The reference router: a linear gate in fp32 with token-choice or expert-choice selection.

Shape legend: ``T`` tokens (batch and sequence flattened), ``D`` model width, ``E`` experts, ``K`` experts per
token, ``A`` assignments, ``C`` tokens per expert (expert choice).

Contract (the monitor and the controllers rely on it):

- ``Router.forward(x_TD)`` returns a :class:`RouterOutput`, so a forward hook on the ``Router`` module sees every
  routing decision of that forward in its ``output`` argument, with nothing left to recompute.
- ``logits_TE`` are the fp32 logits used for selection (noise included, ``expert_bias`` excluded) and
  ``probs_TE = softmax(logits_TE)``.
- Token choice: ``A = T * K`` in token-major order (token 0's ``K`` slots, then token 1's, ...);
  ``token_idx_A = arange(T).repeat_interleave(K)``. ``kept_A`` is ``False`` for assignments dropped because
  their expert was over capacity (all ``True`` when dropless); ``weight_A`` is the combine weight, which the
  experts ignore where ``kept_A`` is ``False``.
- Expert choice: ``A = E * C`` in expert-major order (expert 0's ``C`` tokens, ...), ``kept_A`` all ``True``.
- ``aux_loss`` and ``z_loss`` are 0-dim fp32 tensors, already multiplied by their coefficients (exact zeros
  when a coefficient is 0).
- These attributes are read at every forward, so controllers may change them between steps: ``aux_loss_coef``,
  ``z_loss_coef``, ``noise``, ``noise_std``, ``top_k``, ``n_experts``, ``capacity_factor``, ``kind``, and the
  ``expert_bias`` buffer (float32 ``[E]``, present only when ``MoEConfig.expert_bias`` is set, else ``None``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from moe_monitor.reference.config import NOISE_KINDS, ROUTER_KINDS, MoEConfig


class RouterOutput(NamedTuple):
    """Everything one router forward decided.

    Attributes:
        logits_TE: fp32 ``[T, E]`` logits used for selection (noise included, expert bias excluded).
        probs_TE: fp32 ``[T, E]`` softmax of ``logits_TE``.
        token_idx_A: int64 ``[A]`` token of each assignment.
        expert_idx_A: int64 ``[A]`` expert of each assignment.
        weight_A: fp32 ``[A]`` combine weight of each assignment.
        kept_A: bool ``[A]``, ``False`` where the assignment was dropped for capacity.
        aux_loss: 0-dim load-balancing loss, times ``aux_loss_coef``.
        z_loss: 0-dim router z-loss, times ``z_loss_coef``.

    Example:
        >>> router = Router(MoEConfig(d_model=16, n_layers=1, n_heads=2, seq_len=8, n_experts=4, top_k=2, d_expert=8))
        >>> out = router(torch.randn(6, 16))  # [T, D] tokens
        >>> tuple(out.logits_TE.shape), out.expert_idx_A.numel(), bool(out.kept_A.all())  # dropless: all kept
        ((6, 4), 12, True)
    """

    logits_TE: torch.Tensor
    probs_TE: torch.Tensor
    token_idx_A: torch.Tensor
    expert_idx_A: torch.Tensor
    weight_A: torch.Tensor
    kept_A: torch.Tensor
    aux_loss: torch.Tensor
    z_loss: torch.Tensor


def expert_counts(expert_idx_A: torch.Tensor, n_experts: int) -> torch.Tensor:
    """int64 ``[E]`` assignments per expert, without a host sync (unlike CUDA ``bincount``, which reads the max).

    Example:
        >>> expert_counts(torch.tensor([2, 0, 2]), 4).tolist()
        [1, 0, 2, 0]
    """
    counts_E = torch.zeros(n_experts, dtype=torch.int64, device=expert_idx_A.device)
    return counts_E.scatter_add_(0, expert_idx_A, torch.ones_like(expert_idx_A))


def switch_capacity(num_tokens: int, n_experts: int, top_k: int, factor: float) -> int:
    """Per-expert capacity ``ceil(T / E * k * factor)``.

    Rounded to 9 decimals before the ceiling: ``50 / 2 * 2 * 1.1`` is ``55.000000000000007`` in floating point,
    and a plain ceiling would give 56.

    Example:
        >>> switch_capacity(50, 2, 2, 1.1), switch_capacity(4096, 8, 2, 1.25)
        (55, 1280)
    """
    return math.ceil(round(num_tokens / n_experts * top_k * factor, 9))


def capacity_keep_mask(expert_idx_A: torch.Tensor, n_experts: int, capacity: int) -> torch.Tensor:
    """bool ``[A]``: which assignments fit in their expert's ``capacity``, first come first served in ``A`` order.

    A stable sort by expert keeps ``A`` order inside each expert, so an assignment's rank among its expert's
    assignments is its position in the sorted list minus the start of its expert's run.

    Example:
        >>> capacity_keep_mask(torch.tensor([0, 1, 0, 0, 1]), 2, capacity=2).tolist()
        [True, True, True, False, True]
    """
    order_A = torch.argsort(expert_idx_A, stable=True)
    counts_E = expert_counts(expert_idx_A, n_experts)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    rank_sorted_A = torch.arange(expert_idx_A.numel(), device=expert_idx_A.device) - starts_E[expert_idx_A[order_A]]
    kept_A = torch.empty_like(expert_idx_A, dtype=torch.bool)
    kept_A[order_A] = rank_sorted_A < capacity
    return kept_A


def load_balancing_loss(probs_TE: torch.Tensor, expert_idx_A: torch.Tensor) -> torch.Tensor:
    """Switch / GShard loss ``E * sum_e (count[e] / T) * P[e]`` (count before capacity dropping).

    Equals ``transformers``' ``load_balancing_loss_func`` for one layer. It is ``top_k`` when the routing is
    perfectly balanced and ``top_k * E`` when every token goes to one expert.

    Example:
        >>> probs_TE = torch.full((4, 2), 0.5)
        >>> load_balancing_loss(probs_TE, torch.tensor([0, 1, 0, 1])).item()
        1.0
    """
    num_tokens, n_experts = probs_TE.shape
    fraction_E = expert_counts(expert_idx_A, n_experts).to(probs_TE.dtype) / num_tokens
    return n_experts * torch.sum(fraction_E * probs_TE.mean(dim=0))


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE z-loss ``mean_t logsumexp(logits_t)^2``, which keeps router logits small for fp stability.

    Example:
        >>> round(router_z_loss(torch.zeros(3, 4)).item(), 4)  # (ln 4)^2
        1.9218
    """
    return torch.logsumexp(logits_TE, dim=-1).square().mean()


class Router(nn.Module):
    """Linear gate plus selection; see the module docstring for the output contract.

    Args:
        config: model configuration; the router copies its routing fields into mutable attributes.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> router = Router(MoEConfig(d_model=8, n_heads=2, n_experts=4, top_k=2))
        >>> out = router(torch.randn(3, 8))
        >>> out.token_idx_A.tolist(), out.expert_idx_A.shape, bool(out.kept_A.all())
        ([0, 0, 1, 1, 2, 2], torch.Size([6]), True)
        >>> torch.allclose(out.weight_A.view(3, 2).sum(-1), torch.ones(3))
        True
    """

    expert_bias: torch.Tensor | None

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.gate = nn.Linear(config.d_model, config.n_experts, bias=False)
        nn.init.normal_(self.gate.weight, std=config.init_std)
        self.kind = config.router
        self.n_experts = config.n_experts
        self.top_k = config.top_k
        self.capacity_factor = config.capacity_factor
        self.norm_topk_prob = config.norm_topk_prob
        self.aux_loss_coef = config.aux_loss_coef
        self.z_loss_coef = config.z_loss_coef
        self.noise = config.router_noise
        self.noise_std = config.router_noise_std
        self.register_buffer(
            "expert_bias", torch.zeros(config.n_experts, dtype=torch.float32) if config.expert_bias else None
        )

    def extra_repr(self) -> str:
        return (
            f"kind={self.kind}, n_experts={self.n_experts}, top_k={self.top_k}, "
            f"capacity_factor={self.capacity_factor}, noise={self.noise}"
        )

    def forward(self, x_TD: torch.Tensor) -> RouterOutput:
        """Routes the tokens ``x_TD`` (any float dtype; computed in fp32) and returns every decision."""
        if self.kind not in ROUTER_KINDS:
            raise ValueError(f"Router.kind={self.kind!r} is not supported; choose one of {', '.join(ROUTER_KINDS)}.")
        if self.noise not in NOISE_KINDS:
            raise ValueError(f"Router.noise={self.noise!r} is not supported; choose one of {', '.join(NOISE_KINDS)}.")
        # Routing is a discrete decision on small logit gaps; bf16 flips it between identical forwards.
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            logits_TE = self._logits(x_TD.float())
            probs_TE = torch.softmax(logits_TE, dim=-1)
            if self.kind == "token_choice":
                token_idx_A, expert_idx_A, weight_A, kept_A = self._token_choice(probs_TE)
            else:
                token_idx_A, expert_idx_A, weight_A, kept_A = self._expert_choice(probs_TE)
            aux_loss = self._scaled(self.aux_loss_coef, lambda: load_balancing_loss(probs_TE, expert_idx_A), x_TD)
            z_loss = self._scaled(self.z_loss_coef, lambda: router_z_loss(logits_TE), x_TD)
        return RouterOutput(logits_TE, probs_TE, token_idx_A, expert_idx_A, weight_A, kept_A, aux_loss, z_loss)

    def _logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        noisy = self.training and self.noise_std > 0
        if noisy and self.noise == "jitter":
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - self.noise_std, 1.0 + self.noise_std)
        logits_TE = F.linear(x_TD, self.gate.weight.float())
        if noisy and self.noise == "gaussian":
            logits_TE = logits_TE + torch.randn_like(logits_TE) * self.noise_std
        return logits_TE

    def _token_choice(self, probs_TE: torch.Tensor) -> tuple[torch.Tensor, ...]:
        num_tokens, n_experts = probs_TE.shape
        scores_TE = probs_TE if self.expert_bias is None else probs_TE + self.expert_bias
        topk_idx_TK = torch.topk(scores_TE, self.top_k, dim=-1).indices
        weight_TK = probs_TE.gather(1, topk_idx_TK)
        if self.norm_topk_prob and self.top_k > 1:
            weight_TK = weight_TK / weight_TK.sum(dim=-1, keepdim=True)
        token_idx_A = torch.arange(num_tokens, device=probs_TE.device).repeat_interleave(self.top_k)
        expert_idx_A = topk_idx_TK.reshape(-1)
        if self.capacity_factor is None:
            kept_A = torch.ones_like(expert_idx_A, dtype=torch.bool)
        else:
            capacity = switch_capacity(num_tokens, n_experts, self.top_k, self.capacity_factor)
            kept_A = capacity_keep_mask(expert_idx_A, n_experts, capacity)
        return token_idx_A, expert_idx_A, weight_TK.reshape(-1), kept_A

    def _expert_choice(self, probs_TE: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # A per-expert bias shifts all of one expert's scores equally, so it cannot change that expert's top-C
        # tokens; expert choice therefore ignores ``expert_bias``.
        num_tokens, n_experts = probs_TE.shape
        factor = 1.0 if self.capacity_factor is None else self.capacity_factor
        capacity = min(num_tokens, max(1, switch_capacity(num_tokens, n_experts, self.top_k, factor)))
        weight_EC, token_idx_EC = torch.topk(probs_TE.t(), capacity, dim=-1)
        expert_idx_A = torch.arange(n_experts, device=probs_TE.device).repeat_interleave(capacity)
        kept_A = torch.ones_like(expert_idx_A, dtype=torch.bool)
        return token_idx_EC.reshape(-1), expert_idx_A, weight_EC.reshape(-1), kept_A

    @staticmethod
    def _scaled(coef: float, loss_fn, x_TD: torch.Tensor) -> torch.Tensor:
        if coef == 0:
            return torch.zeros((), dtype=torch.float32, device=x_TD.device)
        return coef * loss_fn()
