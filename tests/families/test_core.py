"""The family registry, manual registration, the generic fallback and the advice in errors and warnings."""

from __future__ import annotations

import importlib
import math
import re
import warnings

import pytest
import torch
from torch import nn

from moe_monitor import NoRoutersFoundError, RouterMonitor, RouterSpec
from moe_monitor.families import FAMILIES, RouterOutputError, read_output
from moe_monitor.knobs import layer_knobs
from moe_monitor.routing import Routing

E, K, D = 8, 2, 16


class HomeRouter(nn.Module):
    """A home-made router: scores from a Linear, top-k chosen, returned as (logits, indices)."""

    def __init__(self, top_k_attr: bool = True, weights_first: bool = False) -> None:
        super().__init__()
        self.proj = nn.Linear(D, E, bias=False)
        if top_k_attr:
            self.top_k = K
        self.weights_first = weights_first

    def forward(self, x):
        logits = self.proj(x)
        weights, idx = logits.softmax(-1).topk(K, dim=-1)
        return (weights, idx) if self.weights_first else (logits, idx)


class HomeBlock(nn.Module):
    def __init__(self, **router_kwargs) -> None:
        super().__init__()
        self.router = HomeRouter(**router_kwargs)
        self.experts = nn.ModuleList(nn.Linear(D, D) for _ in range(E))

    def forward(self, x):
        _, idx = self.router(x)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            out = out + expert(x) * (idx == e).any(-1, keepdim=True)
        return out


class HomeModel(nn.Module):
    def __init__(self, n_layers: int = 2, **router_kwargs) -> None:
        super().__init__()
        self.layers = nn.ModuleList(HomeBlock(**router_kwargs) for _ in range(n_layers))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def _plain_counts(router: nn.Module, x: torch.Tensor) -> list[int]:
    counts = [0] * E
    with torch.no_grad():
        for e in router.proj(x).reshape(-1, E).topk(K, dim=-1).indices.reshape(-1).tolist():
            counts[e] += 1
    return counts


def test_every_registered_family_is_one_module_with_the_family_interface():
    for name in FAMILIES:
        family = importlib.import_module(f"moe_monitor.families.{name}")
        assert isinstance(family.NAME, str) and isinstance(family.SEARCHED, str), name
        assert callable(family.describe) and callable(family.discover), name
        assert family.discover(nn.Sequential(nn.Linear(2, 2))) == [], name


def test_from_topk_flattens_leading_dimensions_in_order():
    idx_BSK = torch.tensor([[[0, 1], [2, 3]], [[1, 0], [3, 2]]])
    logits_BSE = torch.arange(2 * 2 * 4, dtype=torch.float32).reshape(2, 2, 4)
    r = Routing.from_topk(idx_BSK, logits_TE=logits_BSE, kept_TK=idx_BSK != 3, skipped_TK=idx_BSK == 2)
    assert r.num_tokens == 4
    assert r.token_idx_A.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert r.expert_idx_A.tolist() == [0, 1, 2, 3, 1, 0, 3, 2]
    assert r.logits_TE.shape == (4, 4) and r.logits_TE[3].tolist() == [12.0, 13.0, 14.0, 15.0]
    assert r.kept_A.tolist() == [True, True, True, False, True, True, False, True]
    assert r.skipped_A.tolist() == [False, False, True, False, False, False, False, True]


def _no_routers_message() -> str:
    with pytest.raises(NoRoutersFoundError) as info:
        RouterMonitor(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    return str(info.value)


class _Named(nn.Module):
    """A model with a router at 'layers.0.mlp.router' returning (logits [..., 8], indices [..., 2])."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Module()])
        self.layers[0].mlp = nn.Module()
        self.layers[0].mlp.router = _Returning()


class _Returning(nn.Module):
    def forward(self, logits):
        return logits, logits.topk(2, dim=-1).indices


@pytest.mark.parametrize("shape", [(2, 3, 8), (6, 8)], ids=["BSk", "Tk"])
def test_the_no_routers_found_example_runs_as_written(shape):
    message = _no_routers_message()
    # The example: from "RouterMonitor(model, routers=[RouterSpec(" to the closing "])", across lines.
    example = re.search(r"RouterMonitor\(model, routers=\[RouterSpec\(.*?\)\)\]\)", message, re.S).group(0)
    assert "num_experts=8, top_k=2" in example and "num_experts=k" not in message
    model = _Named()
    namespace = {"model": model, "RouterMonitor": RouterMonitor, "RouterSpec": RouterSpec, "Routing": Routing}
    monitor = eval(example.replace("\n", " "), namespace)  # noqa: S307 - the message's own example, as written
    logits = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    model.layers[0].mlp.router(logits)
    snap = monitor.collect(step=0)
    expected = torch.zeros(8, dtype=torch.long)
    for e in logits.reshape(-1, 8).topk(2, dim=-1).indices.reshape(-1).tolist():
        expected[e] += 1
    assert snap.counts[0].tolist() == expected.tolist()
    assert snap.tokens.tolist() == [6]
    lse = torch.logsumexp(logits.reshape(-1, 8).double(), dim=-1)
    assert snap.stats["z_loss"][0].item() == pytest.approx(lse.square().mean().item(), rel=1e-6)


def test_no_routers_found_lists_every_family():
    message = _no_routers_message()
    for needle in ("TokenChoiceTopKRouter", "TopKGate", "MoERouter", "TopKRouter", "TopNGating", "Top2Gating"):
        assert needle in message


def test_generic_fallback_finds_a_home_made_moe_says_what_it_assumed_and_counts_right():
    torch.manual_seed(0)
    model = HomeModel()
    with pytest.warns(
        RuntimeWarning, match=r"(?s)guessed 2 router\(s\).*'layers.0.router'.*top_k=2 from attribute top_k"
    ):
        monitor = RouterMonitor(model)
    assert [(layer.name, layer.num_experts, layer.top_k, layer.adapter) for layer in monitor.layers] == [
        ("layers.0.router", E, K, "generic"),
        ("layers.1.router", E, K, "generic"),
    ]
    x = torch.randn(3, 5, D)
    expected = _plain_counts(model.layers[0].router, x)
    model(x)
    snap = monitor.collect(step=0)
    assert snap.counts[0].tolist() == expected
    assert snap.tokens.tolist() == [15, 15]
    assert math.isfinite(snap.stats["z_loss"][0].item())


def test_generic_fallback_takes_top_k_from_the_block_and_reads_torch_topk_output():
    class TopkRouter(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = nn.Linear(D, E)

        def forward(self, x):
            return self.gate(x).topk(K, dim=-1)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.router, self.experts, self.num_experts_per_tok = (
                TopkRouter(),
                nn.ModuleList(nn.ReLU() for _ in range(E)),
                K,
            )

    model = nn.Sequential(Block())
    with pytest.warns(RuntimeWarning, match="num_experts_per_tok"):
        monitor = RouterMonitor(model)
    x = torch.randn(7, D)
    model[0].router(x)
    expected = [0] * E
    for e in model[0].router.gate(x).topk(K, dim=-1).indices.reshape(-1).tolist():
        expected[e] += 1
    assert monitor.collect(step=0).counts[0].tolist() == expected


def test_a_generic_guess_the_first_forward_contradicts_warns_naming_the_module_and_counts_nothing():
    model = HomeModel(n_layers=1, weights_first=True)
    with pytest.warns(RuntimeWarning, match="guessed"):
        monitor = RouterMonitor(model)
    model.layers[0].router.forward = lambda x: (torch.zeros(*x.shape[:-1], K), torch.zeros(*x.shape[:-1], K))
    with pytest.warns(RuntimeWarning) as record:
        model(torch.randn(2, 3, D))
    message = next(str(w.message) for w in record if "layers.0.router" in str(w.message))
    assert "float [..., 2] tensor is there: that is the top-k weights, not the 8 expert scores" in message
    assert "RouterSpec(name='layers.0.router', num_experts=8, top_k=2, extract=fn)" in message
    assert "num_experts=2" not in message
    assert math.isnan(monitor.collect(step=0).stats["load_entropy"][0].item())


def test_a_router_registered_by_name_that_returns_weights_first_is_read_by_its_index_tensor():
    # Item 1 of the families issue: (top-k weights [B, S, k], indices [B, S, k]) must not be read as logits.
    torch.manual_seed(1)
    model = HomeModel(n_layers=1, weights_first=True)
    monitor = RouterMonitor(model, routers=[RouterSpec(name="layers.0.router", num_experts=E, top_k=K)])
    x = torch.randn(2, 4, D)
    expected = _plain_counts(model.layers[0].router, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(x)
    snap = monitor.collect(step=0)
    assert snap.counts[0].tolist() == expected
    assert math.isnan(snap.stats["z_loss"][0].item())  # no logits in that output: NaN, never made up


def test_read_output_never_takes_a_dispatch_tensor_for_logits():
    # A [T, E, C] dispatch tensor with C == E has last dimension E but E times too many rows.
    dispatch_TEC = torch.zeros(6, 4, 4)
    idx_TK = torch.zeros(6, 2, dtype=torch.long)
    routing = read_output((dispatch_TEC, idx_TK), num_experts=4, top_k=2)
    assert routing.logits_TE is None and routing.num_tokens == 6
    with pytest.raises(RouterOutputError, match=r"no integer \[..., 2\] tensor.*that is the top-k weights"):
        read_output((torch.zeros(6, 2), torch.zeros(6, 2)), num_experts=4, top_k=2)


def test_missing_expert_count_advice_names_only_what_is_missing():
    model = nn.Sequential(nn.Identity())
    with pytest.raises(
        ValueError, match=r"Cannot tell the num_experts and top_k .* RouterSpec\(name='0', num_experts=E, top_k=k\)"
    ):
        RouterMonitor(model, routers=["0"])
    model = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(ValueError, match=r"Cannot tell the top_k .*RouterSpec\(name='0', top_k=k\)"):
        RouterMonitor(model, routers=["0"])


def test_a_registered_module_whose_forward_never_runs_warns_with_what_to_register():
    class FunctionalGate(nn.Module):
        def __init__(self):
            super().__init__()
            self.wg = nn.Linear(D, E, bias=False)

        def forward(self, x):
            return torch.nn.functional.linear(x, self.wg.weight).topk(K, dim=-1)

    model = nn.Sequential(FunctionalGate())
    monitor = RouterMonitor(model, routers=[RouterSpec(name="0.wg", top_k=K)])
    with pytest.warns(
        RuntimeWarning,
        match=r"(?s)router '0.wg' \(Linear\) was registered, but its forward never ran.*RouterSpec\(name='0'",
    ):
        model(torch.randn(3, D))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(torch.randn(3, D))  # said once
    assert monitor.collect(step=0).tokens.tolist() == [0]


def test_reference_family_knobs_resolve_to_the_router_attributes():
    from moe_monitor.reference import MoEConfig, MoETransformer

    config = MoEConfig(d_model=16, n_layers=2, n_heads=2, seq_len=8, n_experts=4, d_expert=8, expert_bias=True)
    model = MoETransformer(config)
    monitor = RouterMonitor(model)
    knobs = layer_knobs(model, monitor.layers[1])
    router = model.blocks[1].moe.router
    assert knobs.expert_bias.get(model) is router.expert_bias
    assert knobs.aux_loss_coef[0].get(model) == router.aux_loss_coef
    assert [ref.get(model) for ref in knobs.noise] == [router.noise, router.noise_std]
