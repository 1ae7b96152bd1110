"""Megatron-Core's ``TopKRouter``: recognition, knobs, and its real forward counted against its own routing map.

Its forward is written for CUDA: ``gating`` moves a CPU weight to ``torch.cuda.current_device()``, and the expert
bias buffers are created there. The forward tests run twice: on CUDA when there is one (the GPU machine), and on
the CPU with ``torch.cuda.current_device`` answering ``"cpu"`` so that the very same forward, hooks and checks run
here (nothing in them runs for the first time on a GPU).

Megatron-Core 0.16.1 without Transformer Engine reads ``moe_utils.te_general_gemm``, a name it binds only when
Transformer Engine imports, so every router forward raises ``NameError``; the tests bind it to ``None`` (what the
library's own check expects when Transformer Engine is absent) on both devices.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from moe_monitor import RouterMonitor
from moe_monitor.controllers import ExpertBiasController
from moe_monitor.knobs import layer_knobs
from tests.detect.detect_toys import expected_bias

router_module = pytest.importorskip("megatron.core.transformer.moe.router")
from megatron.core.process_groups_config import ProcessGroupCollection  # noqa: E402
from megatron.core.transformer.moe import moe_utils  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

D, E, K = 16, 8, 2


def _router(**overrides) -> nn.Module:
    fields = dict(
        num_layers=1, hidden_size=D, num_attention_heads=2, num_moe_experts=E, moe_router_topk=K,
        moe_aux_loss_coeff=0.01, use_cpu_initialization=True,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Megatron's own deprecation notices about unrelated defaults
        config = TransformerConfig(**{**fields, **overrides})
    groups = ProcessGroupCollection(tp=None, cp=None, tp_cp=None, tp_dp_cp=None)
    torch.manual_seed(0)
    return router_module.TopKRouter(config, pg_collection=groups).eval()


def _model(**overrides) -> nn.ModuleDict:
    return nn.ModuleDict({"layers": nn.ModuleList([_router(**overrides), _router(**overrides)])})


def test_routers_are_found_with_their_expert_count_top_k_and_capacity():
    monitor = RouterMonitor(_model())
    assert [(l.name, l.num_experts, l.top_k, l.adapter, l.dropless) for l in monitor.layers] == [
        ("layers.0", E, K, "megatron", True),
        ("layers.1", E, K, "megatron", True),
    ]
    capped = RouterMonitor(_model(moe_expert_capacity_factor=1.0, moe_token_drop_policy="probs"))
    assert [layer.dropless for layer in capped.layers] == [False, False]


def test_dropless_routing_map_is_counted_as_megatron_routed_it():
    model = _model()
    monitor = RouterMonitor(model)
    router = model["layers"][0]
    logits_TE = torch.randn(12, E, generator=torch.Generator().manual_seed(1))
    output = router.routing(logits_TE.reshape(6, 2, E))
    routing = monitor.layers[0].extract(router, (torch.zeros(6, 2, D),), output)
    counts = torch.zeros(E, dtype=torch.long).index_add_(0, routing.expert_idx_A, torch.ones_like(routing.expert_idx_A))
    assert counts.tolist() == output[1].sum(dim=0).tolist()
    assert routing.num_tokens == 12 and routing.kept_A is None


def test_group_limited_routing_with_token_dropping_is_refused_at_setup():
    with pytest.raises(ValueError, match=r"group-limited routing.*moe_expert_capacity_factor=1.0"):
        RouterMonitor(_model(moe_expert_capacity_factor=1.0, moe_router_num_groups=2, moe_router_group_topk=1))


def test_knob_is_the_shared_aux_loss_coefficient_of_the_config():
    model = _model(moe_aux_loss_coeff=0.02)
    monitor = RouterMonitor(model)
    knobs = layer_knobs(model, monitor.layers[1])
    assert [ref.label for ref in knobs.aux_loss_coef] == ["layers.1.config.moe_aux_loss_coeff"]
    assert knobs.aux_loss_coef[0].get(model) == 0.02
    assert knobs.expert_bias is None  # moe_router_enable_expert_bias off


# ------------------------------------------------------------------------- the real forward, on CUDA and the CPU
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="Megatron-Core's CUDA forward needs a GPU")
BIASED = dict(moe_router_enable_expert_bias=True, moe_router_score_function="sigmoid")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=needs_cuda)])
def device(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> torch.device:
    if not hasattr(moe_utils, "te_general_gemm"):
        monkeypatch.setattr(moe_utils, "te_general_gemm", None, raising=False)
    if request.param == "cpu":
        monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")
    return torch.device(request.param)


def _training_model(**overrides) -> nn.ModuleDict:
    """Two routers in training mode, built on the CPU (``use_cpu_initialization``): their first forward moves the
    gate weight to ``torch.cuda.current_device()``. No aux loss: Megatron reduces it over a tensor-parallel group."""
    return _model(moe_aux_loss_coeff=0.0, **overrides).train()


def _record_maps(model: nn.ModuleDict) -> list[list[torch.Tensor]]:
    maps: list[list[torch.Tensor]] = [[] for _ in model["layers"]]
    for i, router in enumerate(model["layers"]):
        router.register_forward_hook(lambda module, args, output, i=i: maps[i].append(output[1].detach().cpu()))
    return maps


def _logits(router: nn.Module, x_SBD: torch.Tensor) -> torch.Tensor:
    """The router's logits recomputed in float64 on the host (an independent gate matmul, with the gate's own bias:
    ``add_bias_linear`` is on by default)."""
    logits_TE = x_SBD.reshape(-1, D).double().cpu() @ router.weight.detach().double().cpu().T
    return logits_TE if router.bias is None else logits_TE + router.bias.detach().double().cpu()


def _one_hot(idx_TK: torch.Tensor) -> torch.Tensor:
    return torch.zeros(idx_TK.shape[0], E, dtype=torch.bool).scatter_(1, idx_TK, True)


def test_forward_counts_equal_the_routing_map_and_megatrons_own_counter(device):
    model = _training_model(**BIASED)
    for router in model["layers"]:
        router.expert_bias.copy_(torch.linspace(0.0, 0.5, E))  # a strong bias: it decides many choices
    monitor = RouterMonitor(model)
    maps = _record_maps(model)
    x_SBD = torch.randn(8, 2, D, device=device)  # [sequence, batch, hidden], as Megatron lays tokens out
    for router in model["layers"]:
        router(x_SBD)
    snap = monitor.collect(step=1)
    for i, router in enumerate(model["layers"]):
        assert router.weight.device.type == device.type and router.expert_bias.device.type == device.type
        (map_TE,) = maps[i]
        # Megatron's own counter of routed tokens per expert (the expert-bias update's input).
        assert snap.counts[i].tolist() == map_TE.sum(0).tolist() == router.local_tokens_per_expert.long().tolist()
        logits_TE = _logits(router, x_SBD)
        with_bias_TE = _one_hot((logits_TE.sigmoid() + router.expert_bias.double().cpu()).topk(K, dim=-1).indices)
        assert torch.equal(map_TE, with_bias_TE)  # a replica of Megatron's choice, bias included
        assert not torch.equal(map_TE, _one_hot(logits_TE.topk(K, dim=-1).indices))  # the bias really mattered
        # The logits are the ones ``gating`` returned (the stash): z-loss = mean logsumexp^2 of them.
        z_loss = torch.logsumexp(logits_TE, -1).square().mean().item()
        assert snap.stats["z_loss"][i].item() == pytest.approx(z_loss, rel=1e-4)
    assert snap.dropped.tolist() == [0, 0] and snap.tokens.tolist() == [16, 16]


def test_capacity_dropping_counts_choices_kept_and_dropped(device):
    model = _training_model(moe_expert_capacity_factor=0.5, moe_token_drop_policy="probs")
    monitor = RouterMonitor(model)
    maps = _record_maps(model)
    x_SBD = torch.randn(8, 2, D, device=device)
    for router in model["layers"]:
        router(x_SBD)
    snap = monitor.collect(step=1)
    for i, router in enumerate(model["layers"]):
        (map_TE,) = maps[i]
        chosen_TK = _logits(router, x_SBD).softmax(-1).topk(K, dim=-1).indices  # the choice before dropping
        assert snap.counts[i].tolist() == _one_hot(chosen_TK).sum(0).tolist()
        assert snap.kept[i].tolist() == map_TE.sum(0).tolist()  # what each expert ran: Megatron's map
        assert snap.dropped[i].item() == 16 * K - map_TE.sum().item() > 0


def test_bias_controller_steers_megatrons_expert_bias_buffer(device):
    model = _training_model(**BIASED)
    monitor = RouterMonitor(model)
    assert layer_knobs(model, monitor.layers[0]).expert_bias.label == "layers.0.expert_bias"
    controller = ExpertBiasController(rate=1e-2)
    controller.setup(model, monitor)
    maps = _record_maps(model)
    generator = torch.Generator().manual_seed(3)
    for step in range(1, 7):
        x_SBD = torch.randn(8, 2, D, generator=generator).to(device)
        for router in model["layers"]:
            router(x_SBD)
        controller.on_train_step(monitor, step)
    state = controller.state_dict()["bias"]
    for i, router in enumerate(model["layers"]):
        want = expected_bias([m.sum(0).tolist() for m in maps[i]], 1e-2)
        assert router.expert_bias.device.type == device.type and router.expert_bias.dtype == torch.float32
        assert router.expert_bias.tolist() == pytest.approx(want, abs=1e-6)
        assert max(map(abs, want)) > 0.005  # the controller really moved Megatron's bias
        assert torch.equal(state[f"layers.{i}"], router.expert_bias.cpu())  # what it says it set


