"""A self-contained HTML report of a finished run (``moe-monitor report RUN_DIR``).

The report reads the frames the callback saves at the end of fit (``layers``, ``experts`` and, when the
detector ran, ``events``; CSV or parquet, as written by ``RouterMonitor.save``) and draws them as inline SVG,
so the file opens anywhere, offline, with no JavaScript and no plotting package.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

# Charts of the report, in order: (column, title, what a healthy value looks like).
CHARTS: tuple[tuple[str, str, str], ...] = (
    ("load_entropy", "Load entropy", "1 = perfectly balanced, 0 = every token on one expert"),
    ("max_violation", "MaxVio", "max(count) / mean(count) - 1; 0 = balanced"),
    ("dropped_fraction", "Dropped fraction", "assignments lost to expert capacity"),
    ("dead_experts", "Dead experts", "experts that received no token in the window"),
    ("aux_loss", "Aux loss (unscaled)", "Switch load-balancing loss; top_k when balanced"),
    ("z_loss", "Router z-loss (unscaled)", "mean logsumexp(logits)^2"),
    ("top1_confidence", "Top-1 confidence", "mean largest router probability"),
    ("router_entropy", "Router entropy", "mean normalised entropy of the router distribution"),
)

_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
            "#17becf")


class RunFilesNotFoundError(FileNotFoundError):
    """Raised when a run directory holds no frames saved by the monitor."""


def _history_dir(run_dir: Path) -> Path:
    """The one directory under ``run_dir`` (itself included) that holds a saved ``layers`` frame.

    Raises:
        RunFilesNotFoundError: when there is none, or more than one (a parent of several runs), saying what to do.
    """
    found = sorted({p.parent for pattern in ("layers.csv", "layers.parquet") for p in run_dir.rglob(pattern)})
    if not found:
        raise RunFilesNotFoundError(
            f"no layers.csv or layers.parquet under {run_dir}. The MoEMonitor callback writes them at the end of fit "
            "(save_frames=True, the default); a RouterMonitor user writes them with monitor.save(DIR)."
        )
    if len(found) > 1:
        listing = "\n  ".join(str(p) for p in found[:10])
        raise RunFilesNotFoundError(
            f"{run_dir} holds the history of {len(found)} runs; pass one of them:\n  {listing}"
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
    return pd.read_csv(csv) if csv.exists() else None


def load_run(run_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame | None, pd.DataFrame | None]:
    """Reads the ``(layers, experts, events)`` frames saved under ``run_dir``.

    Raises:
        RunFilesNotFoundError: when no ``layers`` frame is found, with what to do about it.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunFilesNotFoundError(f"{run_dir} is not a directory: pass the output directory of a training run.")
    history = _history_dir(run_dir)
    return _read_frame(history, "layers"), _read_frame(history, "experts"), _read_frame(history, "events")


def _fmt(value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:.4g}"
    return f"{int(value)}"


def _line_chart(series: Sequence[tuple[str, Sequence[float], Sequence[float]]], title: str, subtitle: str) -> str:
    """An SVG line chart: one ``(label, xs, ys)`` per line; NaNs break the line."""
    width, height, left, right, top, bottom = 460, 230, 52, 110, 34, 28
    finite = [(x, y) for _, xs, ys in series for x, y in zip(xs, ys) if math.isfinite(y)]
    parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg">',
             f'<text x="{left}" y="14" class="title">{html.escape(title)}</text>',
             f'<text x="{left}" y="27" class="sub">{html.escape(subtitle)}</text>']
    if not finite:
        parts.append(f'<text x="{left}" y="{height / 2}" class="sub">no finite values</text></svg>')
        return "".join(parts)
    x_lo, x_hi = min(x for x, _ in finite), max(x for x, _ in finite)
    y_lo, y_hi = min(y for _, y in finite), max(y for _, y in finite)
    if y_hi - y_lo < 1e-12:
        y_lo, y_hi = y_lo - 0.5, y_hi + 0.5
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    plot_w, plot_h = width - left - right, height - top - bottom

    def px(x: float) -> float:
        return left + (x - x_lo) / (x_hi - x_lo) * plot_w

    def py(y: float) -> float:
        return top + (1 - (y - y_lo) / (y_hi - y_lo)) * plot_h

    parts.append(f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" class="frame"/>')
    for y in (y_lo, (y_lo + y_hi) / 2, y_hi):
        parts.append(f'<text x="{left - 4}" y="{py(y) + 4:.1f}" class="tick" text-anchor="end">{y:.3g}</text>')
    for x in (x_lo, x_hi):
        parts.append(f'<text x="{px(x):.1f}" y="{height - 10}" class="tick" text-anchor="middle">{x:.0f}</text>')
    for i, (label, xs, ys) in enumerate(series):
        color = _PALETTE[i % len(_PALETTE)]
        runs: list[list[str]] = [[]]
        for x, y in zip(xs, ys):
            if math.isfinite(y):
                runs[-1].append(f"{px(x):.1f},{py(y):.1f}")
            elif runs[-1]:
                runs.append([])
        for run in runs:
            if len(run) == 1:
                cx, cy = run[0].split(",")
                parts.append(f'<circle cx="{cx}" cy="{cy}" r="2" fill="{color}"/>')
            elif run:
                parts.append(f'<polyline points="{" ".join(run)}" fill="none" stroke="{color}" stroke-width="1.5"/>')
        legend_y = top + 12 + 13 * i
        if legend_y < height - bottom:
            parts.append(f'<rect x="{width - right + 8}" y="{legend_y - 8}" width="10" height="3" fill="{color}"/>'
                         f'<text x="{width - right + 22}" y="{legend_y - 3}" class="tick">{html.escape(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _heatmap(loads: pd.DataFrame, title: str) -> str:
    """An SVG heatmap of a (layer × expert) table of loads, coloured relative to the fair share 1/E."""
    rows, cols = loads.shape
    cell, left, top = max(8, min(28, 640 // max(cols, 1))), 150, 40
    width, height = left + cols * cell + 20, top + rows * cell + 30
    parts = [f'<svg class="heat" viewBox="0 0 {width} {height}" width="{width}" xmlns="http://www.w3.org/2000/svg">',
             f'<text x="4" y="14" class="title">{html.escape(title)}</text>',
             '<text x="4" y="28" class="sub">white = fair share 1/E, blue = starved, red = overloaded</text>']
    fair = 1.0 / cols
    for r, (layer, row) in enumerate(loads.iterrows()):
        parts.append(f'<text x="{left - 6}" y="{top + r * cell + cell * 0.7:.1f}" class="tick" '
                     f'text-anchor="end">{html.escape(str(layer))}</text>')
        for c, load in enumerate(row.to_numpy()):
            if not math.isfinite(load):
                color = "#dddddd"
            elif load >= fair:
                t = min(1.0, (load - fair) / max(1 - fair, 1e-9) * 3)
                color = f"rgb(255,{int(255 * (1 - t))},{int(255 * (1 - t))})"
            else:
                t = 1 - load / fair
                color = f"rgb({int(255 * (1 - t))},{int(255 * (1 - t * 0.6))},255)"
            parts.append(f'<rect x="{left + c * cell}" y="{top + r * cell}" width="{cell}" height="{cell}" '
                         f'fill="{color}" stroke="#fff"><title>{html.escape(str(layer))} expert {c}: '
                         f'{load:.4f}</title></rect>')
    for c in range(cols):
        if cols <= 32 or c % 4 == 0:
            parts.append(f'<text x="{left + c * cell + cell / 2}" y="{top + rows * cell + 14}" class="tick" '
                         f'text-anchor="middle">{c}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _table(frame: pd.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(v) if isinstance(v, (int, float)) else str(v))}</td>"
                         for v in row) + "</tr>"
        for row in frame.itertuples(index=False)
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px} h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
.grid{display:flex;flex-wrap:wrap;gap:12px} .chart{width:460px;height:230px;background:#fafafa}
.title{font-size:13px;font-weight:600} .sub{font-size:10px;fill:#666} .tick{font-size:10px;fill:#444}
.frame{fill:none;stroke:#ccc} table{border-collapse:collapse;font-size:12px}
td,th{border:1px solid #ddd;padding:3px 6px;text-align:right} th{background:#f0f0f0}
.warn{color:#b00}
"""


def render_report(run_dir: str | Path, title: str | None = None) -> str:
    """The HTML text of the report for the run saved under ``run_dir``."""
    layers, experts, events = load_run(run_dir)
    layers = layers.sort_values(["phase", "step"], kind="stable")
    title = title or f"moe_monitor report: {Path(run_dir).resolve().name}"
    train = layers[layers["phase"] == "train"]
    main = train if not train.empty else layers
    last_step = main["step"].max()
    last = main[main["step"] == last_step]

    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    # Charts name layers L0, L1, ... in model order; the summary table maps them back to module paths.
    labels = {name: f"L{i}" for i, name in enumerate(layers["layer"].unique())}
    n_layers = len(labels)
    out.append(f"<p>{n_layers} router layer(s), {_fmt(float(main['num_experts'].max()))} experts, top-k "
               f"{_fmt(float(main['top_k'].max()))}; windows: {len(train['step'].unique())} train, "
               f"{len(layers[layers['phase'] == 'val']['step'].unique())} val; last train step {last_step}.</p>")

    if events is not None and not events.empty:
        alerts = events[events.get("kind", "alert") == "alert"] if "kind" in events else events
        out.append(f"<h2>Events</h2><p class='warn'>{len(alerts)} alert(s).</p>")
        cols = [c for c in ("step", "phase", "layer", "rule", "kind", "severity", "value", "threshold", "message")
                if c in events.columns]
        out.append(_table(events[cols]))
    else:
        out.append("<h2>Events</h2><p>No collapse alert was raised.</p>")

    last = last.assign(label=[labels[name] for name in last["layer"]])
    summary_cols = [c for c in ("label", "layer", "tokens", "dropped_fraction", "load_entropy", "max_violation", "cv",
                                "gini", "dead_experts", "aux_loss", "z_loss", "router_entropy", "top1_confidence")
                    if c in last.columns]
    out.append(f"<h2>Last window (step {last_step})</h2>{_table(last[summary_cols])}")

    for phase in [p for p in ("train", "val") if p in set(layers["phase"])]:
        frame = layers[layers["phase"] == phase]
        out.append(f"<h2>{phase} windows</h2><div class='grid'>")
        for column, chart_title, subtitle in CHARTS:
            if column not in frame.columns:
                continue
            series = [(labels[name], group["step"].tolist(), group[column].astype(float).tolist())
                      for name, group in frame.groupby("layer", sort=False)]
            out.append(_line_chart(series, chart_title, subtitle))
        out.append("</div>")

    if experts is not None and not experts.empty:
        ex = experts[experts["phase"] == main["phase"].iloc[0]]
        final = ex[ex["step"] == ex["step"].max()]
        grid = final.pivot_table(index="layer", columns="expert", values="load", sort=False)
        out.append(f"<h2>Expert load, last window</h2>{_heatmap(grid, f'layer × expert load at step {last_step}')}")
        worst_layer = last.sort_values("max_violation", ascending=False)["layer"].iloc[0]
        over_time = ex[ex["layer"] == worst_layer].pivot_table(index="step", columns="expert", values="load")
        if len(over_time) > 40:
            over_time = over_time.iloc[:: math.ceil(len(over_time) / 40)]
        out.append(_heatmap(over_time, f"{worst_layer} (highest MaxVio): load per expert over steps"))
    out.append("</body></html>")
    return "".join(out)


def write_report(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Writes the report of ``run_dir`` to ``output`` (default ``RUN_DIR/moe_report.html``) and returns its path."""
    path = Path(output) if output is not None else Path(run_dir) / "moe_report.html"
    text = render_report(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path
