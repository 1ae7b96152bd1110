"""Configuration of the reference Mixture-of-Experts transformer.

Shape legend (used across ``moe_monitor.reference``): ``B`` batch, ``S`` sequence, ``T`` tokens (``B * S``
flattened), ``D`` model width, ``H`` expert hidden width, ``E`` experts, ``K`` experts per token, ``A``
assignments, ``C`` tokens per expert for expert-choice routing, ``V`` vocabulary.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

ROUTER_KINDS: tuple[str, ...] = ("token_choice", "expert_choice")
NOISE_KINDS: tuple[str, ...] = ("none", "jitter", "gaussian")


@dataclass
class MoEConfig:
    """Hyper-parameters of :class:`~moe_monitor.reference.MoETransformer`.

    Attributes:
        vocab_size: vocabulary size; 256 for the bundled byte-level corpus.
        d_model: residual stream width ``D``.
        n_layers: transformer blocks.
        n_heads: attention heads; must divide ``d_model``.
        seq_len: longest sequence the model accepts (learned positions).
        n_experts: experts ``E`` per MoE block.
        top_k: experts per token for token choice; for expert choice the average experts per token, which sets
            the per-expert capacity ``C = ceil(T * top_k / E * capacity_factor)``.
        router: ``"token_choice"`` (top-k over experts) or ``"expert_choice"`` (top-C over tokens). Expert choice
            picks each expert's tokens among all ``B * S`` tokens of the batch, so a token's experts depend on later
            tokens: it is not causal, and its validation loss is optimistic for autoregressive use (as in Zhou
            et al. 2022, who use it for pre-training throughput, not decoding).
        capacity_factor: ``None`` for dropless token choice; otherwise each expert keeps at most
            ``ceil(T / E * top_k * capacity_factor)`` assignments. Expert choice reads ``None`` as 1.0.
        aux_loss_coef: weight of the Switch / GShard load-balancing loss.
        z_loss_coef: weight of the ST-MoE router z-loss.
        router_noise: ``"none"``, ``"jitter"`` (multiplicative input noise, Switch) or ``"gaussian"``
            (additive logit noise, noisy top-k); training mode only.
        router_noise_std: jitter epsilon or Gaussian standard deviation.
        expert_bias: give each router a float32 ``expert_bias`` buffer ``[E]`` (zeros) added to the scores for
            expert selection only (auxiliary-loss-free balancing; set by a controller from outside).
        d_expert: hidden width ``H`` of one expert (SwiGLU).
        dense_every: 0 makes every block MoE; ``n`` makes every ``n``-th block (1-based) a dense SwiGLU MLP of
            hidden width ``top_k * d_expert``, i.e. the same active FLOPs per token.
        norm_topk_prob: renormalise the top-k combine weights to sum to 1. Skipped when ``top_k == 1``, where
            it would make every weight 1 and cut the router off from the language-model gradient (Switch uses
            the raw probability there).
        dropout: dropout on attention and block outputs.
        init_std: standard deviation of the normal weight initialisation.

    Example:
        >>> MoEConfig(n_experts=4, top_k=2).d_model
        128
        >>> MoEConfig(n_experts=4, top_k=5)
        Traceback (most recent call last):
        ...
        ValueError: top_k=5 is larger than n_experts=4; choose top_k between 1 and n_experts.
    """

    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    seq_len: int = 128
    n_experts: int = 8
    top_k: int = 2
    router: str = "token_choice"
    capacity_factor: float | None = None
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001
    router_noise: str = "none"
    router_noise_std: float = 0.01
    expert_bias: bool = False
    d_expert: int = 256
    dense_every: int = 0
    norm_topk_prob: bool = True
    dropout: float = 0.0
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.router not in ROUTER_KINDS:
            raise ValueError(f"router={self.router!r} is not supported; choose one of {', '.join(ROUTER_KINDS)}.")
        if self.router_noise not in NOISE_KINDS:
            raise ValueError(
                f"router_noise={self.router_noise!r} is not supported; choose one of {', '.join(NOISE_KINDS)}."
            )
        if self.n_experts < 1:
            raise ValueError(f"n_experts={self.n_experts} must be at least 1.")
        if self.top_k < 1:
            raise ValueError(f"top_k={self.top_k} must be at least 1.")
        if self.top_k > self.n_experts:
            raise ValueError(
                f"top_k={self.top_k} is larger than n_experts={self.n_experts}; choose top_k between 1 and n_experts."
            )
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ValueError(f"capacity_factor={self.capacity_factor} must be positive, or None for dropless routing.")
        if self.d_model < 1 or self.n_heads < 1 or self.d_model % self.n_heads:
            raise ValueError(
                f"d_model={self.d_model} must be a positive multiple of n_heads={self.n_heads}; "
                "change one of them so that d_model % n_heads == 0."
            )
        for name in ("vocab_size", "n_layers", "seq_len", "d_expert"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1.")
        if self.dense_every < 0:
            raise ValueError(f"dense_every={self.dense_every} must be 0 (all blocks MoE) or a positive interval.")
        for name in ("aux_loss_coef", "z_loss_coef", "router_noise_std"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be non-negative.")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1).")
        if self.expert_bias and self.router == "expert_choice":
            # A per-expert shift cannot change which top-C tokens an expert takes, so the bias would do nothing.
            raise ValueError(
                "expert_bias=True has no effect with router='expert_choice' (a per-expert shift does not change an "
                "expert's top-C tokens); use router='token_choice' or expert_bias=False."
            )

    def is_moe_block(self, index: int) -> bool:
        """Whether block ``index`` (0-based) holds an MoE layer rather than a dense MLP.

        Example:
            >>> [MoEConfig(n_layers=4, dense_every=2).is_moe_block(i) for i in range(4)]
            [True, False, True, False]
        """
        return self.dense_every == 0 or (index + 1) % self.dense_every != 0

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form, e.g. for ``save_hyperparameters`` (round-trips through ``MoEConfig(**d)``)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> MoEConfig:
        """Builds a config from a :data:`PRESETS` entry, with keyword overrides.

        Example:
            >>> MoEConfig.from_preset("tiny", n_experts=4).n_experts
            4
        """
        if name not in PRESETS:
            raise ValueError(f"preset={name!r} is unknown; choose one of {', '.join(PRESETS)}.")
        return cls(**{**PRESETS[name], **overrides})


# Sizes for the bundled byte-level corpus. ``tiny`` is sized so that the default ``moe-monitor train`` finishes
# in a few minutes on a 2-core CPU with the loss clearly falling.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(d_model=128, n_layers=4, n_heads=4, seq_len=128, n_experts=8, top_k=2, d_expert=128),
    "small": dict(d_model=256, n_layers=4, n_heads=4, seq_len=256, n_experts=8, top_k=2, d_expert=512),
    "base": dict(d_model=512, n_layers=8, n_heads=8, seq_len=512, n_experts=16, top_k=2, d_expert=1024),
}
