"""The layer x expert load heatmap that the TensorBoard and W&B sinks show each window.

Shape legend: ``L`` layers, ``E`` experts, ``H``/``W`` image height/width in pixels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def heatmap_image(loads_LE: torch.Tensor, num_experts: Sequence[int], labels: Sequence[str], title: str) -> np.ndarray:
    """Draws each layer's expert loads as one row of a heatmap, with axes and a colour bar.

    Each row is divided by its own layer's fair share ``1 / E`` (colour = ``load * E``, from 0 to 2), so a balanced
    layer is one flat mid colour whatever its number of experts, a dead expert is dark and an expert with twice its
    fair share or more saturates. Columns beyond a layer's own ``num_experts`` are blank.

    Args:
        loads_LE: ``[L, E]`` share of each layer's assignments per expert.
        num_experts: experts of each layer.
        labels: row labels, e.g. ``["L00", "L01"]``.
        title: figure title.

    Returns:
        ``uint8 [H, W, 3]`` RGB image.

    Raises:
        ModuleNotFoundError: matplotlib is not installed; the message names the extra to install.

    Example:
        >>> image_HW3 = heatmap_image(torch.tensor([[0.5, 0.5], [1.0, 0.0]]), [2, 2], ["L00", "L01"], "load")
        >>> image_HW3.dtype, image_HW3.ndim, image_HW3.shape[2]
        (dtype('uint8'), 3, 3)
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            'Expert-load heatmaps need matplotlib: pip install "moe-monitor[plots]" (scalars and histograms are'
            " logged without it)."
        ) from err

    num_layers, width = loads_LE.shape
    experts_L1 = torch.tensor(num_experts, dtype=torch.float64).reshape(-1, 1)
    share_LE = loads_LE.double() * experts_L1  # 1 = fair share in every row
    for layer, experts in enumerate(num_experts):
        share_LE[layer, experts:] = float("nan")

    # A Figure without pyplot keeps no global state and is safe off the main thread. The constrained layout makes
    # room for the colour-bar label and the title, which a fixed layout cuts off on narrow figures.
    fig = Figure(figsize=(2.8 + 0.3 * width, 1.4 + 0.28 * num_layers), dpi=90, layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(share_LE.numpy(), aspect="auto", cmap="viridis", vmin=0.0, vmax=2.0, interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_yticks(range(num_layers), labels)
    step_x = max(1, width // 16)
    ax.set_xticks(range(0, width, step_x))
    ax.set_title(title, fontsize=9, wrap=True)
    bar = fig.colorbar(image, ax=ax)
    bar.set_label("load / fair share\n(1 = balanced)", fontsize=8)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
