"""Controllers on a family's knobs (``layer.meta["knobs"]``): torchtitan's expert bias, after a dtype move."""

from __future__ import annotations

import pytest
import torch

from moe_monitor import RouterMonitor
from moe_monitor.controllers import AuxLossController, ExpertBiasController
from tests.detect.detect_toys import expected_bias

pytest.importorskip("torchtitan.models.common.moe")
from tests.families.test_torchtitan import D, Stack  # noqa: E402


@pytest.mark.filterwarnings("ignore:In CPU autocast")
def test_bias_controller_steers_torchtitans_buffer_after_a_dtype_move_by_its_own_counts():
    model = Stack()
    monitor = RouterMonitor(model)
    ctl = ExpertBiasController(rate=1e-2)
    ctl.setup(model, monitor)
    model.double()  # replaces expert_bias_E (and tokens_per_expert_E) with new tensors
    steps: list[list[list[float]]] = []
    generator = torch.Generator().manual_seed(0)
    for step in range(1, 6):
        before = [layer.tokens_per_expert_E.clone() for layer in model.layers]
        model(torch.randn(2, 8, D, generator=generator, dtype=torch.float64))
        steps.append([(layer.tokens_per_expert_E - b).tolist() for layer, b in zip(model.layers, before)])
        ctl.on_train_step(monitor, step)
    for i, layer in enumerate(model.layers):
        want = expected_bias([s[i] for s in steps], 1e-2)  # from torchtitan's own counter, not the monitor's
        assert layer.expert_bias_E.dtype == torch.float64 and max(map(abs, want)) > 0
        assert layer.expert_bias_E.tolist() == pytest.approx(want, abs=1e-12)
    with pytest.raises(ValueError, match="aux-loss coefficient"):
        AuxLossController().setup(model, monitor)  # torchtitan balances with the bias, it has no aux weight knob


def test_megatron_routers_sharing_one_config_are_one_aux_knob():
    pytest.importorskip("megatron.core.transformer.moe.router")
    from moe_monitor.detect import CollapseEvent, make_snapshot
    from tests.families.test_megatron import _model

    model = _model(moe_aux_loss_coeff=0.01)
    model["layers"][1].config = model["layers"][0].config  # as in Megatron-Core: one TransformerConfig per model
    monitor = RouterMonitor(model)
    ctl = AuxLossController()
    ctl.setup(model, monitor)
    alert = CollapseEvent(1, "train", "layers.1", "load_entropy", 0.2, 0.6, "critical", "m")
    (event,) = ctl.on_window(make_snapshot([[5] * 8, [5] * 8], step=1, layer_names=["layers.0", "layers.1"]), [alert])
    assert (event.layer, event.value) == ("all", 0.02)  # grown once, not once per layer that reads it
    assert model["layers"][0].config.moe_aux_loss_coeff == 0.02
    with pytest.raises(ValueError, match="already turned"):
        AuxLossController().setup(model, RouterMonitor(model))
