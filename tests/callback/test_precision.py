"""Counting in every precision Lightning offers: real Trainer runs of the reference model, counts against a loop."""

from __future__ import annotations

import warnings

import pytest
import torch

from moe_monitor import MoEMonitor
from moe_monitor.monitor import _in_backward
from tests.callback.conftest import make_data, make_lm, make_trainer, routers_of

PRECISIONS = ("32", "16-mixed", "bf16-mixed", "bf16-true", "16-true", "64-true")


class SelectionLog:
    """Every training forward's selected experts per router, straight from the router's output (a plain count)."""

    def __init__(self, routers: list[torch.nn.Module]) -> None:
        self.counts = [torch.zeros(router.n_experts, dtype=torch.int64) for router in routers]
        self.tokens = [0] * len(routers)
        self.nonfinite = [0] * len(routers)
        self.dtypes: set[torch.dtype] = set()
        self.handles = [router.register_forward_hook(self._hook(i)) for i, router in enumerate(routers)]

    def _hook(self, index: int):
        def hook(module, args, output):
            if not module.training or _in_backward():
                return
            self.dtypes.add(output.logits_TE.dtype)
            logits = output.logits_TE.tolist()
            # docs/metrics.md: a token whose logits hold a NaN or +inf is counted apart, in no statistic (fp16
            # weights can overflow within a few steps).
            finite = [all(x == x and x != float("inf") for x in row) for row in logits]
            for token, expert in zip(output.token_idx_A.tolist(), output.expert_idx_A.tolist()):
                if finite[token]:
                    self.counts[index][expert] += 1
            self.tokens[index] += sum(finite)
            self.nonfinite[index] += len(finite) - sum(finite)

        return hook


@pytest.mark.parametrize("precision", PRECISIONS)
def test_every_precision_counts_exactly_what_the_routers_selected(tmp_path, precision):
    lm = make_lm(seed=1)
    log = SelectionLog(routers_of(lm))
    callback = MoEMonitor(log_every_n_steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a layer disabled at the first forward warns: fail on it
        warnings.filterwarnings("ignore", message=".*no logger.*")
        make_trainer(tmp_path, [callback], precision=precision, max_steps=4, limit_val_batches=0).fit(
            lm, datamodule=make_data()
        )
    frame = callback.expert_frame()
    train = frame[frame.phase == "train"]
    for index, expected_E in enumerate(log.counts):
        counted_E = train[train.layer_index == index].groupby("expert")["count"].sum().tolist()
        assert counted_E == expected_E.tolist()
    layers = callback.layer_frame()
    layers = layers[layers.phase == "train"]
    assert layers.groupby("layer_index")["tokens"].sum().tolist() == log.tokens
    assert layers.groupby("layer_index")["nonfinite_tokens"].sum().tolist() == log.nonfinite
    # 4 steps x batch 4 x 8 tokens per layer: every token is either counted or counted apart as non-finite.
    assert [t + n for t, n in zip(log.tokens, log.nonfinite)] == [4 * 4 * 8] * 2
    if precision != "16-true":
        assert log.nonfinite == [0, 0]
    # The router statistics are computed (in fp32) from these routers' logits, whatever their dtype.
    routed = layers[layers.tokens > 0]
    assert routed[["load_entropy", "aux_loss", "z_loss", "router_entropy", "top1_confidence"]].notna().all().all()
    assert all(tokens > 0 for tokens in log.tokens)
