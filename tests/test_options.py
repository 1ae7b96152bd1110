"""The shared options: one check, the same verdict and message in every front end's own error type."""

from __future__ import annotations

from typing import Any

import pytest
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from moe_monitor import CollapseDetector, MoEMonitor, Watcher
from moe_monitor.controllers import AuxLossController
from moe_monitor.options import TrainerOptions, WatchOptions
from moe_monitor.reference import MoEConfig, MoETransformer

BAD = [
    ({"log_histograms": "yes"}, "log_histograms='yes' is not valid; choose True or False."),
    ({"stop_on_collapse": 1}, "stop_on_collapse=1 is not valid; choose True or False."),
    ({"detector": "strict"}, "detector='strict' is not valid"),
    ({"controllers": [AuxLossController(), AuxLossController()]}, "controllers have repeated names"),
    ({"on_alert": "print"}, "on_alert='print' is not valid; choose None or a callable(event)."),
    ({"routers": "blocks.0.moe.router"}, "routers='blocks.0.moe.router' is not valid"),
    ({"name": ""}, "name='' is not valid"),
    ({"console": "loud"}, "console='loud' is not valid"),
    ({"sinks": [3]}, "sinks contains 3, which no sink knows"),
]


def _model() -> MoETransformer:
    return MoETransformer(MoEConfig(d_model=16, n_layers=1, n_heads=2, n_experts=4, top_k=2, d_expert=16))


@pytest.mark.parametrize(("kwargs", "message"), BAD)
def test_every_front_end_refuses_the_same_arguments_with_the_same_message(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as plain:
        Watcher(_model(), **kwargs)
    with pytest.raises(MisconfigurationException) as lightning:
        MoEMonitor(**kwargs)
    assert message in str(plain.value)
    assert str(plain.value).replace("Watcher", "MoEMonitor") == str(lightning.value)  # messages name their owner


def test_log_every_is_checked_under_each_front_ends_own_name() -> None:
    with pytest.raises(ValueError, match=r"^log_every=0 is not valid; choose a positive integer\.$"):
        Watcher(_model(), log_every=0)
    with pytest.raises(MisconfigurationException, match=r"log_every_n_steps=0 .* None \(the trainer's log_every_n"):
        MoEMonitor(log_every_n_steps=0)
    with pytest.raises(ValueError, match="positive integer"):
        Watcher(_model(), log_every=None)  # only a trainer has an interval of its own


def test_defaults_and_normalisation() -> None:
    options = TrainerOptions.check({"controllers": iter([AuxLossController()])}, owner="MoEMonitor")
    assert isinstance(options.detector, CollapseDetector) and options.detector is not CollapseDetector()
    assert [type(c) for c in options.controllers] == [AuxLossController]  # an iterator becomes a tuple, read once
    assert (options.log_every, options.sinks, options.save_frames) == (None, None, True)
    assert (WatchOptions().log_every, WatchOptions().sinks) == (50, ())
    # The Watcher gets every shared option and nothing of the callback's own.
    arguments = options.watcher_arguments(log_every=7)
    assert arguments["log_every"] == 7 and "save_frames" not in arguments
    assert set(arguments) == {"log_every", "detector", "controllers", "sinks", "routers", "name", "log_expert_loads",
                              "log_histograms", "log_heatmaps", "on_alert", "stop_on_collapse", "console",
                              "process_group"}  # fmt: skip


def test_a_callback_shows_its_options() -> None:
    detector = CollapseDetector(patience=1)
    monitor = MoEMonitor(name="fast", detector=detector, log_every_n_steps=5)
    assert (monitor.name, monitor.detector, monitor.controllers, monitor.options.log_every) == ("fast", detector, (), 5)
