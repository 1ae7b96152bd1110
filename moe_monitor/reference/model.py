"""A small pre-norm decoder-only transformer whose MLPs are Mixture-of-Experts layers.

Shape legend: ``B`` batch, ``S`` sequence, ``T`` tokens (``B * S``), ``D`` model width, ``V`` vocabulary.

Module tree (the monitor and the tests rely on it): ``model.blocks[i].moe.router`` is a
:class:`~moe_monitor.reference.router.Router` and ``model.blocks[i].moe.experts`` its experts; a dense block
(``MoEConfig.dense_every``) has ``model.blocks[i].mlp`` instead of ``.moe``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from moe_monitor.reference.config import MoEConfig
from moe_monitor.reference.experts import DenseMLP, Experts
from moe_monitor.reference.router import Router


class MoEOutput(NamedTuple):
    """Output of :class:`MoETransformer`.

    Attributes:
        logits: ``[B, S, V]`` next-token logits.
        aux_loss: 0-dim load-balancing loss summed over MoE layers, times ``aux_loss_coef``.
        z_loss: 0-dim router z-loss summed over MoE layers, times ``z_loss_coef``.

    Example:
        >>> config = MoEConfig(d_model=16, n_layers=1, n_heads=2, seq_len=8, n_experts=4, top_k=2, d_expert=8)
        >>> model = MoETransformer(config)
        >>> out = model(torch.randint(0, 256, (2, 8)))
        >>> tuple(out.logits.shape), out.aux_loss.dim(), out.z_loss.dim()
        ((2, 8, 256), 0, 0)
    """

    logits: torch.Tensor
    aux_loss: torch.Tensor
    z_loss: torch.Tensor


class MoELayer(nn.Module):
    """Router plus experts: ``y_t = sum over kept (t, e) of weight * expert_e(x_t)``.

    Example:
        >>> layer = MoELayer(MoEConfig(d_model=8, n_heads=2, n_experts=4, top_k=2, d_expert=16))
        >>> y, aux_loss, z_loss = layer(torch.randn(2, 3, 8))
        >>> y.shape, aux_loss.shape
        (torch.Size([2, 3, 8]), torch.Size([]))
    """

    def __init__(self, config: MoEConfig, out_std: float | None = None) -> None:
        super().__init__()
        self.router = Router(config)
        self.experts = Experts(config, out_std=out_std)

    def forward(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
        routing = self.router(x_TD)
        y_TD = self.experts(x_TD, routing)
        return y_TD.view_as(x_BSD), routing.aux_loss, routing.z_loss


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention through ``F.scaled_dot_product_attention`` (flash / memory-efficient).

    Example:
        >>> config = MoEConfig(d_model=16, n_layers=1, n_heads=2, seq_len=8, n_experts=4, top_k=2, d_expert=8)
        >>> attention = CausalSelfAttention(config, out_std=0.02)
        >>> tuple(attention(torch.randn(2, 8, 16)).shape)
        (2, 8, 16)
    """

    def __init__(self, config: MoEConfig, out_std: float) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.out = nn.Linear(config.d_model, config.d_model, bias=False)
        nn.init.normal_(self.qkv.weight, std=config.init_std)
        nn.init.normal_(self.out.weight, std=out_std)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        b, s, d = x_BSD.shape
        q, k, v = self.qkv(x_BSD).view(b, s, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.out(attn.transpose(1, 2).reshape(b, s, d))


class Block(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``x + moe(norm(x))`` (or a dense MLP).

    Example:
        >>> config = MoEConfig(d_model=16, n_layers=1, n_heads=2, seq_len=8, n_experts=4, top_k=2, d_expert=8)
        >>> block = Block(config, moe=True)
        >>> x_BSD, aux_loss, z_loss = block(torch.randn(2, 8, 16))
        >>> tuple(x_BSD.shape), aux_loss.dim(), z_loss.dim()
        ((2, 8, 16), 0, 0)
    """

    def __init__(self, config: MoEConfig, moe: bool) -> None:
        super().__init__()
        # GPT-2 style: scale the residual branches' output projections so the stream's variance does not grow
        # with depth.
        out_std = config.init_std / math.sqrt(2 * config.n_layers)
        self.attn_norm = nn.RMSNorm(config.d_model)
        self.attn = CausalSelfAttention(config, out_std)
        self.mlp_norm = nn.RMSNorm(config.d_model)
        if moe:
            self.moe = MoELayer(config, out_std=out_std)
        else:
            self.mlp = DenseMLP(config.d_model, config.top_k * config.d_expert, config.init_std, out_std)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        x_BSD = x_BSD + self.drop(self.attn(self.attn_norm(x_BSD)))
        if hasattr(self, "moe"):
            y_BSD, aux_loss, z_loss = self.moe(self.mlp_norm(x_BSD))
        else:
            y_BSD, aux_loss, z_loss = self.mlp(self.mlp_norm(x_BSD)), None, None
        return x_BSD + self.drop(y_BSD), aux_loss, z_loss


class MoETransformer(nn.Module):
    """Decoder-only byte-level language model with learned positions and tied input/output embeddings.

    Args:
        config: model configuration.

    Example:
        >>> model = MoETransformer(MoEConfig(d_model=16, n_layers=2, n_heads=2, seq_len=8, n_experts=4, d_expert=8))
        >>> out = model(torch.randint(0, 256, (2, 8)))
        >>> out.logits.shape, out.aux_loss.shape
        (torch.Size([2, 8, 256]), torch.Size([]))
        >>> type(model.blocks[0].moe.router).__name__
        'Router'
    """

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.pos = nn.Embedding(config.seq_len, config.d_model)
        nn.init.normal_(self.embed.weight, std=config.init_std)
        nn.init.normal_(self.pos.weight, std=config.init_std)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, config.is_moe_block(i)) for i in range(config.n_layers))
        self.norm = nn.RMSNorm(config.d_model)

    def forward(self, tokens: torch.Tensor) -> MoEOutput:
        """Next-token logits for ``tokens`` (int ``[B, S]``, ``S <= seq_len``) and the summed router losses."""
        if tokens.dim() != 2:
            raise ValueError(
                f"tokens must be a [batch, sequence] tensor of token ids, got shape {tuple(tokens.shape)}."
            )
        seq_len = tokens.shape[1]
        if seq_len > self.config.seq_len:
            raise ValueError(
                f"sequence length {seq_len} exceeds the model's seq_len={self.config.seq_len}; "
                "truncate or split the input, or build the model with a larger MoEConfig.seq_len."
            )
        x_BSD = self.embed(tokens) + self.pos(torch.arange(seq_len, device=tokens.device))
        x_BSD = self.drop(x_BSD)
        aux_loss = torch.zeros((), device=tokens.device)
        z_loss = torch.zeros((), device=tokens.device)
        for block in self.blocks:
            x_BSD, block_aux, block_z = block(x_BSD)
            if block_aux is not None:
                aux_loss = aux_loss + block_aux
                z_loss = z_loss + block_z
        logits_BSV = F.linear(self.norm(x_BSD), self.embed.weight)
        return MoEOutput(logits_BSV, aux_loss, z_loss)

    @property
    def routers(self) -> list[Router]:
        """The routers of the MoE blocks, in model order."""
        return [module for module in self.modules() if isinstance(module, Router)]
