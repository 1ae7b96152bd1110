"""Reading the monitor's TensorBoard event files back with TensorBoard's own reader."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moe_monitor.sinks.tensorboard import LAYER_RUNS


def main_run(root: Path, pattern: str = "**/events.out.tfevents.*") -> Path:
    """The one folder under ``root`` of the trainer's own run (each layer's run ``layers/<LL>`` left aside)."""
    (folder,) = {p.parent for p in root.glob(pattern) if LAYER_RUNS not in p.relative_to(root).parts[:-1]}
    return folder


def accumulate(folder: Path) -> Any:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0, "images": 0})
    accumulator.Reload()
    return accumulator


def expert_load(accumulator: Any, tag: str) -> list[tuple[int, list[float]]]:
    """``(step, count of each expert)`` of every window of an expert-load histogram (one bucket per expert)."""
    from tensorboard.util import tensor_util

    return [
        (event.step, [bucket[2] for bucket in tensor_util.make_ndarray(event.tensor_proto).tolist()])
        for event in accumulator.Tensors(tag)
    ]
