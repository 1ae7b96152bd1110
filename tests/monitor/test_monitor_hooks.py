"""Hook behaviour: phases, activation checkpointing, gradient accumulation, no host sync, failure policy."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from monitor_toys import ToyModel, record_hook_syncs
from torch import nn

from moe_monitor import NoRoutersFoundError, RouterMonitor, RouterSpec


def _expected_counts(model: ToyModel, x_BSD: torch.Tensor) -> list[list[int]]:
    """Counts recomputed from the routers' own outputs, layer by layer, with a plain loop."""
    counts = []
    with torch.no_grad():
        for block in model.blocks:
            _, _, idx_TK = block.router(x_BSD)
            layer = [0] * block.router.num_experts
            for e in idx_TK.reshape(-1).tolist():
                layer[e] += 1
            counts.append(layer)
            x_BSD = block(x_BSD)
    return counts


def _monitor(model: ToyModel, **kwargs) -> RouterMonitor:
    return RouterMonitor(model, routers=model.router_names, **kwargs)


@pytest.mark.parametrize("checkpointing", ["reentrant", "non_reentrant"])
def test_activation_checkpointing_recompute_is_not_counted(checkpointing):
    torch.manual_seed(0)
    model = ToyModel(checkpointing=checkpointing)
    monitor = _monitor(model)
    x_BSD = torch.randn(2, 5, 8, requires_grad=True)
    calls = []
    handle = model.blocks[0].router.register_forward_hook(lambda *args: calls.append(1))
    model(x_BSD).square().sum().backward()
    handle.remove()
    assert len(calls) == 2, "the router must really run twice (forward and recompute) for this test to mean anything"
    snap = monitor.collect(step=0)
    assert snap.tokens.tolist() == [10, 10]
    assert snap.counts.tolist() == _expected_counts(model, x_BSD.detach())


def test_eval_forwards_count_to_their_own_phase():
    torch.manual_seed(1)
    model = ToyModel()
    x_train, x_val, x_test = torch.randn(2, 3, 8), torch.randn(1, 4, 8), torch.randn(1, 2, 8)
    expected_train, expected_val = _expected_counts(model, x_train), _expected_counts(model, x_val)
    monitor = _monitor(model)
    model.train()
    model(x_train)
    model.eval()
    with torch.no_grad():
        model(x_val)
    with monitor.phase("test"), torch.no_grad():
        model(x_test)
    model.train()
    with torch.inference_mode(), monitor.phase("val"):
        model(x_val)
    val = monitor.collect(step=0, phase="val")
    train = monitor.collect(step=0, phase="train")
    test = monitor.collect(step=0, phase="test")
    assert train.tokens.tolist() == [6, 6] and train.counts.tolist() == expected_train
    assert val.tokens.tolist() == [8, 8]
    assert val.counts.tolist() == [[2 * c for c in layer] for layer in expected_val]
    assert test.tokens.tolist() == [2, 2] and val.phase == "val"
    # Each collect closed only its own phase's window; inference-mode buffers can be reset and reused.
    with torch.inference_mode():
        model.eval()
        model(x_val)
    assert monitor.collect(step=1, phase="val").tokens.tolist() == [4, 4]
    assert monitor.collect(step=1, phase="train").tokens.tolist() == [0, 0]


def test_gradient_accumulation_micro_batches_add_up_to_the_big_batch():
    torch.manual_seed(2)
    model = ToyModel()
    x_BSD = torch.randn(4, 3, 8)
    monitor = _monitor(model)
    model(x_BSD).sum().backward()
    big = monitor.collect(step=0)
    for micro in x_BSD.chunk(2):
        model(micro).sum().backward()
    accumulated = monitor.collect(step=1)
    assert accumulated.counts.tolist() == big.counts.tolist()
    assert accumulated.tokens.tolist() == big.tokens.tolist() == [12, 12]
    for name in ("z_loss", "router_entropy", "top1_confidence", "aux_loss", "load_entropy"):
        assert accumulated.stats[name].tolist() == pytest.approx(big.stats[name].tolist(), rel=1e-6), name


@contextlib.contextmanager
def _host_sync_forbidden():
    def forbid(name):
        def raiser(*args, **kwargs):
            raise AssertionError(f"host sync: Tensor.{name} called on the hot path")

        return raiser

    names = ("item", "tolist", "cpu", "numpy", "__bool__")
    saved = {name: getattr(torch.Tensor, name) for name in names}
    try:
        for name in names:
            setattr(torch.Tensor, name, forbid(name))
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def test_sync_recorder_catches_syncs_planted_in_a_hook(monkeypatch):
    from moe_monitor.routing import Routing

    def syncing_extract(module, args, output):
        logits_TE, _, idx_TK = output
        flat_A = idx_TK.reshape(-1)
        _ = flat_A.nonzero(), int(flat_A.max()), flat_A[flat_A >= 0], torch.bincount(flat_A)
        _ = logits_TE.masked_select(logits_TE > 0)
        return Routing.from_topk(idx_TK, logits_TE=logits_TE)

    model = ToyModel()
    with record_hook_syncs(monkeypatch) as recorder:
        spec = RouterSpec(name="blocks.0.router", num_experts=4, top_k=2, extract=syncing_extract)
        monitor = RouterMonitor(model, routers=[spec])
        model(torch.randn(1, 3, 8))
    assert set(recorder.ops) == {
        "aten.nonzero.default",
        "aten._local_scalar_dense.default",
        "aten.index.Tensor (bool mask)",
        "aten.bincount.default",
        "aten.masked_select.default",
    }
    assert monitor.collect(step=0).tokens.tolist() == [3]


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_hooks_never_synchronise_with_the_host(monkeypatch):
    torch.manual_seed(3)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = ToyModel(top_k=2, checkpointing="non_reentrant").to(device)
    with record_hook_syncs(monkeypatch) as recorder:
        monitor = _monitor(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x_BSD = torch.randn(2, 6, 8, device=device)
    mask_BS = torch.ones(2, 6, dtype=torch.bool, device=device)
    mask_BS[1, 4:] = False
    model(x_BSD)  # warm-up allocates the window buffer and the mask copy outside the checked region
    monitor.set_token_mask(mask_BS)
    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode("error")
    try:
        with _host_sync_forbidden():
            for _ in range(2):
                optimizer.zero_grad()
                model(x_BSD).square().mean().backward()
                optimizer.step()
            model.eval()
            with torch.no_grad():
                model(x_BSD)
    finally:
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    assert recorder.ops == []
    assert monitor.collect(step=0).tokens.tolist() == [12 + 2 * 10] * 2
    assert monitor.collect(step=0, phase="val").tokens.tolist() == [10, 10]


def test_window_counts_is_a_device_view_without_sync():
    torch.manual_seed(4)
    model = ToyModel()
    monitor = _monitor(model)
    assert monitor.window_counts().shape == (2, 4)
    model(torch.randn(1, 5, 8))
    view = monitor.window_counts("train")
    assert view.sum(dim=1).tolist() == [10.0, 10.0]
    monitor.collect(step=0)
    assert view.sum().item() == 0.0


def test_failing_extraction_warns_once_and_disables_only_that_layer():
    torch.manual_seed(5)
    model = ToyModel()

    def broken(module, args, output):
        raise RuntimeError("adapter bug")

    monitor = RouterMonitor(
        model,
        routers=[RouterSpec(name="blocks.0.router", num_experts=4, top_k=2, extract=broken), "blocks.1.router"],
    )
    with pytest.warns(RuntimeWarning, match="adapter bug") as record:
        model(torch.randn(1, 3, 8)).sum().backward()
        model(torch.randn(1, 3, 8))
    messages = [str(w.message) for w in record if "adapter bug" in str(w.message)]
    assert len(messages) == 1
    assert "RouterSpec(name='blocks.0.router', num_experts=4, top_k=2, extract=fn)" in messages[0]
    snap = monitor.collect(step=0)
    assert math.isnan(snap.stats["load_entropy"][0].item())
    assert snap.tokens.tolist() == [0, 6]
    assert math.isfinite(snap.stats["load_entropy"][1].item())


def test_no_router_error_lists_what_was_searched_and_how_to_register():
    with pytest.raises(NoRoutersFoundError) as info:
        RouterMonitor(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "moe_monitor.reference.router.Router" in message and "_can_record_outputs" in message
    assert "RouterSpec(" in message and "routers=" in message
    assert "MoEMonitor(routers=[...])" in message and "relative to the LightningModule" in message
    assert "'model.blocks.0.moe.router'" in message


def test_an_empty_router_list_says_it_is_empty():
    with pytest.raises(NoRoutersFoundError, match=r"routers= is an empty list.*routers=None"):
        RouterMonitor(ToyModel(), routers=[])


def test_manual_registration_errors_at_setup():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="No module named 'gate'"):
        RouterMonitor(model, routers=["gate"])
    with pytest.raises(ValueError, match="top_k"):
        RouterMonitor(model, routers=["0"])
    with pytest.raises(ValueError, match="kind"):
        RouterMonitor(model, routers=[RouterSpec(name="0", top_k=1, kind="hash")])


def test_remove_and_context_manager_detach_every_hook():
    torch.manual_seed(6)
    model = ToyModel()
    with _monitor(model) as monitor:
        model(torch.randn(1, 2, 8))
    model(torch.randn(1, 2, 8))
    assert monitor.collect(step=0).tokens.tolist() == [2, 2]
    assert all(not block.router._forward_hooks for block in model.blocks)


@pytest.mark.slow
def test_torch_compile_traced_model_counts_like_eager():
    torch.manual_seed(7)
    model = ToyModel()
    x_BSD = torch.randn(2, 5, 8)
    expected = _expected_counts(model, x_BSD)
    monitor = _monitor(model)
    compiled = torch.compile(model, backend="eager")
    for _ in range(2):
        compiled(x_BSD).sum().backward()
    assert monitor.collect(step=0).counts.tolist() == [[2 * c for c in layer] for layer in expected]


@pytest.mark.slow
def test_torch_compile_fullgraph_traces_the_hooks_without_a_graph_break():
    torch.manual_seed(7)
    model = ToyModel()
    x_BSD = torch.randn(2, 5, 8)
    expected = _expected_counts(model, x_BSD)
    monitor = _monitor(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    compiled(x_BSD).sum().backward()
    assert monitor.collect(step=0).counts.tolist() == expected


@pytest.mark.slow
def test_compiled_blocks_recomputed_by_eager_checkpointing_are_not_counted():
    torch.manual_seed(7)
    model = ToyModel()
    x_BSD = torch.randn(2, 5, 8, requires_grad=True)
    expected = _expected_counts(model, x_BSD.detach())
    monitor = _monitor(model)
    torch._dynamo.reset()
    # The whole compiled graph, counter update included, re-runs during backward: the update must be weighted 0.
    blocks = [torch.compile(block, backend="aot_eager") for block in model.blocks]
    h_BSD = x_BSD
    for block in blocks:
        h_BSD = torch.utils.checkpoint.checkpoint(block, h_BSD, use_reentrant=False)
    h_BSD.square().sum().backward()
    assert x_BSD.grad is not None
    assert monitor.collect(step=0).counts.tolist() == expected


@pytest.mark.parametrize("num_experts", [3, 5])
def test_expert_count_other_than_the_gate_width_is_a_setup_error(num_experts):
    model = nn.Sequential(nn.Linear(8, 4))
    with pytest.raises(ValueError, match=r"computes 4 expert scores.*RouterSpec\(name='0', num_experts=4, top_k=2\)"):
        RouterMonitor(model, routers=[RouterSpec(name="0", num_experts=num_experts, top_k=2)])


def test_manual_registration_is_listed_in_model_order_and_rejects_duplicates():
    torch.manual_seed(8)
    model = ToyModel(n_layers=3)
    names = [name for name, module in model.named_modules() if name.endswith("router")]
    monitor = RouterMonitor(model, routers=[names[2], model.blocks[0].router, RouterSpec(name=names[1])])
    assert names == ["blocks.0.router", "blocks.1.router", "blocks.2.router"]
    assert [layer.name for layer in monitor.layers] == names
    x_BSD = torch.randn(1, 3, 8)
    model(x_BSD)
    assert monitor.collect(step=0).counts.tolist() == _expected_counts(model, x_BSD)
    monitor.remove()
    with pytest.raises(ValueError, match="'blocks.0.router' is given twice"):
        RouterMonitor(model, routers=["blocks.0.router", model.blocks[0].router])
    assert all(not block.router._forward_hooks for block in model.blocks)
