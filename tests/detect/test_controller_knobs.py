"""Knobs looked up live: device/dtype moves after setup, replaced and lost knobs, two controllers on one knob."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
from detect_toys import MICRO, expected_bias, tiny_mixtral

from moe_monitor import MoEMonitor
from moe_monitor.controllers import AuxLossController, ExpertBiasController, RouterNoiseController
from moe_monitor.detect import make_snapshot
from moe_monitor.monitor import RouterMonitor, _in_backward
from moe_monitor.reference import MoEConfig, MoETransformer, ReferenceLM
from tests.callback.conftest import make_data, make_lm, make_trainer

LAYER0, LAYER1 = "blocks.0.moe.router", "blocks.1.moe.router"


class StepCounts:
    """Each training forward's selected experts per router, counted from the router's own output."""

    def __init__(self, routers: list[torch.nn.Module]) -> None:
        self.routers = routers
        self.current = [[0] * r.n_experts for r in routers]
        self.steps: list[list[list[int]]] = []  # [step][layer][expert]
        self.forwards: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (layer, probs_TE, expert_idx_A)
        for i, router in enumerate(routers):
            router.register_forward_hook(self._hook(i))

    def _hook(self, index: int):
        def hook(module, args, output):
            if not module.training or _in_backward():
                return
            for expert in output.expert_idx_A.tolist():
                self.current[index][expert] += 1
            self.forwards.append((index, output.probs_TE.detach().clone(), output.expert_idx_A.clone()))

        return hook

    def end_step(self) -> None:
        self.steps.append(self.current)
        self.current = [[0] * r.n_experts for r in self.routers]


def reference(**overrides) -> MoETransformer:
    torch.manual_seed(0)
    return MoETransformer(MoEConfig(**{**MICRO, "n_experts": 4, "expert_bias": True, **overrides}))


def train_steps(model, monitor, ctl, log: StepCounts, steps: range) -> None:
    for step in steps:
        model(torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(step)))
        log.end_step()
        ctl.on_train_step(monitor, step)


def test_bias_follows_the_buffer_after_model_to_float64_and_reaches_the_routers_selection():
    model = reference()
    monitor = RouterMonitor(model)
    ctl = ExpertBiasController(rate=1e-2)
    ctl.setup(model, monitor)
    model.to(torch.float64)  # after setup, as Lightning's strategy converts the module: the buffers are new tensors
    routers = [block.moe.router for block in model.blocks]
    log = StepCounts(routers)
    train_steps(model, monitor, ctl, log, range(1, 11))
    for i, router in enumerate(routers):
        want = expected_bias([step[i] for step in log.steps], 1e-2)
        assert router.expert_bias.dtype == torch.float64
        assert router.expert_bias.tolist() == pytest.approx(want, abs=1e-12)
        assert max(abs(b) for b in want) > 0.005  # the controller really moved the router's bias
        assert ctl.metrics()[f"controller/bias/{router_name(i)}/max_abs"] == pytest.approx(max(map(abs, want)))
    # The router selects with the bias: its choice in the next forward is top-k of probs + the expected bias.
    log.forwards.clear()
    model(torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(99)))
    for index, probs_TE, expert_idx_A in log.forwards:
        bias_E = torch.tensor(expected_bias([step[index] for step in log.steps], 1e-2), dtype=torch.float64)
        chosen_TK = (probs_TE.double() + bias_E).topk(2, dim=-1).indices
        assert torch.equal(expert_idx_A.view(-1, 2).sort(-1).values, chosen_TK.sort(-1).values)
        assert not torch.equal(chosen_TK.sort(-1).values, probs_TE.topk(2, -1).indices.sort(-1).values)


def router_name(i: int) -> str:
    return f"blocks.{i}.moe.router"


def test_bias_follows_a_buffer_replaced_by_a_new_tensor():
    model = reference()
    monitor = RouterMonitor(model)
    ctl = ExpertBiasController(rate=1e-2)
    ctl.setup(model, monitor)
    router = model.blocks[0].moe.router
    log = StepCounts([block.moe.router for block in model.blocks])
    train_steps(model, monitor, ctl, log, range(1, 4))
    router.expert_bias = torch.zeros(4)  # a registered buffer reassigned: a new tensor under the same name
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_steps(model, monitor, ctl, log, range(4, 9))
    assert "expert_bias" in dict(router.named_buffers())
    assert router.expert_bias.tolist() == pytest.approx(expected_bias([s[0] for s in log.steps[3:]], 1e-2), abs=1e-6)


def test_a_bias_set_to_none_mid_run_warns_once_and_the_controller_stops_claiming_it():
    model = reference()
    monitor = RouterMonitor(model)
    ctl = ExpertBiasController(rate=1e-2)
    ctl.setup(model, monitor)
    log = StepCounts([block.moe.router for block in model.blocks])
    train_steps(model, monitor, ctl, log, range(1, 3))
    assert [e.layer for e in ctl.on_window(monitor.collect(2), [])] == [LAYER0, LAYER1]
    model.blocks[1].moe.router.expert_bias = None
    with pytest.warns(RuntimeWarning, match=r"blocks\.1\.moe\.router\.expert_bias: .*gone.*Keep the knob") as caught:
        train_steps(model, monitor, ctl, log, range(3, 7))
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1
    (lost,) = [e for e in ctl.on_window(monitor.collect(6), []) if e.layer == LAYER1]
    assert (lost.kind, lost.rule, lost.layer, lost.step) == ("control", "knob_lost", LAYER1, 3)
    metrics = ctl.metrics()
    assert metrics["controller/bias/active_knobs"] == 1.0
    assert not any(key.startswith(f"controller/bias/{LAYER1}/") for key in metrics)
    # Layer 0 goes on exactly; layer 1 gets no further event, whatever happens.
    assert model.blocks[0].moe.router.expert_bias.tolist() == pytest.approx(
        expected_bias([s[0] for s in log.steps], 1e-2), abs=1e-6
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_steps(model, monitor, ctl, log, range(7, 40))
        events = ctl.on_window(monitor.collect(39), [])
    assert LAYER1 not in {e.layer for e in events}
    assert LAYER1 not in ctl.state_dict()["bias"]


@pytest.mark.parametrize(
    "break_knob, message",
    [
        (lambda r: setattr(r, "expert_bias", torch.zeros(5)), r"shape \[5\].*not a float tensor of shape \[4\]"),
        (lambda r: delattr(r, "expert_bias"), "gone"),
        (lambda r: r._buffers.__setitem__("expert_bias", torch.zeros(4, dtype=torch.int64)), "torch.int64"),
    ],
    ids=["wrong_shape", "deleted", "integer"],
)
def test_a_bias_that_no_longer_fits_the_router_is_named_in_one_warning(break_knob, message):
    model = reference()
    monitor = RouterMonitor(model)
    ctl = ExpertBiasController(rate=1e-2)
    ctl.setup(model, monitor)
    break_knob(model.blocks[0].moe.router)
    with pytest.warns(RuntimeWarning, match=message):
        ctl.on_train_step(monitor, 1)
    assert ctl.metrics()["controller/bias/active_knobs"] == 1.0


def test_scalar_knobs_lost_mid_run_stop_the_aux_and_noise_controllers():
    model = reference(expert_bias=False)
    monitor = RouterMonitor(model)
    aux, noise = AuxLossController(), RouterNoiseController()
    aux.setup(model, monitor)
    noise.setup(model, monitor)
    model.blocks[0].moe.router.aux_loss_coef = None
    model.blocks[0].moe.router.noise = "loud"
    snap = make_snapshot([[10] * 4, [10] * 4], step=5, layer_names=[LAYER0, LAYER1])
    firing = [make_alert(LAYER0), make_alert(LAYER1)]
    with pytest.warns(RuntimeWarning, match=r"blocks\.0\.moe\.router\.aux_loss_coef is gone"):
        aux_events = aux.on_window(snap, firing)
    with pytest.warns(RuntimeWarning, match=r"blocks\.0\.moe\.router\.noise is 'loud'"):
        noise_events = noise.on_window(snap, firing)
    assert [(e.rule, e.layer) for e in aux_events] == [("knob_lost", LAYER0), ("aux_loss_coef", LAYER1)]
    assert [(e.rule, e.layer) for e in noise_events] == [("knob_lost", LAYER0), ("router_noise", LAYER1)]
    assert model.blocks[0].moe.router.aux_loss_coef is None and model.blocks[1].moe.router.aux_loss_coef == 0.02
    assert aux.metrics() == {
        f"controller/aux_loss/{LAYER1}/coef": 0.02,
        "controller/aux_loss/max_coef": 0.02,
        "controller/aux_loss/active_knobs": 1.0,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [e.layer for e in aux.on_window(snap, [])] == [LAYER1]


def make_alert(layer: str):
    from moe_monitor.detect import CollapseEvent

    return CollapseEvent(0, "train", layer, "load_entropy", 0.2, 0.6, "critical", "m")


def test_bias_step_counter_survives_a_collect_without_on_window():
    model = reference()
    monitor = RouterMonitor(model)
    ctl = ExpertBiasController(rate=1e-2)
    ctl.setup(model, monitor)
    log = StepCounts([block.moe.router for block in model.blocks])
    for step in range(1, 9):
        train_steps(model, monitor, ctl, log, range(step, step + 1))
        if step % 3 == 0:
            monitor.collect(step)  # a window closed that the controller is not shown
    for i, block in enumerate(model.blocks):
        want = expected_bias([s[i] for s in log.steps], 1e-2)
        assert block.moe.router.expert_bias.tolist() == pytest.approx(want, abs=1e-6)


# ------------------------------------------------------------------------------------------ one knob, one controller
def test_two_controllers_on_one_knob_are_refused_at_setup():
    model = reference()
    monitor = RouterMonitor(model)
    first = ExpertBiasController()  # kept, as a callback keeps its controllers
    first.setup(model, monitor)
    second = ExpertBiasController()
    second.name = "bias2"
    with pytest.raises(ValueError, match=r"blocks\.0\.moe\.router\.expert_bias is already turned by.*one controller"):
        second.setup(model, monitor)
    # Aux and noise knobs are different attributes: they compose. Once the first monitor is removed, its
    # controllers no longer act and the knob is free.
    AuxLossController().setup(model, monitor)
    RouterNoiseController().setup(model, monitor)
    monitor.remove()
    second.setup(model, RouterMonitor(model))


def test_two_aux_controllers_on_a_model_wide_hugging_face_knob_are_refused():
    pytest.importorskip("transformers")
    model = tiny_mixtral()
    first = AuxLossController()
    first.setup(model, RouterMonitor(model))
    with pytest.raises(ValueError, match="router_aux_loss_coef is already turned by AuxLossController"):
        AuxLossController().setup(model, RouterMonitor(model))


def tiny_lm() -> ReferenceLM:
    return make_lm(seed=0, expert_bias=True)


def trainer(tmp_path, callbacks, **kwargs) -> pl.Trainer:
    return make_trainer(
        tmp_path, callbacks, **{"max_steps": 6, "limit_val_batches": 0, "log_every_n_steps": 3, **kwargs}
    )


@pytest.mark.filterwarnings("ignore:.*no logger")
def test_lightning_64_true_run_steers_the_converted_bias(tmp_path):
    # Lightning calls the callback's setup before the precision plugin converts the module to float64.
    lm = tiny_lm()
    log = StepCounts([block.moe.router for block in lm.model.blocks])

    class EndStep(pl.Callback):
        def on_train_batch_end(self, *args):
            log.end_step()

    callback = MoEMonitor(controllers=[ExpertBiasController(rate=1e-2)], log_every_n_steps=3)
    trainer(tmp_path, [EndStep(), callback], precision="64-true").fit(lm, datamodule=make_data())
    assert len(log.steps) == 6
    for i, block in enumerate(lm.model.blocks):
        bias = block.moe.router.expert_bias
        want = expected_bias([s[i] for s in log.steps], 1e-2)
        assert bias.dtype == torch.float64 and max(map(abs, want)) > 0
        assert bias.tolist() == pytest.approx(want, abs=1e-12)
    state = callback.state_dict()["controllers"]["bias"]
    assert torch.equal(state["bias"][f"model.{LAYER0}"], lm.model.blocks[0].moe.router.expert_bias)


@pytest.mark.filterwarnings("ignore:.*no logger")
def test_lightning_refuses_two_monitors_with_bias_controllers_on_one_model(tmp_path):
    first = MoEMonitor(controllers=[ExpertBiasController()], log_every_n_steps=3, name="slow")
    second = MoEMonitor(controllers=[ExpertBiasController()], log_every_n_steps=2, name="fast")
    with pytest.raises(ValueError, match=r"model\.blocks\.0\.moe\.router\.expert_bias is already turned"):
        trainer(tmp_path, [first, second]).fit(tiny_lm(), datamodule=make_data())


@pytest.mark.filterwarnings("ignore:.*no logger")
def test_lightning_run_with_a_bias_set_to_none_mid_run_warns_once_and_reports_it(tmp_path):
    lm = tiny_lm()

    class DropBias(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 2:
                lm.model.blocks[1].moe.router.expert_bias = None

    bias = ExpertBiasController(rate=1e-2)
    callback = MoEMonitor(controllers=[bias], log_every_n_steps=3)
    with pytest.warns(RuntimeWarning) as caught:
        trainer(tmp_path, [DropBias(), callback]).fit(lm, datamodule=make_data())
    lost_warnings = [w for w in caught if "stopped turning" in str(w.message)]
    assert len(lost_warnings) == 1 and "model.blocks.1.moe.router.expert_bias" in str(lost_warnings[0].message)
    lost = [e for e in callback.events if e.rule == "knob_lost"]
    assert [(e.layer, e.step) for e in lost] == [(f"model.{LAYER1}", 3)]
    later = [e for e in callback.events if e.kind == "control" and e.layer == f"model.{LAYER1}" and e.step > 3]
    assert later == []
    assert bias.metrics()["controller/bias/active_knobs"] == 1.0 and bias.active
    assert lm.model.blocks[0].moe.router.expert_bias.abs().max() > 0  # the other layer is still balanced
