"""The examples run as a user would run them, and produce what they claim."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_plain_pytorch_example_saves_one_row_per_window_and_layer(tmp_path):
    monitor = _load("plain_pytorch").main(["--steps", "20", "--every", "10", "--out", str(tmp_path)])
    frame = monitor.layer_frame()
    assert sorted(frame["step"].unique()) == [10, 20]
    # 10 steps x 16 sequences x 64 tokens per window, every token routed by every layer.
    assert (frame["tokens"] == 10 * 16 * 64).all()
    assert (tmp_path / "layers.csv").exists() and (tmp_path / "experts.csv").exists()


@pytest.mark.slow
def test_huggingface_example_leaves_padding_out(tmp_path):
    pytest.importorskip("transformers")
    frame = _load("huggingface_mixtral").main(["--steps", "2"])
    # 2 steps x 4 sequences x 24 real tokens (8 of 32 positions are padding).
    assert list(frame["tokens"]) == [2 * 4 * 24] * 2
    assert frame["aux_loss"].between(1.0, 8.0).all()
