"""History as pandas frames, save() round-trip, state_dict() round-trip."""

from __future__ import annotations

import math
import pickle

import pandas as pd
import pytest
import torch
from monitor_toys import ToyModel

from moe_monitor import RouterMonitor

SPEC_LAYER_COLUMNS = (
    "step, phase, layer, num_experts, top_k, tokens, assignments, dropped, dropped_fraction, load_entropy, "
    "max_violation, cv, gini, dead_experts, aux_loss, z_loss, router_entropy, top1_confidence"
).split(", ")
SPEC_EXPERT_COLUMNS = ["step", "phase", "layer", "expert", "count", "load"]


@pytest.fixture
def monitor():
    torch.manual_seed(0)
    model = ToyModel(num_experts=4, top_k=2)
    monitor = RouterMonitor(model, routers=model.router_names)
    for step in (10, 20):
        model(torch.randn(2, 3, 8))
        monitor.collect(step)
    model.eval()
    model(torch.randn(1, 3, 8))
    monitor.collect(20, "val")
    monitor.collect(30)  # empty window
    return monitor


def test_layer_frame_has_every_spec_column_and_one_row_per_collect_and_layer(monitor):
    frame = monitor.layer_frame()
    assert set(SPEC_LAYER_COLUMNS + ["nonfinite_tokens", "counterfactual_drop@1.0", "counterfactual_drop@1.25"]) <= set(
        frame.columns
    )
    assert len(frame) == 4 * 2
    assert frame["step"].tolist() == [10, 10, 20, 20, 20, 20, 30, 30]
    assert frame["phase"].tolist() == ["train"] * 4 + ["val"] * 2 + ["train"] * 2
    assert frame["layer_index"].tolist() == [0, 1] * 4
    assert frame["layer"].tolist()[:2] == ["blocks.0.router", "blocks.1.router"]
    assert frame["tokens"].tolist() == [6, 6, 6, 6, 3, 3, 0, 0]
    assert frame["assignments"].tolist() == [12, 12, 12, 12, 6, 6, 0, 0]
    assert math.isnan(frame["load_entropy"].iloc[-1])


def test_expert_frame_counts_and_loads(monitor):
    frame = monitor.expert_frame()
    assert list(frame.columns)[:3] == ["step", "phase", "layer"] and set(SPEC_EXPERT_COLUMNS) <= set(frame.columns)
    assert len(frame) == 4 * 2 * 4
    first = frame[(frame.step == 10) & (frame.layer_index == 0)]
    assert first["count"].sum() == 12
    assert first["load"].tolist() == pytest.approx((first["count"] / 12).tolist())
    assert frame[frame.step == 30]["load"].isna().all()


def test_save_round_trip(monitor, tmp_path):
    written = monitor.save(tmp_path / "run")
    assert {p.rsplit("/", 1)[-1] for p in written} >= {"layers.csv", "experts.csv"}
    for stem, frame in (("layers", monitor.layer_frame()), ("experts", monitor.expert_frame())):
        from_csv = pd.read_csv(tmp_path / "run" / f"{stem}.csv")
        pd.testing.assert_frame_equal(from_csv, frame, check_dtype=False)
        if (tmp_path / "run" / f"{stem}.parquet").exists():
            pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "run" / f"{stem}.parquet"), frame)


def test_state_dict_round_trip_is_plain_python(monitor):
    state = pickle.loads(pickle.dumps(monitor.state_dict()))
    torch.manual_seed(0)
    model = ToyModel(num_experts=4, top_k=2)
    restored = RouterMonitor(model, routers=model.router_names)
    restored.load_state_dict(state)
    pd.testing.assert_frame_equal(restored.layer_frame(), monitor.layer_frame())
    pd.testing.assert_frame_equal(restored.expert_frame(), monitor.expert_frame())
    model(torch.randn(1, 2, 8))
    restored.collect(40)
    assert restored.layer_frame()["step"].tolist()[-2:] == [40, 40]


def test_state_of_another_version_says_what_to_do(monitor):
    state = {**monitor.state_dict(), "version": 99}
    expected = r"state version 99: this moe_monitor reads versions 1 and 2.*load it with that release"
    with pytest.raises(ValueError, match=expected):
        monitor.load_state_dict(state)


def test_coactivation_auto_counts_it_only_for_routers_of_at_most_32_experts():
    from monitor_toys import Replay, replay_spec
    from torch import nn

    generator = torch.Generator().manual_seed(0)
    model = nn.ModuleDict({"small": Replay(), "large": Replay()})
    specs = [replay_spec("small", 8, 2), replay_spec("large", 64, 2)]
    for coactivation, expected in (("auto", [True, False]), (True, [True, True]), (False, [False, False])):
        monitor = RouterMonitor(model, routers=specs, coactivation=coactivation)
        shapes = (("small", 8), ("large", 64))
        idx = {name: torch.rand(16, e, generator=generator).topk(2, dim=-1).indices for name, e in shapes}
        for name, e in shapes:
            model[name](torch.zeros(16, e), idx[name])
        snap = monitor.collect(1)
        monitor.remove()
        if not any(expected):
            assert "coactivation" not in snap.extras
            continue
        coact_LEE = snap.extras["coactivation"]
        for layer, (name, e) in enumerate(shapes):
            if not expected[layer]:
                assert coact_LEE[layer].isnan().all()
                continue
            loop = torch.zeros(64, 64, dtype=torch.float64)
            for a, b in idx[name].tolist():
                loop[a, b] += 1
                loop[b, a] += 1
            loop[range(e), range(e)] = torch.bincount(idx[name].reshape(-1), minlength=e).double()[:e]
            assert torch.equal(coact_LEE[layer, :e, :e], loop[:e, :e]), (coactivation, name)
    with pytest.raises(ValueError, match="choose True, False or 'auto'"):
        RouterMonitor(model, routers=specs, coactivation="sometimes")
