"""A self-contained HTML report of finished runs (``moe-monitor report RUN_DIR [RUN_DIR ...]``).

The report reads the history the monitor saves beside a run (``layers``, ``experts`` and, when the detector ran,
``events``; CSV or parquet, as written by ``RouterMonitor.save``), and what the logger wrote next to it: the
configuration (``hparams.yaml``, a W&B ``config.yaml``) and the loss curve (``metrics.csv``, a TensorBoard event
file). It draws everything as inline SVG, so the file opens anywhere, offline, with no JavaScript.

Sections, in order: a verdict ("collapsed at step 40 in 3 of 4 layers; recovered by step 240"), the configuration,
the loss, the incident timeline (alerts and recoveries folded into incidents, control events on the same axis),
the statistics with their alert thresholds drawn, the controller knobs over time, the expert load over time for
the worst layers, co-activation (when saved), expert use per validation domain (phases named ``val/<domain>``),
and the last window's numbers. Several runs are compared side by side: a table of verdicts and overlaid charts
of each run's worst layer, then each run's own sections.

Any folder that holds a run's history can be named: a TensorBoard ``runs/x/version_N``, a CSV logger's folder,
a W&B offline run folder, a no-logger run folder or the history folder itself; the history is searched a few
levels down.
"""

from __future__ import annotations

import html
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from moe_monitor.detect import CollapseDetector, CollapseEvent, achievable_range, events_from_frame
from moe_monitor.incidents import IncidentTracker, alert_thresholds
from moe_monitor.sinks.scalars import layer_labels

# Statistic charts: (column, title, what a healthy value looks like, fixed y range or None, detector rule).
CHARTS: tuple[tuple[str, str, str, str | None, str | None], ...] = (
    ("load_entropy", "Load entropy", "1 = perfectly balanced, 0 = every token on one expert", "unit", "load_entropy"),
    ("max_violation", "MaxVio", "busiest expert / mean - 1; 0 = balanced, E/k - 1 = all on k experts", "maxvio",
     "max_violation"),
    ("dead_experts", "Dead experts", "experts that received no token in the window", "experts", "dead_experts"),
    ("dropped_fraction", "Dropped fraction", "assignments lost to expert capacity", "unit", "dropped_fraction"),
    ("top1_confidence", "Top-1 confidence", "mean largest router probability", "unit", "saturation"),
    ("router_entropy", "Router entropy", "mean normalised entropy of the router distribution", "unit", None),
    ("aux_loss", "Aux loss (unscaled)", "Switch load-balancing loss; = top_k when balanced", None, None),
    ("z_loss", "Router z-loss (unscaled)", "mean logsumexp(logits)^2", None, None),
)

_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
            "#17becf")
_HISTORY_STEMS = ("layers.csv", "layers.parquet")
_SEARCH_DEPTH = 6
_KNOB_TITLES = {"aux_loss_coef": "Aux-loss coefficient", "router_noise": "Router noise std",
                "expert_bias": "Expert-bias range (max - min)"}


class RunFilesNotFoundError(FileNotFoundError):
    """Raised when a run directory holds no frames saved by the monitor.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as empty:
        ...     try:
        ...         load_run(empty)
        ...     except RunFilesNotFoundError as error:
        ...         print(str(error)[:30], isinstance(error, FileNotFoundError))
        no layers.csv or layers.parque True
    """


# ------------------------------------------------------------------------------------------------- finding files
def find_history(run_dir: str | Path) -> Path:
    """The one folder at most a few levels under ``run_dir`` (itself included) that holds a ``layers`` frame.

    Raises:
        RunFilesNotFoundError: when there is none, or more than one (a parent of several runs), saying what to do.

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> (root / "wandb" / "offline-run-1" / "files" / "moe_monitor").mkdir(parents=True)
        >>> _ = (root / "wandb" / "offline-run-1" / "files" / "moe_monitor" / "layers.csv").write_text("step\\n")
        >>> find_history(root).relative_to(root).as_posix()
        'wandb/offline-run-1/files/moe_monitor'
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunFilesNotFoundError(
            f"{run_dir} is not a directory: pass the folder of a training run (e.g. runs/moe/version_0) or the "
            "moe_monitor folder inside it."
        )
    found = []
    base_depth = len(run_dir.resolve().parts)
    for folder, subdirs, files in os.walk(run_dir):
        depth = len(Path(folder).resolve().parts) - base_depth
        subdirs[:] = sorted(d for d in subdirs if not d.startswith(".") and depth < _SEARCH_DEPTH)
        if any(stem in files for stem in _HISTORY_STEMS):
            found.append(Path(folder))
    if not found:
        raise RunFilesNotFoundError(
            f"no layers.csv or layers.parquet in {run_dir} or up to {_SEARCH_DEPTH} folders below it. The MoEMonitor "
            "callback writes them beside the run at the end of fit (save_frames=True, the default), in the "
            "moe_monitor folder of the logger's run folder; a RouterMonitor user writes them with "
            "monitor.save(DIR). Pass that run folder (or DIR)."
        )
    if len(found) > 1:
        listing = "\n  ".join(str(p) for p in found[:10])
        raise RunFilesNotFoundError(
            f"{run_dir} holds the history of {len(found)} runs; pass one of them (or several, to compare them):"
            f"\n  {listing}"
        )
    return found[0]


def _read_frame(history: Path, stem: str) -> pd.DataFrame | None:
    """``stem.parquet`` (when pyarrow can read it) or ``stem.csv`` in ``history``, else ``None``."""
    parquet, csv = history / f"{stem}.parquet", history / f"{stem}.csv"
    if parquet.exists():
        try:
            return pd.read_parquet(parquet)
        except ImportError:
            pass
    if not csv.exists():
        return None
    try:
        return pd.read_csv(csv)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()


def load_run(run_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame | None, pd.DataFrame | None]:
    """Reads the ``(layers, experts, events)`` frames saved under ``run_dir``.

    Raises:
        RunFilesNotFoundError: when no ``layers`` frame is found, with what to do about it.

    Example:
        >>> import tempfile
        >>> from moe_monitor.detect import make_snapshot
        >>> from moe_monitor.history import History
        >>> history = History(["router"], num_experts=[2], top_k=[1])
        >>> history.append(make_snapshot([[30, 10]], step=10, top_k=1))
        >>> with tempfile.TemporaryDirectory() as run_dir:
        ...     _ = history.save(run_dir)
        ...     layers, experts, events = load_run(run_dir)
        >>> list(layers.step), list(experts["count"]), events is None
        ([10], [30, 10], True)
    """
    history = find_history(run_dir)
    return _read_frame(history, "layers"), _read_frame(history, "experts"), _read_frame(history, "events")


def _run_root(history: Path) -> Path:
    """The logger's run folder that holds the history folder (the history folder itself for a bare save)."""
    return history.parent if history.name == "moe_monitor" else history


def _run_name(history: Path) -> str:
    root = _run_root(history.resolve())
    if root.name == "files" and root.parent.name.startswith(("offline-run-", "run-")):
        return root.parent.name  # W&B: wandb/offline-run-<time>-<id>/files
    return "/".join(root.parts[-2:])


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        if set(value) == {"value"} or (set(value) <= {"value", "desc"} and "value" in value):
            _flatten(prefix, value["value"], out)  # W&B config.yaml: {key: {value: v}}
            return
        for key, inner in value.items():
            if not str(key).startswith("_"):
                _flatten(f"{prefix}.{key}" if prefix else str(key), inner, out)
    else:
        out[prefix] = str(value)


def _config(history: Path) -> dict[str, str]:
    """The run's configuration from ``hparams.yaml`` (Lightning loggers) or ``config.yaml``/``.json`` (W&B)."""
    root = _run_root(history)
    out: dict[str, str] = {}
    for name in ("hparams.yaml", "config.yaml", "config.json"):
        path = root / name
        if not path.is_file():
            continue
        try:
            if path.suffix == ".json":
                data = json.loads(path.read_text(encoding="utf-8"))
            else:
                import yaml

                data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except Exception:  # a hand-edited or foreign file must not stop the report
            continue
        if isinstance(data, dict):
            _flatten("", data, out)
    return out


def _loss_series(history: Path) -> dict[str, tuple[list[float], list[float]]]:
    """Loss curves logged beside the history: ``metrics.csv`` (CSV logger) or a TensorBoard event file."""
    root = _run_root(history)

    def wanted(key: str) -> bool:
        return "loss" in key and not key.startswith(("moe/", "controller/"))

    metrics = root / "metrics.csv"
    if metrics.is_file():
        frame = pd.read_csv(metrics)
        if "step" in frame.columns:
            out = {}
            for column in (c for c in frame.columns if wanted(c)):
                part = frame[["step", column]].dropna()
                if len(part):
                    out[column] = (part["step"].astype(float).tolist(), part[column].astype(float).tolist())
            return out
    if any(root.glob("events.out.tfevents.*")):
        try:
            from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        except ModuleNotFoundError:
            return {}
        accumulator = EventAccumulator(str(root), size_guidance={"scalars": 0})
        accumulator.Reload()
        out = {}
        for tag in (t for t in accumulator.Tags().get("scalars", []) if wanted(t)):
            events = accumulator.Scalars(tag)
            out[tag] = ([float(e.step) for e in events], [float(e.value) for e in events])
        return out
    return {}


@dataclass
class RunData:
    """Everything the report reads about one run.

    Example:
        >>> layers = pd.DataFrame({"layer": ["b.router", "a.router"], "layer_index": [1, 0], "phase": "train",
        ...                        "step": 10})
        >>> RunData("run", Path("."), layers, None, []).labels
        {'a.router': 'L00', 'b.router': 'L01'}
    """

    name: str
    history: Path
    layers: pd.DataFrame
    experts: pd.DataFrame | None
    events: list[CollapseEvent]
    config: dict[str, str] = field(default_factory=dict)
    loss: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)
    coactivation: pd.DataFrame | None = None

    @property
    def labels(self) -> dict[str, str]:
        """Module path -> ``L00`` label, in model order."""
        if "layer_index" in self.layers.columns:
            order = self.layers.drop_duplicates("layer").sort_values("layer_index")["layer"].tolist()
        else:
            order = self.layers["layer"].drop_duplicates().tolist()
        return dict(zip(order, layer_labels(len(order))))

    @property
    def train(self) -> pd.DataFrame:
        train = self.layers[self.layers["phase"] == "train"]
        return train if not train.empty else self.layers


def read_run(run_dir: str | Path) -> RunData:
    """Reads one run's history, configuration and loss curve (see the module doc for the folders accepted).

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> (root / "moe_monitor").mkdir()
        >>> pd.DataFrame({"step": [10, 20], "phase": "train", "layer": "r", "num_experts": 4, "top_k": 1,
        ...               "load_entropy": [0.9, 0.95]}).to_csv(root / "moe_monitor" / "layers.csv", index=False)
        >>> run = read_run(root)
        >>> run.labels, len(run.events), run.loss
        ({'r': 'L00'}, 0, {})
        >>> verdict(run)
        ('Healthy: no alert in 2 training windows up to step 20; lowest load entropy 0.90 (L00, step 10).', 'ok')
    """
    history = find_history(run_dir)
    layers = _read_frame(history, "layers")
    if layers is None or layers.empty or "layer" not in layers.columns:
        raise RunFilesNotFoundError(f"{history} has an empty layers frame: the run logged no window.")
    layers = layers.sort_values(["phase", "step"], kind="stable")
    return RunData(
        name=_run_name(history),
        history=history,
        layers=layers,
        experts=_read_frame(history, "experts"),
        events=events_from_frame(_read_frame(history, "events")),
        config=_config(history),
        loss=_loss_series(history),
        coactivation=_read_frame(history, "coactivation"),
    )


# ------------------------------------------------------------------------------------------------- verdict
def verdict(run: RunData) -> tuple[str, str]:
    """One sentence on how the run's routing went, and its CSS class (``ok``, ``bad``, ``mixed``).

    Collapse (load entropy, MaxVio, dead experts, saturation) is told first: when it started, in how many
    layers, and whether and by when every layer recovered; other alerts (capacity overflow, z-loss, non-finite
    logits) follow.

    Example:
        >>> layers = pd.DataFrame({"layer": ["r", "r"], "phase": "train", "step": [10, 20], "load_entropy": 0.2})
        >>> alert = CollapseEvent(10, "train", "r", "load_entropy", 0.2, 0.6, "critical", "")
        >>> verdict(RunData("run", Path("."), layers, None, [alert]))
        ('Collapsed at step 10 in 1 of 1 layers (L00); still collapsed at the end (step 20) in L00.', 'bad')
    """
    train = run.train
    n_layers = train["layer"].nunique()
    last_step = int(train["step"].max())
    tracker = IncidentTracker()
    tracker.set_layers(list(run.labels))
    for step in sorted({e.step for e in run.events}):
        tracker.update([e for e in run.events if e.step == step and e.phase == "train"])
    incidents = tracker.incidents
    collapses = [i for i in incidents if i.is_collapse]
    others = [i for i in incidents if not i.is_collapse]
    windows = train["step"].nunique()
    if not incidents:
        worst = train.loc[train["load_entropy"].idxmin()] if train["load_entropy"].notna().any() else None
        tail = (f"; lowest load entropy {worst['load_entropy']:.2f} ({run.labels[worst['layer']]}, step "
                f"{int(worst['step'])})") if worst is not None else ""
        return f"Healthy: no alert in {windows} training windows up to step {last_step}{tail}.", "ok"
    parts, state = [], "mixed"
    if collapses:
        layers = sorted({i.label for i in collapses})
        start = min(i.start_step for i in collapses)
        still = sorted({i.label for i in collapses if i.is_open})
        text = f"Collapsed at step {start} in {len(layers)} of {n_layers} layers ({', '.join(layers)})"
        if still:
            text += f"; still collapsed at the end (step {last_step}) in {', '.join(still)}"
            state = "bad"
        else:
            text += f"; recovered by step {max(int(i.end_step or 0) for i in collapses)}"
        parts.append(text)
    if others:
        rules = sorted({rule for i in others for rule in i.rules})
        still = sorted({i.label for i in others if i.is_open})
        text = f"{', '.join(rules)} alerts in {len({i.label for i in others})} of {n_layers} layers from step " \
               f"{min(i.start_step for i in others)}"
        text += f", still firing at the end in {', '.join(still)}" if still else ", all cleared"
        parts.append(text)
    return "; ".join(parts) + ".", state


# ------------------------------------------------------------------------------------------------- charts
def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values covering ``[lo, hi]``.

    Example:
        >>> nice_ticks(0, 1)
        [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
        >>> nice_ticks(0, 300), nice_ticks(10, 200, 6)
        ([0.0, 100.0, 200.0, 300.0], [50.0, 100.0, 150.0, 200.0])
    """
    if not hi > lo:
        return [lo]
    raw = (hi - lo) / max(1, count)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks, value = [], first
    while value <= hi + step * 1e-9:
        ticks.append(float(round(value, 10)))
        value += step
    return ticks


def _tick_text(value: float) -> str:
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.3g}"


def _line_chart(
    series: Sequence[tuple[str, Sequence[float], Sequence[float], str]],
    y_range: tuple[float | None, float | None] = (None, None),
    x_range: tuple[float, float] | None = None,
    refs: Sequence[tuple[str, float]] = (),
    step_lines: bool = False,
) -> str:
    """An SVG line chart: ``(label, xs, ys, colour)`` per line, dashed reference lines ``(label, y)``.

    NaNs break a line. ``y_range`` fixes either end of the y axis (``None``: from the data and the references).
    """
    width, height, left, right, top, bottom = 520, 240, 50, 14, 10, 34
    finite = [(x, y) for _, xs, ys, _ in series for x, y in zip(xs, ys) if math.isfinite(y)]
    if not finite:
        return '<p class="sub">no finite values</p>'
    xs_all = [x for x, _ in finite]
    x_lo, x_hi = x_range if x_range is not None else (min(xs_all), max(xs_all))
    if x_hi <= x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    ys = [y for _, y in finite] + [v for _, v in refs if math.isfinite(v)]
    y_lo = y_range[0] if y_range[0] is not None else min(0.0, min(ys))
    y_hi = y_range[1] if y_range[1] is not None else max(ys)
    y_hi = max(y_hi, max(ys)) if y_range[1] is None else y_hi
    if y_hi - y_lo < 1e-12:
        y_lo, y_hi = y_lo - 0.5, y_hi + 0.5
    plot_w, plot_h = width - left - right, height - top - bottom

    def px(x: float) -> float:
        return left + (x - x_lo) / (x_hi - x_lo) * plot_w

    def py(y: float) -> float:
        return top + (1 - (min(max(y, y_lo), y_hi) - y_lo) / (y_hi - y_lo)) * plot_h

    parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" preserveAspectRatio="xMidYMid meet" '
             'xmlns="http://www.w3.org/2000/svg">']
    for y in nice_ticks(y_lo, y_hi):
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{py(y):.1f}" y2="{py(y):.1f}" class="gl"/>'
                     f'<text x="{left - 5}" y="{py(y) + 3.5:.1f}" class="tick" text-anchor="end">'
                     f'{_tick_text(y)}</text>')
    for x in nice_ticks(x_lo, x_hi, 6):
        parts.append(f'<line x1="{px(x):.1f}" x2="{px(x):.1f}" y1="{top}" y2="{top + plot_h}" class="gl"/>'
                     f'<text x="{px(x):.1f}" y="{top + plot_h + 14}" class="tick" text-anchor="middle">'
                     f'{_tick_text(x)}</text>')
    parts.append(f'<text x="{left + plot_w / 2}" y="{height - 4}" class="tick" text-anchor="middle">step</text>'
                 f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" class="frame"/>')
    for label, value in refs:
        if math.isfinite(value) and y_lo <= value <= y_hi:
            parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{py(value):.1f}" y2="{py(value):.1f}" '
                         f'class="ref"><title>{html.escape(label)}</title></line>'
                         f'<text x="{left + plot_w - 3}" y="{py(value) - 3:.1f}" class="reflabel" '
                         f'text-anchor="end">{html.escape(label)}</text>')
    for label, xs, ys_, color in series:
        runs: list[list[str]] = [[]]
        previous_y = None
        for x, y in zip(xs, ys_):
            if math.isfinite(y):
                if step_lines and previous_y is not None:
                    runs[-1].append(f"{px(x):.1f},{py(previous_y):.1f}")
                runs[-1].append(f"{px(x):.1f},{py(y):.1f}")
                previous_y = y
            elif runs[-1]:
                runs.append([])
                previous_y = None
        for run in runs:
            if len(run) == 1:
                cx, cy = run[0].split(",")
                parts.append(f'<circle cx="{cx}" cy="{cy}" r="2.5" fill="{color}"/>')
            elif run:
                parts.append(f'<polyline points="{" ".join(run)}" fill="none" stroke="{color}" stroke-width="1.6">'
                             f'<title>{html.escape(label)}</title></polyline>')
    parts.append("</svg>")
    return "".join(parts)


def _legend(items: Sequence[tuple[str, str]]) -> str:
    return "<div class='legend'>" + "".join(
        f"<span><i style='background:{color}'></i>{html.escape(label)}</span>" for label, color in items
    ) + "</div>"


def _figure(title: str, subtitle: str, body: str, legend: str = "") -> str:
    return (f"<figure><figcaption><b>{html.escape(title)}</b><br><span class='sub'>{html.escape(subtitle)}"
            f"</span></figcaption>{body}{legend}</figure>")


def _heatmap(
    loads: pd.DataFrame, row_title: str, col_title: str = "expert", diverging: bool = True, fair: float | None = None
) -> str:
    """An SVG heatmap of a table; with ``diverging`` coloured relative to the fair share (default ``1 / columns``)."""
    rows, cols = loads.shape
    cell_w = max(6.0, min(36.0, 880 / max(cols, 1)))
    cell_h = max(6.0, min(22.0, 460 / max(rows, 1)))
    left, top = 80, 8
    width, height = left + cols * cell_w + 10, top + rows * cell_h + 34
    parts = [f'<svg class="heat" viewBox="0 0 {width:.0f} {height:.0f}" width="{width:.0f}" '
             'xmlns="http://www.w3.org/2000/svg">']
    fair = fair if fair is not None else 1.0 / max(cols, 1)
    peak = float(pd.to_numeric(loads.stack(), errors="coerce").max()) if not diverging else 1.0
    label_every = max(1, math.ceil(rows * 11 / max(rows * cell_h, 1)))
    for r, (name, row) in enumerate(loads.iterrows()):
        if r % label_every == 0:
            parts.append(f'<text x="{left - 6}" y="{top + r * cell_h + cell_h * 0.5 + 3.5:.1f}" class="tick" '
                         f'text-anchor="end">{html.escape(str(name))}</text>')
        for c, value in enumerate(row.to_numpy(dtype=float)):
            if not math.isfinite(value):
                color = "#dddddd"
            elif not diverging:
                t = value / peak if peak > 0 else 0.0
                color = f"rgb({int(255 * (1 - t))},{int(255 * (1 - 0.55 * t))},{int(255 * (1 - 0.2 * t))})"
            elif value >= fair:
                t = min(1.0, (value - fair) / max(1 - fair, 1e-9) * 3)
                color = f"rgb(255,{int(255 * (1 - t))},{int(255 * (1 - t))})"
            else:
                t = 1 - value / fair
                color = f"rgb({int(255 * (1 - t))},{int(255 * (1 - t * 0.6))},255)"
            parts.append(f'<rect x="{left + c * cell_w:.1f}" y="{top + r * cell_h:.1f}" width="{cell_w:.1f}" '
                         f'height="{cell_h:.1f}" fill="{color}"><title>{row_title} {html.escape(str(name))}, '
                         f'{col_title} {html.escape(str(loads.columns[c]))}: {value:.4f}</title></rect>')
    col_every = max(1, math.ceil(28 / cell_w))
    for c, name in list(enumerate(loads.columns))[::col_every]:
        parts.append(f'<text x="{left + c * cell_w + cell_w / 2:.1f}" y="{top + rows * cell_h + 13:.1f}" '
                     f'class="tick" text-anchor="middle">{html.escape(_tick_text(float(name)))}</text>')
    parts.append(f'<text x="{left + cols * cell_w / 2:.1f}" y="{height - 4:.1f}" class="tick" '
                 f'text-anchor="middle">{html.escape(col_title)}</text>'
                 f'<text x="4" y="{top + 10}" class="tick">{html.escape(row_title)}</text></svg>')
    return "".join(parts)


def _table(frame: pd.DataFrame) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            if math.isnan(value):
                return "–"
            return f"{int(value)}" if value.is_integer() else f"{value:.4g}"
        return str(value)

    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell(v))}</td>" for v in row) + "</tr>"
                   for row in frame.itertuples(index=False))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# ------------------------------------------------------------------------------------------------- sections
def _colors(labels: Sequence[str]) -> dict[str, str]:
    return {label: _PALETTE[i % len(_PALETTE)] for i, label in enumerate(labels)}


def _thresholds(run: RunData, rule: str | None) -> list[tuple[str, float]]:
    """Alert thresholds of ``rule`` in the statistic's units: from the run's alerts, else the detector defaults."""
    if rule is None or rule == "dead_experts":
        return []
    seen = sorted({round(e.threshold, 6) for e in run.events if e.rule == rule and e.kind == "alert"
                   and math.isfinite(e.threshold)})
    if seen:
        return [(f"alert threshold {v:.3g}", v) for v in seen[:3]]
    stat = "top1_confidence" if rule == "saturation" else rule
    train = run.train
    shapes = {(int(e), int(k)) for e, k in zip(train["num_experts"], train["top_k"])} if "top_k" in train else set()
    detector = CollapseDetector()
    values = {alert_thresholds(detector, e, k).get(stat) for e, k in shapes} - {None}
    return [(f"default alert threshold {v:.3g}", v) for v in sorted(values)[:3]]


def _y_range(kind: str | None, frame: pd.DataFrame) -> tuple[float | None, float | None]:
    if kind == "unit":
        return 0.0, 1.0
    if kind == "maxvio" and {"num_experts", "top_k"} <= set(frame.columns):
        return 0.0, max(achievable_range(int(e), int(k))[1] for e, k in zip(frame["num_experts"], frame["top_k"]))
    if kind == "experts" and "num_experts" in frame.columns:
        return 0.0, float(frame["num_experts"].max())
    return 0.0, None


def _statistics_section(run: RunData, phase: str) -> str:
    frame = run.layers[run.layers["phase"] == phase]
    labels, colors = run.labels, _colors(list(run.labels.values()))
    x_range = (float(run.train["step"].min()), float(run.train["step"].max()))
    figures = []
    for column, title, subtitle, kind, rule in CHARTS:
        if column not in frame.columns or not pd.to_numeric(frame[column], errors="coerce").notna().any():
            continue
        series = [(labels[name], group["step"].astype(float).tolist(), group[column].astype(float).tolist(),
                   colors[labels[name]]) for name, group in frame.groupby("layer", sort=False)]
        refs = _thresholds(run, rule) if phase == "train" else []
        chart = _line_chart(series, _y_range(kind, frame), x_range, refs)
        figures.append(_figure(title, subtitle, chart))
    legend = _legend([(f"{label} {name}", colors[label]) for name, label in labels.items()])
    return f"{legend}<div class='charts'>{''.join(figures)}</div>"


def _loss_section(run: RunData) -> str:
    if not run.loss:
        return ("<p class='sub'>No loss curve beside the history (looked for metrics.csv and a TensorBoard event "
                "file in the run folder).</p>")
    colors = _colors(list(run.loss))
    groups = {"Loss": [k for k in run.loss if not any(a in k for a in ("aux", "z_loss"))],
              "Router losses (as added to the loss)": [k for k in run.loss if any(a in k for a in ("aux", "z_loss"))]}
    figures = []
    for title, keys in groups.items():
        if keys:
            series = [(key, *run.loss[key], colors[key]) for key in keys]
            figures.append(_figure(title, "as logged by the training run", _line_chart(series, (None, None)),
                                   _legend([(key, colors[key]) for key in keys])))
    return f"<div class='charts'>{''.join(figures)}</div>"


def _incident_section(run: RunData) -> str:
    tracker = IncidentTracker()
    tracker.set_layers(list(run.labels))
    for step in sorted({e.step for e in run.events}):
        tracker.update([e for e in run.events if e.step == step])
    last = int(run.layers["step"].max())
    first = int(run.layers["step"].min())
    controls = [e for e in run.events if e.kind == "control"]
    if not tracker.incidents and not controls:
        return "<p>No alert was raised and no controller acted.</p>"
    # Timeline: one row per layer, a bar per incident, a tick per control event.
    names = list(run.labels)
    width, left, row_h, top = 1000, 90, 20, 6
    height = top + row_h * len(names) + 30

    def px(step: float) -> float:
        return left + (step - first) / max(last - first, 1) * (width - left - 12)

    parts = [f'<svg class="timeline" viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg">']
    for r, name in enumerate(names):
        y = top + r * row_h
        parts.append(f'<text x="{left - 6}" y="{y + 14}" class="tick" text-anchor="end">{run.labels[name]}</text>'
                     f'<line x1="{left}" x2="{width - 12}" y1="{y + 10}" y2="{y + 10}" class="gl"/>')
        for incident in (i for i in tracker.incidents if i.layer == name):
            x0, x1 = px(incident.start_step), px(incident.end_step if incident.end_step is not None else last)
            color = "#d62728" if incident.severity == "critical" else "#ff9f1c"
            status = f"until step {incident.end_step}" if incident.end_step is not None else "open at the end"
            parts.append(f'<rect x="{x0:.1f}" y="{y + 3}" width="{max(x1 - x0, 3):.1f}" height="14" fill="{color}" '
                         f'opacity="0.85"><title>{incident.label} {incident.phase} from step {incident.start_step} '
                         f'{status}: {html.escape(incident.summary())}</title></rect>')
        for event in (e for e in controls if e.layer == name):
            parts.append(f'<line x1="{px(event.step):.1f}" x2="{px(event.step):.1f}" y1="{y + 1}" y2="{y + 19}" '
                         f'stroke="#1f77b4" stroke-width="2"><title>{html.escape(event.message)}</title></line>')
    for x in nice_ticks(first, last, 10):
        parts.append(f'<text x="{px(x):.1f}" y="{height - 8}" class="tick" text-anchor="middle">'
                     f'{_tick_text(x)}</text>')
    parts.append("</svg>")
    rows = [{"layer": i.label, "module": i.layer, "phase": i.phase, "from step": i.start_step,
             "to step": i.end_step if i.end_step is not None else "open", "steps": i.duration(last),
             "severity": i.severity, "rules (worst value vs threshold)": i.summary()} for i in tracker.incidents]
    out = [_figure("Incident timeline", "red: critical incident, orange: warning, blue ticks: a controller turned a "
                   "knob; hover for details", "".join(parts))]
    if rows:
        out.append(_table(pd.DataFrame(rows)))
    alerts = [e for e in run.events if e.kind != "control"]
    for title, chosen in ((f"All {len(alerts)} alert and recovery events", alerts),
                          (f"All {len(controls)} control events", controls)):
        if chosen:
            frame = pd.DataFrame([{"step": e.step, "phase": e.phase, "layer": run.labels.get(e.layer, e.layer),
                                   "kind": e.kind, "rule": e.rule, "severity": e.severity, "message": e.message}
                                  for e in chosen])
            out.append(f"<details><summary>{html.escape(title)}</summary>{_table(frame)}</details>")
    return "".join(out)


def _knob_section(run: RunData) -> str:
    controls = [e for e in run.events if e.kind == "control"]
    if not controls:
        return "<p>No controller changed a knob in this run.</p>"
    colors = _colors(list(run.labels.values()) + ["all"])
    x_range = (float(run.train["step"].min()), float(run.train["step"].max()))
    figures = []
    for rule in sorted({e.rule for e in controls}):
        series, legend = [], []
        for layer in dict.fromkeys(e.layer for e in controls if e.rule == rule):
            mine = [e for e in controls if e.rule == rule and e.layer == layer]
            label = run.labels.get(layer, layer)
            xs = [float(mine[0].step)] + [float(e.step) for e in mine] + [x_range[1]]
            ys = [mine[0].threshold] + [e.value for e in mine] + [mine[-1].value]
            series.append((label, xs, ys, colors.get(label, _PALETTE[0])))
            legend.append((label, colors.get(label, _PALETTE[0])))
        chart = _line_chart(series, (0.0, None), x_range, step_lines=True)
        figures.append(_figure(_KNOB_TITLES.get(rule, rule), "value after each control event", chart,
                               _legend(legend)))
    return f"<div class='charts'>{''.join(figures)}</div>"


def _worst_layers(run: RunData, count: int = 2) -> list[str]:
    train = run.train
    if "load_entropy" not in train.columns or not train["load_entropy"].notna().any():
        return list(run.labels)[:count]
    return train.groupby("layer")["load_entropy"].min().sort_values().index[:count].tolist()


def _expert_section(run: RunData) -> str:
    experts = run.experts
    if experts is None or experts.empty:
        return "<p class='sub'>No experts frame in the history.</p>"
    phase = run.train["phase"].iloc[0]
    ex = experts[experts["phase"] == phase]
    out = ["<p class='sub'>white = fair share 1/E, blue = starved, red = overloaded; hover a cell for its load."
           "</p>"]
    for layer in _worst_layers(run):
        over_time = ex[ex["layer"] == layer].pivot_table(index="expert", columns="step", values="load")
        if over_time.shape[1] > 120:
            over_time = over_time.iloc[:, :: math.ceil(over_time.shape[1] / 120)]
        worst = run.train[run.train["layer"] == layer]["load_entropy"].min()
        out.append(_figure(f"{run.labels.get(layer, layer)} {layer}: load per expert over training",
                           f"lowest load entropy {worst:.2f}; one column per window",
                           _heatmap(over_time, "expert", "step", fair=1.0 / max(len(over_time), 1))))
    final = ex[ex["step"] == ex["step"].max()]
    grid = final.pivot_table(index="layer", columns="expert", values="load", sort=False)
    grid.index = [run.labels.get(name, name) for name in grid.index]
    out.append(_figure(f"All layers at the last window (step {int(ex['step'].max())})", "layer x expert load",
                       _heatmap(grid, "layer")))
    return "".join(out)


def _coactivation_section(run: RunData) -> str:
    frame = run.coactivation
    if frame is None or frame.empty or not {"layer", "expert_a", "expert_b", "count"} <= set(frame.columns):
        return ("<p class='sub'>Co-activation is not in this history (it needs a <code>coactivation</code> frame "
                "with columns layer, expert_a, expert_b, count beside <code>layers.csv</code>).</p>")
    out = []
    for layer in _worst_layers(run):
        mine = frame[frame["layer"] == layer]
        if mine.empty:
            continue
        grid = mine.pivot_table(index="expert_a", columns="expert_b", values="count", aggfunc="sum").fillna(0.0)
        share = grid / max(float(grid.to_numpy().sum()), 1.0)
        out.append(_figure(f"{run.labels.get(layer, layer)} {layer}: experts chosen together",
                           "share of tokens that chose both experts", _heatmap(share, "expert", diverging=False)))
    return "".join(out) or "<p class='sub'>No co-activation counts for the worst layers.</p>"


def _domain_section(run: RunData) -> str:
    experts = run.experts
    phases = sorted(p for p in run.layers["phase"].unique() if str(p).startswith("val/"))
    if not phases or experts is None or experts.empty:
        return ("<p class='sub'>This history has no per-domain validation windows (phases named "
                "<code>val/&lt;domain&gt;</code>), so which experts serve which domain is not known.</p>")
    out = []
    for layer in _worst_layers(run, count=4):
        rows = {}
        for phase in phases:
            mine = experts[(experts["phase"] == phase) & (experts["layer"] == layer)]
            if mine.empty:
                continue
            final = mine[mine["step"] == mine["step"].max()].sort_values("expert")
            rows[phase.removeprefix("val/")] = final.set_index("expert")["load"]
        if not rows:
            continue
        grid = pd.DataFrame(rows).T
        fair = 1.0 / max(grid.shape[1], 1)
        serve = "; ".join(f"{domain}: experts {', '.join(str(e) for e in row[row > 1.5 * fair].index) or 'none'}"
                          for domain, row in grid.iterrows())
        out.append(_figure(f"{run.labels.get(layer, layer)} {layer}: expert load per domain",
                           f"last validation window; above 1.5x fair share: {serve}", _heatmap(grid, "domain")))
    return "".join(out)


def _last_window_section(run: RunData) -> str:
    train = run.train
    last_step = int(train["step"].max())
    last = train[train["step"] == last_step]
    last = last.assign(label=[run.labels[name] for name in last["layer"]])
    columns = [c for c in ("label", "layer", "tokens", "dropped_fraction", "load_entropy", "max_violation", "cv",
                           "gini", "dead_experts", "aux_loss", "z_loss", "router_entropy", "top1_confidence")
               if c in last.columns]
    return _table(last[columns])


def _config_section(run: RunData) -> str:
    train = run.train
    shape = (f"{train['layer'].nunique()} router layers, {int(train['num_experts'].max())} experts, top-"
             f"{int(train['top_k'].max())}; {train['step'].nunique()} training windows up to step "
             f"{int(train['step'].max())}; phases: {', '.join(sorted(map(str, run.layers['phase'].unique())))}; "
             f"history in <code>{html.escape(str(run.history))}</code>")
    if not run.config:
        return f"<p>{shape}.</p><p class='sub'>No hparams.yaml or config.yaml beside the history.</p>"
    items = "".join(f"<div><b>{html.escape(k)}</b> = {html.escape(v)}</div>" for k, v in run.config.items())
    return f"<p>{shape}.</p><details open><summary>Configuration</summary><div class='config'>{items}</div></details>"


def _run_sections(run: RunData, heading: int = 2) -> str:
    h = f"h{heading}"
    text, state = verdict(run)
    out = [f"<p class='verdict {state}'>{html.escape(text)}</p>",
           f"<{h}>Run</{h}>{_config_section(run)}",
           f"<{h}>Loss</{h}>{_loss_section(run)}",
           f"<{h}>Incidents</{h}>{_incident_section(run)}"]
    for phase in [p for p in ("train", "val", "test") if p in set(run.layers["phase"])]:
        out.append(f"<{h}>Statistics: {phase} windows</{h}>{_statistics_section(run, phase)}")
    out += [f"<{h}>Controller knobs over time</{h}>{_knob_section(run)}",
            f"<{h}>Expert load over time, worst layers</{h}>{_expert_section(run)}",
            f"<{h}>Co-activation</{h}>{_coactivation_section(run)}",
            f"<{h}>Expert use per domain</{h}>{_domain_section(run)}",
            f"<{h}>Last window (step {int(run.train['step'].max())})</{h}>{_last_window_section(run)}"]
    return "".join(out)


def _main_loss(run: RunData, phase: str) -> str | None:
    """The key of the run's language-model loss of ``phase`` (not the aux or z-loss), if logged."""
    keys = [k for k in run.loss if phase in k and not any(a in k for a in ("aux", "z_loss", "ce_loss"))]
    return min(keys, key=len) if keys else None


def _compare_section(runs: Sequence[RunData]) -> str:
    colors = _colors([run.name for run in runs])
    rows = []
    for run in runs:
        text, _ = verdict(run)
        key = _main_loss(run, "val") or _main_loss(run, "train")
        final_loss = f"{key} {run.loss[key][1][-1]:.4g}" if key is not None and run.loss[key][1] else ""
        rows.append({"run": run.name, "verdict": text, "layers": run.train["layer"].nunique(),
                     "windows": run.train["step"].nunique(), "final loss": final_loss or "–"})
    out = [_table(pd.DataFrame(rows))]
    figures = []
    for column, title, how in (("load_entropy", "Worst layer's load entropy", "min"),
                               ("max_violation", "Worst layer's MaxVio", "max"),
                               ("dead_experts", "Dead experts, all layers", "sum")):
        series = []
        for run in runs:
            if column not in run.train.columns:
                continue
            per_step = run.train.groupby("step")[column].agg(how)
            series.append((run.name, per_step.index.astype(float).tolist(), per_step.astype(float).tolist(),
                           colors[run.name]))
        if series:
            kind = {"load_entropy": "unit"}.get(column)
            figures.append(_figure(title, f"{how} over layers per window, one line per run",
                                   _line_chart(series, _y_range(kind, runs[0].train))))
    loss_series = []
    for run in runs:
        key = _main_loss(run, "train")
        if key is not None:
            loss_series.append((f"{run.name} {key}", *run.loss[key], colors[run.name]))
    if loss_series:
        figures.append(_figure("Training loss", "one line per run", _line_chart(loss_series)))
    out.append(_legend([(run.name, colors[run.name]) for run in runs]))
    out.append(f"<div class='charts'>{''.join(figures)}</div>")
    return "".join(out)


_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:20px 28px;color:#222}
h1{font-size:22px;margin:0 0 6px} h2{font-size:17px;margin-top:30px;border-bottom:1px solid #ddd;padding-bottom:3px}
h3{font-size:15px;margin-top:22px}
.charts{display:grid;grid-template-columns:repeat(auto-fill,minmax(440px,1fr));gap:14px}
figure{margin:0;background:#fafafa;border:1px solid #eee;padding:6px 8px;overflow-x:auto}
figcaption{font-size:13px;margin-bottom:4px} .chart{width:100%;height:auto;display:block} .timeline{width:100%}
.sub{font-size:11.5px;color:#666} .tick{font-size:10px;fill:#333} .gl{stroke:#e6e6e6}
.config{columns:3 300px;font-size:12px;margin:6px 0} .config div{break-inside:avoid} .config b{font-weight:600}
.frame{fill:none;stroke:#bbb} .ref{stroke:#c00;stroke-dasharray:5 3;stroke-width:1.2}
.reflabel{font-size:9.5px;fill:#c00} .legend{display:flex;flex-wrap:wrap;gap:4px 14px;font-size:12px;margin:6px 0}
.legend i{display:inline-block;width:14px;height:4px;margin-right:5px;vertical-align:middle}
table{border-collapse:collapse;font-size:12px;margin:6px 0} td,th{border:1px solid #ddd;padding:3px 6px;
text-align:right;vertical-align:top} th{background:#f0f0f0} td:last-child{text-align:left}
.verdict{font-size:16px;padding:10px 14px;border-radius:6px;margin:10px 0 4px}
.verdict.ok{background:#e7f6e9;border:1px solid #9cd3a5} .verdict.bad{background:#fde8e8;border:1px solid #f0a3a3}
.verdict.mixed{background:#fff4dd;border:1px solid #f1c978} details{margin:6px 0} summary{cursor:pointer}
section.run{border-top:3px solid #ccc;margin-top:34px} code{font-size:12px}
"""


def render_report(run_dir: str | Path | Sequence[str | Path], title: str | None = None) -> str:
    """The HTML text of the report for one run folder, or of a comparison of several.

    Raises:
        RunFilesNotFoundError: when a folder holds no history, or the history of several runs.

    Example:
        >>> import tempfile
        >>> from moe_monitor.detect import make_snapshot
        >>> from moe_monitor.history import History
        >>> history = History(["router"], num_experts=[2], top_k=[1])
        >>> for step in (10, 20):
        ...     history.append(make_snapshot([[30, 10]], step=step, top_k=1))
        >>> run_dir = tempfile.mkdtemp()
        >>> _ = history.save(run_dir)
        >>> page = render_report(run_dir)
        >>> page.startswith("<!DOCTYPE html>") or page.lstrip().lower().startswith("<!doctype html>")
        True
    """
    dirs = [run_dir] if isinstance(run_dir, (str, Path)) else list(run_dir)
    if not dirs:
        raise RunFilesNotFoundError("no run folder given: pass at least one.")
    runs = [read_run(d) for d in dirs]
    if title is None:
        title = (f"MoE routing report: {runs[0].name}" if len(runs) == 1
                 else f"MoE routing report: {len(runs)} runs compared")
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    if len(runs) == 1:
        out.append(_run_sections(runs[0]))
    else:
        out.append(f"<h2>Side by side</h2>{_compare_section(runs)}")
        for run in runs:
            out.append(f"<section class='run'><h2>{html.escape(run.name)}</h2>{_run_sections(run, 3)}</section>")
    out.append("</body></html>")
    return "".join(out)


def write_report(run_dir: str | Path | Sequence[str | Path], output: str | Path | None = None) -> Path:
    """Writes the report of one run folder (or a comparison of several) to ``output`` and returns its path.

    ``output`` defaults to ``RUN_DIR/moe_report.html`` for one run and ``FIRST_RUN_DIR/moe_compare.html`` for
    several.

    Example (two runs compared; one run's report goes to ``RUN_DIR/moe_report.html``, see :func:`render_report`):
        >>> import tempfile
        >>> from moe_monitor.detect import make_snapshot
        >>> from moe_monitor.history import History
        >>> runs = [tempfile.mkdtemp(), tempfile.mkdtemp()]
        >>> for run_dir, counts in zip(runs, ([[30, 10]], [[20, 20]])):
        ...     history = History(["router"], num_experts=[2], top_k=[1])
        ...     history.append(make_snapshot(counts, step=10, top_k=1))
        ...     _ = history.save(run_dir)
        >>> path = write_report(runs)
        >>> path.name, path.parent.name == Path(runs[0]).name, "2 runs compared" in path.read_text()
        ('moe_compare.html', True, True)
    """
    dirs = [run_dir] if isinstance(run_dir, (str, Path)) else list(run_dir)
    if output is not None:
        path = Path(output)
    elif len(dirs) == 1:
        path = Path(dirs[0]) / "moe_report.html"
    else:
        path = Path(dirs[0]) / "moe_compare.html"
    text = render_report(dirs if len(dirs) > 1 else dirs[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path
