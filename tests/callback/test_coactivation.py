"""coactivation.csv beside the history: the training windows' expert pairs, against the routers' own choices."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from moe_monitor import MoEMonitor
from moe_monitor.report import render_report
from tests.callback.conftest import make_data, make_lm, make_trainer


def test_coactivation_file_equals_the_pairs_the_routers_chose_and_the_report_shows_it(tmp_path: Path) -> None:
    lm = make_lm()
    seen: dict[str, torch.Tensor] = {}

    def record(name: str):
        def hook(module, args, output) -> None:
            if not module.training:
                return  # validation and the sanity check are not training windows
            k = output.expert_idx_A.numel() // output.logits_TE.shape[0]
            experts_TK = output.expert_idx_A.reshape(-1, k)
            pairs_EE = seen.setdefault(name, torch.zeros(4, 4, dtype=torch.int64))
            for row in experts_TK.tolist():
                for a in row:
                    for b in row:
                        pairs_EE[a, b] += 1

        return hook

    for name, module in lm.named_modules():
        if name.endswith("moe.router"):
            module.register_forward_hook(record(name))
    monitor = MoEMonitor(log_every_n_steps=2)
    make_trainer(tmp_path, [monitor], max_steps=4).fit(lm, make_data())

    (path,) = tmp_path.rglob("coactivation.csv")
    frame = pd.read_csv(path)
    assert set(frame.layer) == set(seen)
    for name, expected_EE in seen.items():
        mine = frame[frame.layer == name]
        got_EE = torch.zeros(4, 4, dtype=torch.int64)
        for row in mine.itertuples():
            got_EE[row.expert_a, row.expert_b] = row.count
        assert torch.equal(got_EE, expected_EE), name
    html = render_report(path.parent)
    assert "experts chosen together" in html
