"""Megatron-Core under pipeline parallelism: a real ``TransformerBlock`` split over two gloo processes (a real
pipeline group; Megatron itself offsets each stage's ``layer_number``). Every stage holds ``decoder.layers.0`` and
``decoder.layers.1``; the monitor names them by their global layer, so the stages' layers are not summed together.

Built on the CPU (Megatron's router forward needs CUDA: counting is tested in tests/monitor/test_pipeline.py)."""

from __future__ import annotations

import dataclasses
import os
import warnings
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from tests.ports import free_port

pytest.importorskip("megatron.core.transformer.transformer_block")


def _worker(rank: int, world: int, port: int, results) -> None:
    warnings.simplefilter("ignore")  # Megatron's notices about Transformer Engine / Apex being absent
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=30))
    try:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
        from megatron.core.process_groups_config import ProcessGroupCollection
        from megatron.core.transformer.transformer_block import TransformerBlock
        from megatron.core.transformer.transformer_config import TransformerConfig

        from moe_monitor import AuxLossController, RouterMonitor
        from moe_monitor.knobs import layer_knobs

        alone = [dist.new_group([r]) for r in range(world)]  # every process creates every group, in order
        groups = {field.name: alone[rank] for field in dataclasses.fields(ProcessGroupCollection)}
        groups["pp"] = dist.group.WORLD  # the two processes are the two stages of one pipeline
        config = TransformerConfig(
            num_layers=4, hidden_size=16, num_attention_heads=2, num_moe_experts=8, moe_router_topk=2,
            moe_aux_loss_coeff=0.01, use_cpu_initialization=True, add_bias_linear=False,
            pipeline_model_parallel_size=world, pipeline_dtype=torch.float32,
        )  # fmt: skip
        block = TransformerBlock(
            config,
            get_gpt_layer_local_spec(num_experts=8, moe_grouped_gemm=False),
            pg_collection=ProcessGroupCollection(**groups),
            pre_process=rank == 0,
            post_process=rank == world - 1,
        )
        model = nn.ModuleDict({"decoder": block})
        monitor = RouterMonitor(model)
        controller = AuxLossController()
        controller.setup(model, monitor)
        knob = layer_knobs(model, monitor.layers[0]).aux_loss_coef[0]
        results[rank] = {
            "modules": [name for name, module in model.named_modules() if name.endswith(".router")],
            "numbers": [layer.layer_number for layer in block.layers],
            "names": [layer.name for layer in monitor.layers],
            "paths": [layer.path for layer in monitor.layers],
            "layout": monitor.layer_names,
            "pipelined": monitor.pipelined,
            "knob": (knob.label, knob.get(model)),
            "controller": [(k.label, k.layers) for k in controller.knobs],
        }
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_each_stage_names_its_routers_by_the_global_layer_number():
    with mp.get_context("spawn").Manager() as manager:
        results = manager.dict()
        mp.start_processes(_worker, args=(2, free_port(), results), nprocs=2, start_method="spawn")
        results = dict(results)
    local = ["decoder.layers.0.mlp.router", "decoder.layers.1.mlp.router"]
    every = [f"decoder.layers.{i}.mlp.router" for i in range(4)]
    for rank in (0, 1):
        got = results[rank]
        assert got["modules"] == local  # Megatron numbers each stage's layers from 0 ...
        assert got["numbers"] == [2 * rank + 1, 2 * rank + 2]  # ... and gives them their global layer_number
        assert got["names"] == every[2 * rank : 2 * rank + 2] and got["paths"] == local
        assert got["layout"] == every and got["pipelined"]  # both stages' layers, none summed into another
        # Knobs are found where the router is on this stage; the controller serves the layers by their names.
        assert got["knob"] == ("decoder.layers.0.mlp.router.config.moe_aux_loss_coeff", 0.01)
        assert got["controller"] == [("all", tuple(every[2 * rank : 2 * rank + 2]))]
