"""Small synthetic routers and models for the monitor tests.

Shape legend: ``B`` batch, ``S`` sequence, ``T`` tokens, ``D`` width, ``E`` experts, ``k`` experts per token.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

from moe_monitor.adapters import RouterSpec
from moe_monitor.routing import Routing


class Replay(nn.Module):
    """A "router" that returns the decisions it is handed, so a test controls every routing decision."""

    def forward(self, logits_TE, topk_idx_TK, kept_TK=None):
        return logits_TE, topk_idx_TK, kept_TK


def replay_spec(name: str, num_experts: int, top_k: int, dropless: bool = True) -> RouterSpec:
    def extract(module, args, output):
        logits_TE, topk_idx_TK, kept_TK = output
        return Routing.from_topk(topk_idx_TK, logits_TE=logits_TE, kept_TK=kept_TK)

    return RouterSpec(name=name, num_experts=num_experts, top_k=top_k, extract=extract, dropless=dropless)


class ToyRouter(nn.Module):
    """Softmax top-k router with the Hugging Face output contract ``(logits, weights, indices)``."""

    def __init__(self, d: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.weight = nn.Parameter(torch.randn(num_experts, d))

    def forward(self, x):
        logits_TE = x.reshape(-1, x.shape[-1]) @ self.weight.T
        top = torch.softmax(logits_TE.float(), dim=-1).topk(self.top_k, dim=-1)
        return logits_TE, top.values, top.indices


class ToyBlock(nn.Module):
    """Router plus dense-computed experts: every expert runs on every token, weighted by its routing weight.

    Computing all experts densely keeps the model itself free of host syncs (no gather by expert), so the
    no-sync test only exercises the monitor.
    """

    def __init__(self, d: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.router = ToyRouter(d, num_experts, top_k)
        self.experts = nn.Parameter(torch.randn(num_experts, d, d) / d**0.5)

    def forward(self, x_BSD):
        _, weight_TK, idx_TK = self.router(x_BSD)
        x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
        gate_TE = torch.zeros(x_TD.shape[0], self.experts.shape[0], dtype=x_TD.dtype).scatter(
            1, idx_TK, weight_TK.to(x_TD.dtype)
        )
        y_TD = torch.einsum("te,td,edf->tf", gate_TE, x_TD, self.experts)
        return x_BSD + y_TD.view_as(x_BSD)


class ToyModel(nn.Module):
    """``n_layers`` ToyBlocks; ``checkpointing`` = ``None``, ``"reentrant"`` or ``"non_reentrant"``."""

    def __init__(self, d=8, num_experts=4, top_k=2, n_layers=2, checkpointing=None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(ToyBlock(d, num_experts, top_k) for _ in range(n_layers))
        self.checkpointing = checkpointing

    def forward(self, x_BSD):
        for block in self.blocks:
            if self.checkpointing is None:
                x_BSD = block(x_BSD)
            else:
                x_BSD = checkpoint(block, x_BSD, use_reentrant=self.checkpointing == "reentrant")
        return x_BSD

    @property
    def router_names(self) -> list[str]:
        return [f"blocks.{i}.router" for i in range(len(self.blocks))]


class SyncRecorder(TorchDispatchMode):
    """Records every op that makes the host wait for the device (on CUDA), whatever Python spelling reached it.

    ``.item()``, ``int(t)``, ``bool(t)`` and ``if t:`` all end in ``aten._local_scalar_dense``; ``nonzero``,
    ``masked_select``, boolean-mask indexing and ``bincount`` size their output from the data.
    """

    _SYNCING = frozenset(
        (
            torch.ops.aten._local_scalar_dense,
            torch.ops.aten.nonzero,
            torch.ops.aten.masked_select,
            torch.ops.aten.bincount,
        )
    )

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet in self._SYNCING:
            self.ops.append(str(func))
        elif func is torch.ops.aten.index.Tensor and any(
            index is not None and index.dtype == torch.bool for index in args[1]
        ):
            self.ops.append("aten.index.Tensor (bool mask)")
        elif func is torch.ops.aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            self.ops.append("aten.repeat_interleave.Tensor without output_size")
        return func(*args, **kwargs)


@contextlib.contextmanager
def record_hook_syncs(monkeypatch):
    """Runs every RouterMonitor hook created inside the block under a :class:`SyncRecorder`, which it yields.

    Only the hooks are watched: the models themselves may synchronise (Hugging Face expert dispatch does).
    """
    from moe_monitor.monitor import RouterMonitor

    recorder = SyncRecorder()
    make_hook = RouterMonitor._make_hook

    def watched_make_hook(self, index):
        hook = make_hook(self, index)

        def watched(*args):
            with recorder:
                return hook(*args)

        return watched

    monkeypatch.setattr(RouterMonitor, "_make_hook", watched_make_hook)
    yield recorder
