"""Controllers' knobs after Lightning's own device moves and conversions: real Trainer runs, on CUDA and on the CPU.

The model is built on the CPU; Lightning calls the callback's ``setup`` (where the controllers bind their knobs)
before the strategy moves the module to the GPU and the precision plugin converts it, and ``Module._apply`` replaces
every buffer there. After the run, the router's own buffer on the device must equal what the controller says it set
and a plain-loop replica of the updates, and the monitor's counts must equal the routers' own choices.

Every test runs on the CPU too (same body, ``accelerator="cpu"``), so nothing in it runs for the first time on the
GPU machine; the CUDA cases (``accelerator="gpu"``, 32-bit and ``bf16-true``, and Lightning's ``FSDPStrategy`` on
one GPU, which refuses the CPU accelerator) skip without one.
"""

from __future__ import annotations

import pytest
import torch

from moe_monitor import CollapseDetector, MoEMonitor
from moe_monitor.controllers import AuxLossController, ExpertBiasController
from tests.callback.conftest import make_data, make_lm, make_trainer, routers_of
from tests.callback.test_precision import SelectionLog
from tests.detect.detect_toys import expected_bias

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
STEPS, RATE = 6, 5e-2
BIAS_CASES = [
    pytest.param("cpu", "32-true", "auto", id="cpu-32"),
    pytest.param("cpu", "bf16-true", "auto", id="cpu-bf16-true"),
    pytest.param("gpu", "32-true", "auto", id="cuda-32", marks=needs_cuda),
    pytest.param("gpu", "bf16-true", "auto", id="cuda-bf16-true", marks=needs_cuda),
    pytest.param("gpu", "32-true", "fsdp", id="cuda-fsdp", marks=needs_cuda),
]
# bf16 has 8 significant bits: each add and mean-centring rounds a bias of |b| < 0.125 by at most 2.5e-4.
TOLERANCE = {"32-true": 1e-6, "bf16-true": 1.5e-3}
DTYPE = {"32-true": torch.float32, "bf16-true": torch.bfloat16}


def _strategy(name: str):
    if name != "fsdp":
        return name
    from lightning.pytorch.strategies import FSDPStrategy

    from moe_monitor.reference.model import Block

    # One FSDP unit per transformer block (each block's router gate is flattened into that unit's shard).
    return FSDPStrategy(auto_wrap_policy={Block}, process_group_backend="nccl")


class StepLog(SelectionLog):
    """The routers' own choices, counted per optimizer step (the bias update's input) and in total."""

    def __init__(self, routers: list[torch.nn.Module]) -> None:
        super().__init__(routers)
        self.steps: list[list[list[int]]] = []  # [step][layer][expert]
        self._before = [c.clone() for c in self.counts]

    def end_step(self) -> None:
        self.steps.append([(now - before).tolist() for now, before in zip(self.counts, self._before)])
        self._before = [c.clone() for c in self.counts]


def _fit(tmp_path, lm, controllers, accelerator: str, precision: str, strategy: str = "auto", **monitor_options):
    import lightning.pytorch as pl

    log = StepLog(routers_of(lm))

    class EndStep(pl.Callback):
        def on_train_batch_end(self, *args) -> None:
            log.end_step()

    callback = MoEMonitor(controllers=controllers, log_every_n_steps=3, **monitor_options)
    trainer = make_trainer(
        tmp_path, [EndStep(), callback], accelerator=accelerator, precision=precision, strategy=_strategy(strategy),
        max_steps=STEPS, limit_val_batches=0,
    )  # fmt: skip
    try:
        trainer.fit(lm, datamodule=make_data())
    finally:
        # FSDPStrategy leaves its (nccl) process group to the interpreter's exit: later tests in this process would
        # otherwise reduce their CPU tensors over it.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return callback, log


def _assert_counts_are_the_routers_choices(callback: MoEMonitor, log: StepLog) -> None:
    frame = callback.expert_frame()
    train = frame[frame.phase == "train"]
    for index, expected_E in enumerate(log.counts):
        assert train[train.layer_index == index].groupby("expert")["count"].sum().tolist() == expected_E.tolist()
    assert all(int(c.sum()) == STEPS * 4 * 8 * 2 for c in log.counts)  # steps x batch 4 x 8 tokens x top-2


@pytest.mark.filterwarnings("ignore:.*no logger")
@pytest.mark.parametrize("accelerator, precision, strategy", BIAS_CASES)
def test_bias_controller_steers_the_buffer_lightning_moved(tmp_path, accelerator, precision, strategy):
    lm = make_lm(seed=0, expert_bias=True)
    assert all(r.expert_bias.device.type == "cpu" for r in routers_of(lm))  # built on the CPU
    controller = ExpertBiasController(rate=RATE)
    callback, log = _fit(tmp_path, lm, [controller], accelerator, precision, strategy)
    assert len(log.steps) == STEPS
    device_type = "cuda" if accelerator == "gpu" else "cpu"
    claimed = controller.state_dict()["bias"]
    metrics = controller.metrics()
    for i, router in enumerate(routers_of(lm)):
        bias_E = router.expert_bias
        assert (bias_E.device.type, bias_E.dtype) == (device_type, DTYPE[precision])  # moved and converted
        want = expected_bias([step[i] for step in log.steps], RATE)
        assert max(map(abs, want)) > 0.02  # the updates are far larger than the bf16 tolerance
        assert bias_E.float().tolist() == pytest.approx(want, abs=TOLERANCE[precision])
        label = f"model.blocks.{i}.moe.router"
        assert torch.equal(claimed[label], bias_E.cpu())  # what the controller says it set is on the router
        assert metrics[f"controller/bias/{label}/max_abs"] == pytest.approx(float(bias_E.abs().max()), abs=1e-9)
    assert metrics["controller/bias/active_knobs"] == 2.0
    assert not [e for e in callback.events if e.rule == "knob_lost"]
    _assert_counts_are_the_routers_choices(callback, log)


@pytest.mark.filterwarnings("ignore:.*no logger")
@pytest.mark.parametrize(
    "accelerator, precision",
    [
        pytest.param("cpu", "32-true", id="cpu-32"),
        pytest.param("cpu", "bf16-true", id="cpu-bf16-true"),
        pytest.param("gpu", "bf16-true", id="cuda-bf16-true", marks=needs_cuda),
    ],
)
def test_aux_controller_coefficient_reaches_the_moved_router(tmp_path, accelerator, precision):
    lm = make_lm(seed=0)
    for router in routers_of(lm):
        # All logits tie: top-2 always picks the same two experts, a collapse the detector alerts on, that the
        # growing coefficient cannot cure (the gate is frozen), so the controller acts at every window.
        with torch.no_grad():
            router.gate.weight.zero_()
        router.gate.weight.requires_grad_(False)
    controller = AuxLossController(growth=2.0)
    callback, log = _fit(tmp_path, lm, [controller], accelerator, precision, detector=CollapseDetector(patience=1))
    changes = [(e.layer, e.step, e.value) for e in callback.events if e.rule == "aux_loss_coef"]
    assert sorted(changes) == [(f"model.blocks.{i}.moe.router", step, coef) for i in (0, 1) for step, coef in
                               ((3, 0.02), (6, 0.04))]  # fmt: skip
    metrics = controller.metrics()
    _assert_counts_are_the_routers_choices(callback, log)
    device = torch.device("cuda" if accelerator == "gpu" else "cpu")
    tokens_BS = torch.randint(0, 256, (2, 8), device=device)
    outputs = []
    handles = [r.register_forward_hook(lambda m, a, out: outputs.append(out)) for r in routers_of(lm)]
    lm.model.train()  # the aux loss is computed in training mode only
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        lm.model(tokens_BS)
    for handle in handles:
        handle.remove()
    for i, (router, out) in enumerate(zip(routers_of(lm), outputs)):
        coef = metrics[f"controller/aux_loss/model.blocks.{i}.moe.router/coef"]
        assert router.aux_loss_coef == coef == 0.04  # the coefficient the controller set is the one the router reads
        assert router.gate.weight.device.type == device.type
        # Uniform probabilities (1/E) and every token's 2 choices counted: E * sum_e (count_e / T) / E = top_k.
        assert out.aux_loss.item() == pytest.approx(coef * 2, rel=1e-6)


def test_bias_controller_follows_its_knob_through_fsdp_wrapping_on_the_cpu():
    """The CPU side of the ``cuda-fsdp`` case: Lightning's ``FSDPStrategy`` wraps the module with torch's
    ``FullyShardedDataParallel`` (FSDP1) after the callback's setup; that wrapping runs on the CPU with gloo.

    (Lightning itself cannot run it here: it refuses the CPU accelerator for ``FSDPStrategy``, and its FSDP code
    passes ``device_id=None`` on the CPU, which torch's FSDP refuses without an accelerator.)"""
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from moe_monitor import RouterMonitor
    from moe_monitor.reference import MoEConfig, MoETransformer
    from moe_monitor.reference.model import Block
    from tests.ports import free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        root = torch.nn.Module()
        config = MoEConfig(d_model=32, n_layers=2, n_heads=2, seq_len=16, n_experts=4, d_expert=16, expert_bias=True)
        root.model = MoETransformer(config)
        routers = [block.moe.router for block in root.model.blocks]
        log = StepLog(routers)
        monitor = RouterMonitor(root)
        controller = ExpertBiasController(rate=RATE)
        controller.setup(root, monitor)  # before the wrapping, as Lightning orders it
        root.model = FullyShardedDataParallel(
            root.model, auto_wrap_policy=ModuleWrapPolicy({Block}), device_id=torch.device("cpu")
        )
        assert type(root.model.blocks[0]).__name__ == "FullyShardedDataParallel"  # the knob's path crosses it
        generator = torch.Generator().manual_seed(1)
        for step in range(1, STEPS + 1):
            out = root.model(torch.randint(0, config.vocab_size, (2, 16), generator=generator))
            (out.logits.float().square().mean() + out.aux_loss).backward()
            log.end_step()
            controller.on_train_step(monitor, step)
        snapshot = monitor.collect(STEPS)
        assert snapshot.counts.tolist() == [c.tolist() for c in log.counts]
        for i, router in enumerate(routers):
            want = expected_bias([step[i] for step in log.steps], RATE)
            assert max(map(abs, want)) > 0.02
            assert root.get_submodule(f"model.blocks.{i}.moe.router") is router
            assert router.expert_bias.tolist() == pytest.approx(want, abs=1e-6)
        assert controller.metrics()["controller/bias/active_knobs"] == 2.0
    finally:
        dist.destroy_process_group()
