"""Controllers: their update rules, knobs on the reference and Hugging Face models, setup errors and state."""

from __future__ import annotations

import io

import pytest
import torch
from detect_toys import MICRO, expected_bias, tiny_mixtral
from torch import nn

from moe_monitor.adapters import RouterSpec
from moe_monitor.controllers import (
    AuxLossController,
    ExpertBiasController,
    RouterNoiseController,
    make_controllers,
)
from moe_monitor.detect import CollapseEvent, make_snapshot
from moe_monitor.monitor import RouterMonitor
from moe_monitor.reference import MoEConfig, MoETransformer
from moe_monitor.scenarios import _bias_gates

LAYER0, LAYER1 = "blocks.0.moe.router", "blocks.1.moe.router"


def reference(**overrides) -> tuple[MoETransformer, RouterMonitor]:
    torch.manual_seed(0)
    model = MoETransformer(MoEConfig(**{**MICRO, "n_experts": 4, **overrides}))
    return model, RouterMonitor(model)


def alert(layer: str, rule: str = "load_entropy", kind: str = "alert", step: int = 0) -> CollapseEvent:
    return CollapseEvent(step, "train", layer, rule, 0.2, 0.6, "critical" if kind == "alert" else "info", "m", (), kind)


def window(step: int = 0, phase: str = "train"):
    return make_snapshot([[10, 10, 10, 10], [10, 10, 10, 10]], step=step, phase=phase, layer_names=[LAYER0, LAYER1])


def roundtrip(state: dict) -> dict:
    """Through ``torch.save`` / ``torch.load(weights_only=True)``, as a Lightning checkpoint does."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# ---------------------------------------------------------------------------------------------- AuxLossController
def test_aux_follows_a_hand_written_grow_hold_decay_sequence_per_layer():
    model, monitor = reference()  # aux_loss_coef 0.01 on every layer
    router0, router1 = model.blocks[0].moe.router, model.blocks[1].moe.router
    ctl = AuxLossController(growth=2.0, decay=0.5, floor=0.01, max_coef=0.05, hold=2)
    ctl.setup(model, monitor)
    # Windows 1-4 alert on layer 0 (it keeps firing until its recovery event in window 5); windows 5-6 are held;
    # from window 7 the excess over 0.01 halves per window until within 5 % of 0.01 (0.0005); window 15 alerts again.
    shown = {1: [alert(LAYER0)], 5: [alert(LAYER0, kind="recovery")], 15: [alert(LAYER0)]}
    expected = [0.02, 0.04, 0.05, 0.05, 0.05, 0.05, 0.03, 0.02, 0.015, 0.0125, 0.01125, 0.010625, 0.01, 0.01, 0.02]
    coefs, events = [], []
    for step in range(1, 16):
        events += ctl.on_window(window(step), shown.get(step, []))
        coefs.append(router0.aux_loss_coef)
    assert coefs == pytest.approx(expected)
    assert router1.aux_loss_coef == 0.01  # only the collapsing layer is touched
    # One event per change, none while the value stands still (windows 4-6, 14).
    assert [e.step for e in events] == [1, 2, 3, 7, 8, 9, 10, 11, 12, 13, 15]
    assert {e.layer for e in events} == {LAYER0} and {e.rule for e in events} == {"aux_loss_coef"}
    assert [e.value for e in events] == pytest.approx(
        [0.02, 0.04, 0.05, 0.03, 0.02, 0.015, 0.0125, 0.01125, 0.010625, 0.01, 0.02]
    )
    assert (events[0].value, events[0].threshold) == (0.02, 0.01) and "0.01 -> 0.02" in events[0].message
    assert "decaying back" in events[3].message
    assert ctl.metrics() == {
        f"controller/aux_loss/{LAYER0}/coef": 0.02,
        f"controller/aux_loss/{LAYER1}/coef": 0.01,
        "controller/aux_loss/max_coef": 0.02,
        "controller/aux_loss/active_knobs": 2.0,
    }


def test_aux_floor_starts_from_zero_and_returns_to_zero():
    model, monitor = reference(aux_loss_coef=0.0)
    ctl = AuxLossController(floor=0.01, hold=0, decay=0.5)
    ctl.setup(model, monitor)
    ctl.on_window(window(1), [alert(LAYER1, "dead_experts")])
    assert model.blocks[1].moe.router.aux_loss_coef == 0.01
    ctl.on_window(window(2), [alert(LAYER1, "dead_experts", kind="recovery")])
    assert model.blocks[1].moe.router.aux_loss_coef == 0.0  # 0.005 is under the floor: back to the base 0


def test_controllers_ignore_validation_windows_and_other_rules():
    model, monitor = reference()
    ctl = AuxLossController()
    ctl.setup(model, monitor)
    val_alert = CollapseEvent(0, "val", LAYER0, "load_entropy", 0.2, 0.6, "critical", "m")
    assert ctl.on_window(window(1, phase="val"), [alert(LAYER0)]) == []
    assert ctl.on_window(window(2), [val_alert, alert(LAYER0, "z_loss_spike")]) == []
    assert model.blocks[0].moe.router.aux_loss_coef == 0.01


def test_aux_on_mixtral_sets_model_and_config_coefficient():
    pytest.importorskip("transformers")
    model = tiny_mixtral(router_aux_loss_coef=0.001)
    config = model.config
    monitor = RouterMonitor(model)
    aux, noise = AuxLossController(), RouterNoiseController()
    aux.setup(model, monitor)
    noise.setup(model, monitor)
    layer = monitor.layers[1].name
    events = aux.on_window(make_snapshot([[5] * 4] * 2, layer_names=[m.name for m in monitor.layers]), [alert(layer)])
    assert model.router_aux_loss_coef == 0.01 and model.config.router_aux_loss_coef == 0.01
    assert events[0].layer == "all"
    noise.on_window(make_snapshot([[5] * 4] * 2, layer_names=[m.name for m in monitor.layers]), [alert(layer)])
    assert model.model.layers[1].mlp.jitter_noise == 0.05 and model.model.layers[0].mlp.jitter_noise == 0.0
    config.output_router_logits = False
    with pytest.raises(ValueError, match="output_router_logits"):
        AuxLossController().setup(model, monitor)


# ------------------------------------------------------------------------------------------ RouterNoiseController
def test_noise_switches_on_grows_and_anneals_back_to_the_original_setting():
    model, monitor = reference()
    router = model.blocks[0].moe.router
    assert (router.noise, router.noise_std) == ("none", 0.01)
    ctl = RouterNoiseController(start_std=0.1, max_std=0.3, growth=2.0, decay=0.5, hold=1)
    ctl.setup(model, monitor)
    stds = []
    ctl.on_window(window(1), [alert(LAYER0, "dead_experts")])
    stds.append((router.noise, router.noise_std))
    for step in (2, 3):
        ctl.on_window(window(step), [])
        stds.append((router.noise, router.noise_std))
    assert stds == [("gaussian", 0.1), ("gaussian", 0.2), ("gaussian", 0.3)]
    assert model.blocks[1].moe.router.noise == "none"
    ctl.on_window(window(4), [alert(LAYER0, "dead_experts", kind="recovery")])  # hold
    assert router.noise_std == 0.3
    ctl.on_window(window(5), [])
    assert router.noise_std == pytest.approx(0.15)
    (event,) = ctl.on_window(window(6), [])  # 0.075 < start 0.1: original setting back
    assert (router.noise, router.noise_std) == ("none", 0.01)
    assert event.kind == "control" and "gaussian 0.15 -> none 0.01" in event.message
    assert ctl.metrics()[f"controller/noise/{LAYER0}/std"] == 0.0


# ------------------------------------------------------------------------------------------ ExpertBiasController
class CountingMonitor:
    """Stands in for RouterMonitor: ``window_counts`` returns whatever the test sets."""

    def __init__(self, monitor: RouterMonitor) -> None:
        self.layers = monitor.layers
        self.counts_LE = torch.zeros(len(monitor.layers), 4, dtype=torch.float64)

    def window_counts(self, phase: str = "train") -> torch.Tensor:
        return self.counts_LE


def test_bias_update_uses_each_step_counts_and_window_restarts():
    model, monitor = reference(expert_bias=True)
    fake = CountingMonitor(monitor)
    ctl = ExpertBiasController(rate=0.01)
    ctl.setup(model, fake)
    steps = [[10.0, 0.0, 5.0, 5.0], [0.0, 9.0, 3.0, 0.0], [4.0, 4.0, 4.0, 4.0], [1.0, 2.0, 3.0, 10.0]]
    # Two steps, a window close, two more steps; the monitor's window counts are cumulative within a window.
    fake.counts_LE[0] = torch.tensor(steps[0], dtype=torch.float64)
    ctl.on_train_step(fake, 1)
    fake.counts_LE[0] += torch.tensor(steps[1], dtype=torch.float64)
    ctl.on_train_step(fake, 2)
    events = ctl.on_window(window(2), [])
    fake.counts_LE.zero_()  # collect() restarted the window
    fake.counts_LE[0] = torch.tensor(steps[2], dtype=torch.float64)
    ctl.on_train_step(fake, 3)
    fake.counts_LE[0] += torch.tensor(steps[3], dtype=torch.float64)
    ctl.on_train_step(fake, 4)
    bias = model.blocks[0].moe.router.expert_bias
    assert bias.tolist() == pytest.approx(expected_bias(steps, 0.01), abs=1e-7)
    assert float(bias.sum()) == pytest.approx(0.0, abs=1e-7)
    assert model.blocks[1].moe.router.expert_bias.abs().max() == 0  # layer 1 saw no tokens
    assert [e.rule for e in events] == ["expert_bias", "expert_bias"] and events[0].kind == "control"
    metrics = ctl.metrics()
    assert metrics["controller/bias/updates"] == 4.0
    assert metrics[f"controller/bias/{LAYER0}/max_abs"] == pytest.approx(float(bias.abs().max()))


def test_bias_events_only_when_the_range_doubles_or_halves():
    model, monitor = reference(expert_bias=True)
    fake = CountingMonitor(monitor)
    ctl = ExpertBiasController(rate=0.25)  # a binary fraction: every bias value is exact in float32
    ctl.setup(model, fake)

    def windows(counts: list[float], n: int, start: int) -> list[tuple[int, str, float]]:
        out = []
        for step in range(start, start + n):  # one optimizer step per window
            fake.counts_LE.zero_()
            fake.counts_LE[0] = torch.tensor(counts, dtype=torch.float64)
            ctl.on_train_step(fake, step)
            out += [(e.step, e.layer, e.value) for e in ctl.on_window(window(step), [])]
        return out

    # Expert 0 overloaded, expert 1 idle: the range grows by 2 * 0.25 per step, 0.5 after window 1, and doubles
    # at windows 2, 4, 8, 16, 32, 64. Layer 1 sees no tokens: one event (range 0) and silence.
    growing = windows([10.0, 0.0, 5.0, 5.0], 64, start=1)
    assert [(step, value) for step, layer, value in growing if layer == LAYER0] == [
        (w, 0.5 * w) for w in (1, 2, 4, 8, 16, 32, 64)
    ]
    assert [(step, value) for step, layer, value in growing if layer == LAYER1] == [(1, 0.0)]
    # The load flips: the range shrinks by 0.5 per window from 32 and is reported once it has halved (16).
    shrinking = windows([0.0, 10.0, 5.0, 5.0], 40, start=65)
    assert shrinking == [(65 + 31, LAYER0, 16.0)]
    assert ctl.metrics()[f"controller/bias/{LAYER0}/range"] == 32.0 - 0.5 * 40  # per-window values stay metrics


def test_bias_balances_a_real_router():
    # Wide random gates plus a shared preference for expert 0: an imbalanced but token-dependent routing.
    model, monitor = reference(expert_bias=True, n_experts=8, init_std=0.3)
    _bias_gates(model, experts=(0,), scale=0.2, strength=0.5)
    ctl = ExpertBiasController(rate=0.01)
    ctl.setup(model, monitor)
    tokens = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    vio = []
    for step in range(1, 61):
        model(tokens)
        ctl.on_train_step(monitor, step)
        snapshot = monitor.collect(step)
        ctl.on_window(snapshot, [])
        vio.append(float(snapshot.stats["max_violation"][0]))
    assert vio[0] > 0.9
    assert max(vio[-10:]) < 0.25


def test_bias_on_deepseek_v3_router():
    transformers = pytest.importorskip("transformers")
    config = transformers.DeepseekV3Config(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        moe_intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=0,
        q_lora_rank=None,
        kv_lora_rank=8,
        qk_rope_head_dim=4,
        qk_nope_head_dim=4,
        v_head_dim=4,
    )
    model = transformers.DeepseekV3ForCausalLM(config)
    monitor = RouterMonitor(model)
    ctl = ExpertBiasController()
    ctl.setup(model, monitor)
    model(torch.randint(0, 64, (2, 8)))
    ctl.on_train_step(monitor, 1)
    bias = model.model.layers[0].mlp.gate.e_score_correction_bias
    counts = monitor.window_counts()[0].tolist()
    assert bias.tolist() == pytest.approx(expected_bias([counts], 1e-3), abs=1e-8)
    with pytest.raises(ValueError, match="jitter_noise"):
        RouterNoiseController().setup(model, monitor)


# ------------------------------------------------------------------------------------------ setup errors
def test_missing_knobs_fail_at_setup_with_a_clear_message():
    model, monitor = reference()
    with pytest.raises(ValueError, match=r"MoEConfig\(expert_bias=True\).*e_score_correction_bias"):
        ExpertBiasController().setup(model, monitor)
    # MoEConfig refuses expert_bias with expert choice; a model that has both anyway (built otherwise) is refused
    # by the controller.
    model, monitor = reference(expert_bias=True)
    for router in model.routers:
        router.kind = "expert_choice"
    with pytest.raises(ValueError, match="expert-choice"):
        ExpertBiasController().setup(model, monitor)
    plain = nn.Sequential(nn.Linear(8, 4, bias=False))
    plain_monitor = RouterMonitor(plain, routers=[RouterSpec(name="0", top_k=2)])
    with pytest.raises(ValueError, match=r"aux_loss_coef.*router_aux_loss_coef.*Mixtral"):
        AuxLossController().setup(plain, plain_monitor)
    with pytest.raises(ValueError, match=r"layer '0'.*noise_std.*jitter_noise"):
        RouterNoiseController().setup(plain, plain_monitor)
    with pytest.raises(ValueError, match="layer '0'.*expert_bias"):
        ExpertBiasController().setup(plain, plain_monitor)


# ------------------------------------------------------------------------------------------ state
def drive(ctl, model, monitor, windows) -> list[tuple]:
    trace = []
    for step, events in windows:
        model(torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(step)))
        ctl.on_train_step(monitor, step)
        snap = monitor.collect(step)
        trace += [(e.step, e.layer, e.rule, e.value) for e in ctl.on_window(snap, events)]
    return trace


WINDOWS = [(1, [alert(LAYER0)]), (2, [alert(LAYER1, "dead_experts")]), (3, []), (4, [alert(LAYER0, kind="recovery")])]
LATER = [(5, []), (6, [alert(LAYER1, "dead_experts", kind="recovery")]), (7, []), (8, []), (9, [])]


@pytest.mark.parametrize("make", [AuxLossController, RouterNoiseController, ExpertBiasController])
@pytest.mark.parametrize("load_before_setup", [False, True])
def test_state_round_trip_restores_knobs_and_later_decisions(make, load_before_setup):
    def fresh():
        torch.manual_seed(0)
        model, monitor = reference(expert_bias=True)
        return model, monitor, make(hold=1) if make is not ExpertBiasController else make(rate=0.01)

    model, monitor, ctl = fresh()
    ctl.setup(model, monitor)
    drive(ctl, model, monitor, WINDOWS)
    state = roundtrip(ctl.state_dict())
    knobs = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("expert_bias")}
    attrs = [(r.aux_loss_coef, r.noise, r.noise_std) for r in model.routers]
    reference_trace = drive(ctl, model, monitor, LATER)

    model2, monitor2, ctl2 = fresh()
    if load_before_setup:
        ctl2.load_state_dict(state)
        ctl2.setup(model2, monitor2)
    else:
        ctl2.setup(model2, monitor2)
        ctl2.load_state_dict(state)
    assert [(r.aux_loss_coef, r.noise, r.noise_std) for r in model2.routers] == attrs
    for name, value in knobs.items():
        assert torch.equal(model2.state_dict()[name], value), name
    assert drive(ctl2, model2, monitor2, LATER) == reference_trace
    assert ctl2.metrics() == ctl.metrics()


def test_make_controllers_parses_cli_lists():
    assert [type(c) for c in make_controllers("aux, noise,bias")] == [
        AuxLossController,
        RouterNoiseController,
        ExpertBiasController,
    ]
    assert make_controllers("") == [] and make_controllers(None) == [] and make_controllers("none") == []


def test_bias_controller_triggers_are_deprecated_and_messages_speak_library_arguments():
    with pytest.warns(FutureWarning, match=r"triggers=.*ignored.*Drop the argument"):
        ExpertBiasController(triggers=("load_entropy",))
    model, monitor = reference(expert_bias=True)
    for router in model.routers:
        router.kind = "expert_choice"
    with pytest.raises(ValueError, match="expert-choice") as expert_choice:
        ExpertBiasController().setup(model, monitor)
    plain = nn.Sequential(nn.Linear(8, 4, bias=False))
    with pytest.raises(ValueError, match="noise") as no_noise:
        RouterNoiseController().setup(plain, RouterMonitor(plain, routers=[RouterSpec(name="0", top_k=2)]))
    assert "--" not in str(expert_choice.value) + str(no_noise.value)
