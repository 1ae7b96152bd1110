"""Scenarios on real training runs: each collapse is detected in time, healthy runs stay quiet, controllers repair.

Every run trains the reference model on the bundled corpus on one CPU thread (``MICRO`` size, about 0.5 s per
100 steps), with a monitoring window of 10 steps.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
from detect_toys import MICRO

from moe_monitor.controllers import AuxLossController, Controller, ExpertBiasController, RouterNoiseController
from moe_monitor.detect import CollapseDetector, CollapseEvent
from moe_monitor.scenarios import SCENARIOS, Scenario, run

LOG_EVERY = 10
# Patience is 3 windows; the collapses below are in place within the first one or two windows.
DETECTION_BOUND_WINDOWS = 6


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_scenario_is_detected_within_a_bounded_number_of_windows(name):
    scenario = SCENARIOS[name]
    result = run(name, steps=100, seed=0, log_every=LOG_EVERY, **MICRO)
    window = result.first_alert_window(scenario.expected_rules, LOG_EVERY)
    assert window is not None, f"{name}: no {scenario.expected_rules} alert; got {[e.rule for e in result.alerts()]}"
    assert CollapseDetector().patience <= window <= DETECTION_BOUND_WINDOWS
    alert = next(e for e in result.alerts() if e.rule in scenario.expected_rules)
    assert alert.layer.startswith("blocks.") and "Try" in alert.message


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_healthy_default_runs_raise_no_alert(seed):
    result = run(None, steps=200, seed=seed, log_every=LOG_EVERY, **MICRO)
    assert [e.message for e in result.events if e.kind == "alert"] == []
    assert result.val_loss < 3.2  # it did learn (a uniform byte guess is ln 256 = 5.5)


def test_healthy_run_stays_quiet_with_one_window_less_patience():
    # The imbalance thresholds, not patience alone, keep healthy runs quiet. Seed 0 held MaxVio above 2.0 (the
    # former fixed threshold, 2/3 of its range for top-2 of 8) for two windows in a row early in training; the
    # default 0.8 of the range (2.4) leaves margin. (One expert of this 32-wide model also idles for exactly two
    # windows; the dead-expert rule keeps its patience of 3.)
    detector = CollapseDetector(patience=2, dead_expert_p=None)
    result = run(None, steps=200, seed=0, log_every=LOG_EVERY, detector=detector, **MICRO)
    assert [e.message for e in result.events if e.kind == "alert"] == []


def test_aux_controller_restores_load_entropy_on_biased_init():
    without = run("biased_init", steps=200, **MICRO)
    with_aux = run("biased_init", steps=200, controllers=[AuxLossController()], **MICRO)
    assert without.pooled("load_entropy") < 0.5
    assert with_aux.pooled("load_entropy") > without.pooled("load_entropy") + 0.4
    coefs = [e.value for e in with_aux.events if e.rule == "aux_loss_coef"]
    assert coefs and max(coefs) == pytest.approx(0.1)  # grew to the cap


def test_noise_controller_revives_unreachable_experts():
    dead_without = dead_with = 0.0
    for seed in (0, 1):
        dead_without += run("unreachable_experts", steps=300, seed=seed, **MICRO).final("dead_experts", 5)
        dead_with += run(
            "unreachable_experts", steps=300, seed=seed, controllers=[RouterNoiseController()], **MICRO
        ).final("dead_experts", 5)
    # Dead experts per layer in the last 5 windows, summed over two seeds.
    assert dead_without >= 3.0
    assert dead_with <= dead_without - 2.0


def test_bias_controller_cuts_max_violation_without_aux_loss():
    # The default rate 1e-3 is tuned for runs of many thousands of steps; a 300-step run needs a faster one.
    without = run("no_aux_high_lr", steps=300, **MICRO)
    with_bias = run("no_aux_high_lr", steps=300, controllers=[ExpertBiasController(rate=1e-2)], **MICRO)
    assert without.pooled("max_violation") > 2.0
    assert with_bias.pooled("max_violation") < without.pooled("max_violation") - 1.5


def test_bias_controller_default_rate_helps_biased_init():
    without = run("biased_init", steps=300, **MICRO)
    with_bias = run("biased_init", steps=300, controllers=["bias"], **MICRO)
    assert with_bias.pooled("max_violation") < without.pooled("max_violation") - 0.5
    assert with_bias.pooled("load_entropy") > without.pooled("load_entropy") + 0.3


def test_unknown_scenario_lists_the_known_ones():
    with pytest.raises(ValueError, match="biased_init, unreachable_experts, no_aux_high_lr, low_capacity"):
        run("nope")


def test_scenario_prepare_accepts_the_lightning_module():
    from moe_monitor.reference import ReferenceLM

    lm = ReferenceLM(SCENARIOS["biased_init"].config("tiny", **MICRO))
    before = lm.model.blocks[0].moe.router.gate.weight.clone()
    SCENARIOS["biased_init"].prepare(lm)
    changed = (lm.model.blocks[0].moe.router.gate.weight - before).abs().sum(dim=1) > 0
    assert changed.tolist() == [True, True] + [False] * 6
    assert isinstance(SCENARIOS["biased_init"], Scenario)


class KnobProbe(pl.Callback):
    """Reads the routers' aux-loss coefficients when training starts, i.e. after a checkpoint was restored."""

    def __init__(self) -> None:
        self.coefs: list[float] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.coefs = [router.aux_loss_coef for router in pl_module.model.routers]


@pytest.mark.slow
def test_lightning_callback_detects_repairs_and_resumes_the_controller(tmp_path):
    from moe_monitor.callback import MoEMonitor
    from moe_monitor.reference import CorpusDataModule, ReferenceLM

    scenario = SCENARIOS["biased_init"]

    def fit(max_steps: int, ckpt_path=None):
        pl.seed_everything(0, verbose=False)
        lm = ReferenceLM(scenario.config("tiny", **MICRO), lr=3e-3, warmup_steps=5, max_steps=200)
        scenario.prepare(lm)
        callback = MoEMonitor(log_every_n_steps=LOG_EVERY, controllers=[AuxLossController()], save_frames=False)
        probe = KnobProbe()
        trainer = pl.Trainer(
            max_steps=max_steps,
            callbacks=[callback, probe],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            accelerator="cpu",
            devices=1,
            default_root_dir=tmp_path,
        )
        data = CorpusDataModule(seq_len=MICRO["seq_len"], batch_size=8, train_samples=8 * 200, val_per_domain=4)
        trainer.fit(lm, datamodule=data, ckpt_path=ckpt_path)
        return trainer, lm, callback, probe

    trainer, lm, callback, _ = fit(60)
    alerts = [e for e in callback.events if e.kind == "alert" and e.rule in scenario.expected_rules]
    assert alerts and alerts[0].step <= DETECTION_BOUND_WINDOWS * LOG_EVERY
    controls = [e for e in callback.events if e.kind == "control"]
    assert controls and controls[0].step == alerts[0].step
    coefs = [router.aux_loss_coef for router in lm.model.routers]
    assert max(coefs) > 0.0
    trainer.save_checkpoint(tmp_path / "mid.ckpt")

    _, resumed_lm, resumed, probe = fit(61, ckpt_path=tmp_path / "mid.ckpt")
    assert probe.coefs == coefs  # re-applied from the checkpoint, not the config's 0.0
    # The detector's history and firing alerts came back too.
    assert resumed.detector.events[: len(callback.detector.events)] == callback.detector.events
    assert resumed.detector.active >= {(e.layer, e.rule) for e in alerts} & callback.detector.active


def test_controllers_compose():
    result = run("biased_init", steps=60, controllers="aux,noise,bias", **MICRO)
    changed = {e.rule for e in result.events if e.kind == "control"}
    assert changed == {"aux_loss_coef", "router_noise", "expert_bias"}
    metrics = {k for c in result.controllers for k in c.metrics()}
    assert {"controller/aux_loss/max_coef", "controller/noise/max_std", "controller/bias/updates"} <= metrics


class Recorder(Controller):
    """A controller with no knob: emits one control event per window and records the events it is shown."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[list[str]] = []

    def _bind(self, model, monitor) -> None:
        pass

    def on_window(self, snapshot, events):
        self.seen.append([e.kind for e in events])
        return [CollapseEvent(snapshot.step, "train", "all", "probe", 1.0, 0.0, "info", "probe", (), "control")]


def test_each_controller_sees_only_the_detector_events_as_in_the_callback():
    first, second = Recorder(), Recorder()
    result = run("biased_init", steps=40, log_every=LOG_EVERY, controllers=[first, second], **MICRO)
    assert first.seen == second.seen and len(second.seen) == 4
    assert all(kinds == ["alert"] * len(kinds) for kinds in second.seen)  # no "control" from the first one
    assert [e.kind for e in result.events].count("control") == 8
