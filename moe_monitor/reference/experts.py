"""SwiGLU experts stored as batched weight tensors, and the dense MLP of the same active size.

Shape legend: ``T`` tokens, ``D`` model width, ``H`` expert hidden width, ``E`` experts, ``A`` assignments,
``G`` groups (experts plus one trailing group of dropped assignments).

Dispatch sorts the assignments by expert (a stable argsort, so each expert sees its tokens in order), runs every
expert on its contiguous run of rows, and adds ``weight * output`` back into the tokens with ``index_add_``.
Two equivalent ways run the experts on their runs:

- ``"grouped"``: ``torch._grouped_mm`` with int32 cumulative counts as group ends. It needs no host sync, and on
  Hopper GPUs in bf16 it is one CUTLASS kernel for all experts; elsewhere in CUDA PyTorch falls back to a
  per-group loop that copies the offsets to the host.
- ``"loop"``: split the rows with the counts read on the host (``.tolist()``, one sync) and one matmul per expert.

``"auto"`` takes ``grouped`` on Hopper GPUs (compute capability 9.0: H100, H200) in bf16 with 16-byte-aligned rows
and ``loop`` elsewhere (the faster one on CPU, measured in ``benchmarks/moe_layer.py``). Blackwell is left out on
purpose: there ``_grouped_mm`` has been reported to give non-zero weight gradients to experts that received no
token (pytorch/pytorch#172439), which is exactly the dead-expert case this package exists to watch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe_monitor.reference.config import MoEConfig
from moe_monitor.reference.router import RouterOutput

DISPATCH_MODES: tuple[str, ...] = ("auto", "grouped", "loop")


class DenseMLP(nn.Module):
    """SwiGLU MLP; with ``hidden = top_k * d_expert`` it does the FLOPs of one token's ``top_k`` experts.

    Example:
        >>> DenseMLP(8, 16)(torch.randn(2, 3, 8)).shape
        torch.Size([2, 3, 8])
    """

    def __init__(self, d_model: int, hidden: int, init_std: float = 0.02, out_std: float | None = None) -> None:
        super().__init__()
        self.gate_up = nn.Linear(d_model, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)
        nn.init.normal_(self.gate_up.weight, std=init_std)
        nn.init.normal_(self.down.weight, std=init_std if out_std is None else out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Experts(nn.Module):
    """``E`` SwiGLU experts: ``w_gate_up [E, D, 2H]`` and ``w_down [E, H, D]``.

    Args:
        config: model configuration (``n_experts``, ``d_model``, ``d_expert``, ``init_std``).
        dispatch: ``"auto"``, ``"grouped"`` or ``"loop"`` (see the module docstring); all give the same result.
        out_std: initial standard deviation of ``w_down`` (defaults to ``config.init_std``).

    Example:
        >>> from moe_monitor.reference.router import Router
        >>> config = MoEConfig(d_model=8, n_heads=2, n_experts=4, top_k=2, d_expert=16)
        >>> x_TD = torch.randn(5, 8)
        >>> Experts(config)(x_TD, Router(config)(x_TD)).shape
        torch.Size([5, 8])
    """

    def __init__(self, config: MoEConfig, dispatch: str = "auto", out_std: float | None = None) -> None:
        super().__init__()
        if dispatch not in DISPATCH_MODES:
            raise ValueError(f"dispatch={dispatch!r} is not supported; choose one of {', '.join(DISPATCH_MODES)}.")
        self.n_experts = config.n_experts
        self.dispatch = dispatch
        e, d, h = config.n_experts, config.d_model, config.d_expert
        self.w_gate_up = nn.Parameter(torch.randn(e, d, 2 * h) * config.init_std)
        self.w_down = nn.Parameter(torch.randn(e, h, d) * (config.init_std if out_std is None else out_std))

    def extra_repr(self) -> str:
        e, d, h2 = self.w_gate_up.shape
        return f"n_experts={e}, d_model={d}, d_expert={h2 // 2}, dispatch={self.dispatch}"

    def forward(self, x_TD: torch.Tensor, routing: RouterOutput) -> torch.Tensor:
        """Runs the kept assignments of ``routing`` and returns the weighted sum per token (zeros if none kept)."""
        n_experts = self.n_experts
        # Dropped assignments get the key E: they sort after every expert, into a group no expert runs.
        key_A = torch.where(routing.kept_A, routing.expert_idx_A, n_experts)
        order_A = torch.argsort(key_A, stable=True)
        token_sorted_A = routing.token_idx_A[order_A]
        kept_sorted_A = routing.kept_A[order_A]
        counts_E = torch.zeros(n_experts, dtype=torch.int64, device=x_TD.device)
        counts_E.scatter_add_(0, routing.expert_idx_A, routing.kept_A.long())

        dtype = _compute_dtype(x_TD)
        w_gate_up, w_down = self.w_gate_up.to(dtype), self.w_down.to(dtype)
        # index_select rather than x[idx]: its backward is an index_add_, much faster on CPU than index_put_.
        x_AD = x_TD.to(dtype).index_select(0, token_sorted_A)
        if self._use_grouped(x_AD):
            y_AD = _grouped_swiglu(x_AD, w_gate_up, w_down, counts_E, kept_sorted_A)
        else:
            y_AD = _looped_swiglu(x_AD, w_gate_up, w_down, counts_E)
        weight_A = (routing.weight_A * routing.kept_A)[order_A]
        # Accumulate in fp32: a token's k contributions are summed, and bf16 sums lose the smaller one.
        y_AD = y_AD.float() * weight_A.unsqueeze(-1)
        out_TD = torch.zeros(x_TD.shape, dtype=torch.float32, device=x_TD.device)
        out_TD.index_add_(0, token_sorted_A, y_AD)
        return out_TD.to(x_TD.dtype)

    def _use_grouped(self, x_AD: torch.Tensor) -> bool:
        if self.dispatch != "auto":
            return self.dispatch == "grouped"
        hidden, d_model = self.w_down.shape[1:]
        aligned = hidden * x_AD.element_size() % 16 == 0 and d_model * x_AD.element_size() % 16 == 0
        hopper = x_AD.is_cuda and torch.cuda.get_device_capability(x_AD.device) == (9, 0)
        return hopper and x_AD.dtype == torch.bfloat16 and aligned


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # Plain tensors ignore autocast, so the experts cast their weights themselves, like nn.Linear would.
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _grouped_swiglu(
    x_AD: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, counts_E: torch.Tensor, kept_A: torch.Tensor
) -> torch.Tensor:
    offs_E = torch.cumsum(counts_E, 0).to(torch.int32)
    # Rows past the last group end (dropped assignments) are left uninitialised by _grouped_mm, in the forward
    # and in the input gradient; the two ``where`` keep them out of the output and out of x's gradient.
    keep_A1 = kept_A.unsqueeze(-1)
    x_AD = torch.where(keep_A1, x_AD, 0)
    gate_AH, up_AH = torch._grouped_mm(x_AD, w_gate_up, offs=offs_E).chunk(2, dim=-1)
    y_AD = torch._grouped_mm(F.silu(gate_AH) * up_AH, w_down, offs=offs_E)
    return torch.where(keep_A1, y_AD, 0)


def _looped_swiglu(
    x_AD: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, counts_E: torch.Tensor
) -> torch.Tensor:
    counts = counts_E.tolist()
    n_dropped = x_AD.shape[0] - sum(counts)
    # unbind once: indexing w[expert] per expert would make each backward write a full-size [E, ...] zero gradient.
    experts = zip(w_gate_up.unbind(0), w_down.unbind(0))
    outputs = []
    for x_ND, (w_gate_up_DH, w_down_HD) in zip(torch.split(x_AD, [*counts, n_dropped])[:-1], experts):
        if x_ND.shape[0] == 0:
            continue
        gate_NH, up_NH = (x_ND @ w_gate_up_DH).chunk(2, dim=-1)
        outputs.append((F.silu(gate_NH) * up_NH) @ w_down_HD)
    outputs.append(x_AD.new_zeros(n_dropped, x_AD.shape[1]))
    return torch.cat(outputs)
