"""The examples run as a user would run them, and produce what they claim."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    if str(EXAMPLES) not in sys.path:  # as when run as a script: the examples' own folder is importable
        sys.path.insert(0, str(EXAMPLES))
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
def test_huggingface_example_leaves_padding_out(monkeypatch):
    transformers = pytest.importorskip("transformers")
    forward = transformers.MixtralForCausalLM.forward
    recorded = []

    def recording_forward(self, *args, attention_mask=None, **kwargs):
        """Keeps each forward's attention mask and the router logits the model itself returns."""
        out = forward(self, *args, attention_mask=attention_mask, **kwargs)
        recorded.append((attention_mask.reshape(-1).bool(), [logits.detach() for logits in out.router_logits]))
        return out

    monkeypatch.setattr(transformers.MixtralForCausalLM, "forward", recording_forward)
    frame = _load("huggingface_mixtral").main(["--steps", "2"]).sort_values("layer_index")
    # 2 steps x 4 sequences x 24 real tokens (8 of 32 positions are padding).
    assert list(frame["tokens"]) == [2 * 4 * 24] * 2
    for layer, row in enumerate(frame.itertuples()):
        # The window's statistics recomputed from the returned logits of the real tokens only (Mixtral routes
        # top-2 of the softmax), and, for contrast, of every position.
        for keep, must_match in (("real", True), ("all", False)):
            logits_TE = torch.cat([logits[layer][mask if keep == "real" else slice(None)] for mask, logits in recorded])
            probs_TE = logits_TE.double().softmax(dim=-1)
            count_E = torch.zeros(8, dtype=torch.float64).index_add_(
                0, logits_TE.topk(2, dim=-1).indices.reshape(-1), torch.ones(2 * len(logits_TE), dtype=torch.float64)
            )
            tokens = len(logits_TE)
            aux = 8 * float((count_E / tokens * probs_TE.sum(dim=0) / tokens).sum())
            max_violation = float(count_E.max() / count_E.mean() - 1)
            matches = row.aux_loss == pytest.approx(aux, rel=1e-5)
            assert matches == must_match, (keep, row.aux_loss, aux)
            if must_match:
                assert row.max_violation == pytest.approx(max_violation, rel=1e-9)
                assert row.z_loss == pytest.approx(
                    float(logits_TE.double().logsumexp(dim=-1).square().mean()), rel=1e-5
                )
