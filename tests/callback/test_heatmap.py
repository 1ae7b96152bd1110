"""The load heatmap: every row on the same fair-share scale, whatever its number of experts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moe_monitor.sinks.images import heatmap_image

matplotlib = pytest.importorskip("matplotlib")


def test_a_balanced_row_has_one_colour_whatever_its_number_of_experts() -> None:
    balanced_8_4 = torch.tensor([[1 / 8] * 8, [1 / 4] * 4 + [0.0] * 4])
    mixed_HW3 = heatmap_image(balanced_8_4, [8, 4], ["L00", "L01"], "load")
    # The same figure with a second 8-expert layer: only the four cells the 4-expert layer lacks may differ.
    eights_HW3 = heatmap_image(torch.full((2, 8), 1 / 8), [8, 8], ["L00", "L01"], "load")
    assert mixed_HW3.shape == eights_HW3.shape
    differ_HW = (mixed_HW3 != eights_HW3).any(axis=-1)
    assert differ_HW.sum() > 100
    fair_3 = np.array(matplotlib.colormaps["viridis"](0.5, bytes=True)[:3])  # 1 = fair share: the middle colour
    assert (eights_HW3[differ_HW] == fair_3).all()  # the lacking cells: balanced in the 8-expert figure ...
    assert (mixed_HW3[differ_HW] == 255).all()  # ... and blank in the mixed one; every other pixel is the same


@pytest.mark.parametrize(("layers", "experts"), [(2, 4), (4, 8), (24, 64)])
def test_title_and_colour_bar_label_fit_inside_the_image(layers: int, experts: int) -> None:
    loads_LE = torch.full((layers, experts), 1 / experts)
    title = "validation expert load, step 123400"
    image_HW3 = heatmap_image(loads_LE, [experts] * layers, [f"L{i:02d}" for i in range(layers)], title)
    # Nothing drawn touches the border: a cut-off label or title would leave ink in the outermost pixels.
    for border in (image_HW3[:2], image_HW3[-2:], image_HW3[:, :2], image_HW3[:, -2:]):
        assert (border == 255).all()
