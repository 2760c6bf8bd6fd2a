"""Chart helpers for chart modules: each returns one SVG string, ready for :func:`lmaudit.reports.charts.inline_svg`.

They use matplotlib's object API (``matplotlib.figure.Figure``, no pyplot state, Agg backend) and write text as
SVG ``<text>`` elements (``svg.fonttype: none``), which matplotlib XML-escapes: a label like
``<script>`` becomes ``&lt;script&gt;``. Inputs are plain sequences (lists from a result dict); numpy is
optional. Keep charts small: a few hundred points or a matrix up to a few thousand cells.

- :func:`bar_chart`  labels and values, optional highlighted bars, optional log y
- :func:`line_chart` one or more named series over shared x, optional log x / log y
- :func:`heatmap`    a 2-D matrix with optional row/column labels and a colour bar
- :func:`scatter`    points with optional text labels on the most extreme ones
- :func:`figure_to_svg` any matplotlib ``Figure`` you built yourself
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg", force=False)

from matplotlib.figure import Figure  # noqa: E402

WIDTH, HEIGHT = 7.0, 3.2  # inches: about 670 x 310 px at the report's 96 dpi
_RC = {"svg.fonttype": "none", "svg.image_inline": True, "font.size": 9, "axes.titlesize": 10}
HIGHLIGHT, NORMAL = "#c0392b", "#4a77b4"


def new_figure(width: float = WIDTH, height: float = HEIGHT) -> Figure:
    """A pyplot-free figure with one axes: ``fig = new_figure(); ax = fig.axes[0]``."""
    figure = Figure(figsize=(width, height), layout="constrained")
    figure.add_subplot()
    return figure


def figure_to_svg(figure: Figure) -> str:
    """The figure as an SVG string (text kept as escaped <text>, images embedded as data: PNG)."""
    buffer = io.StringIO()
    with matplotlib.rc_context(_RC):
        figure.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None})
    return buffer.getvalue()


def _finite(values: Sequence[Any]) -> list[float]:
    out = []
    for v in values:
        try:
            out.append(float(v))
        except (TypeError, ValueError):
            out.append(math.nan)
    return out


def _label_axes(ax: Any, title: str, xlabel: str, ylabel: str) -> None:
    if title:
        ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)


def bar_chart(labels: Sequence[Any], values: Sequence[Any], *, title: str = "", xlabel: str = "",
              ylabel: str = "", highlight: Sequence[int] = (), log_y: bool = False,
              horizontal: bool = False) -> str:
    """Bars in the given order; indices in ``highlight`` are drawn in red. Many labels are thinned to ~40."""
    figure = new_figure()
    ax = figure.axes[0]
    positions = list(range(len(values)))
    colours = [HIGHLIGHT if i in set(highlight) else NORMAL for i in positions]
    draw = ax.barh if horizontal else ax.bar
    draw(positions, _finite(values), color=colours)
    step = max(1, math.ceil(len(labels) / 40))
    ticks = positions[::step]
    names = [str(labels[i]) for i in ticks]
    if horizontal:
        ax.set_yticks(ticks, names)
        ax.invert_yaxis()
        if log_y:
            ax.set_xscale("log")
    else:
        ax.set_xticks(ticks, names, rotation=60 if max((len(n) for n in names), default=0) > 3 else 0,
                      ha="right" if max((len(n) for n in names), default=0) > 3 else "center")
        if log_y:
            ax.set_yscale("log")
    _label_axes(ax, title, xlabel, ylabel)
    return figure_to_svg(figure)


def line_chart(x: Sequence[Any], series: Mapping[str, Sequence[Any]], *, title: str = "", xlabel: str = "",
               ylabel: str = "", log_x: bool = False, log_y: bool = False, markers: bool = True,
               hline: float | None = None) -> str:
    """One line per named series over shared ``x`` (e.g. a scaling curve over a scale factor, log x)."""
    figure = new_figure()
    ax = figure.axes[0]
    xs = _finite(x)
    for name, ys in series.items():
        ax.plot(xs, _finite(ys), marker="o" if markers else None, markersize=3, label=str(name))
    if hline is not None:
        ax.axhline(hline, color="#888", linestyle="--", linewidth=1)
    if log_x:
        ax.set_xscale("log")
    if log_y:
        ax.set_yscale("log")
    if len(series) > 1:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _label_axes(ax, title, xlabel, ylabel)
    return figure_to_svg(figure)


def heatmap(matrix: Sequence[Sequence[Any]], *, title: str = "", xlabel: str = "", ylabel: str = "",
            row_labels: Sequence[Any] | None = None, col_labels: Sequence[Any] | None = None,
            colorbar_label: str = "", cmap: str = "viridis", center_zero: bool = False) -> str:
    """A matrix as an image (e.g. layers x heads); ``center_zero`` uses a diverging map symmetric around 0."""
    rows = [_finite(row) for row in matrix]
    n_rows, n_cols = len(rows), max((len(r) for r in rows), default=0)
    grid = [r + [math.nan] * (n_cols - len(r)) for r in rows]
    figure = new_figure(WIDTH, max(2.4, min(6.0, 0.9 + 0.18 * n_rows)))
    ax = figure.axes[0]
    options: dict[str, Any] = {"aspect": "auto", "interpolation": "nearest", "cmap": cmap}
    if center_zero:
        bound = max((abs(v) for r in grid for v in r if not math.isnan(v)), default=1.0) or 1.0
        options.update(cmap="RdBu_r", vmin=-bound, vmax=bound)
    image = ax.imshow(grid, **options)
    colorbar = figure.colorbar(image, ax=ax)
    colorbar.set_label(colorbar_label)
    for labels, count, setter in ((row_labels, n_rows, ax.set_yticks), (col_labels, n_cols, ax.set_xticks)):
        if labels is not None and count:
            step = max(1, math.ceil(count / 30))
            setter(list(range(0, count, step)), [str(labels[i]) for i in range(0, count, step)])
    _label_axes(ax, title, xlabel, ylabel)
    return figure_to_svg(figure)


def scatter(x: Sequence[Any], y: Sequence[Any], *, labels: Sequence[Any] | None = None, title: str = "",
            xlabel: str = "", ylabel: str = "", log_x: bool = False, log_y: bool = False,
            max_labels: int = 15, diagonal: bool = False) -> str:
    """Points; the ``max_labels`` points farthest from the median get their label written beside them."""
    figure = new_figure()
    ax = figure.axes[0]
    xs, ys = _finite(x), _finite(y)
    ax.scatter(xs, ys, s=14, color=NORMAL, alpha=0.8)
    if diagonal and xs and ys:
        finite = [v for v in xs + ys if not math.isnan(v)]
        if finite:
            lo, hi = min(finite), max(finite)
            ax.plot([lo, hi], [lo, hi], color="#888", linestyle="--", linewidth=1)
    if labels is not None and xs:
        mx, my = sorted(xs)[len(xs) // 2], sorted(ys)[len(ys) // 2]
        order = sorted(range(len(xs)), key=lambda i: -(abs(xs[i] - mx) + abs(ys[i] - my)) if not (
            math.isnan(xs[i]) or math.isnan(ys[i])) else 0.0)
        for i in order[:max_labels]:
            ax.annotate(str(labels[i]), (xs[i], ys[i]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if log_x:
        ax.set_xscale("log")
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    _label_axes(ax, title, xlabel, ylabel)
    return figure_to_svg(figure)
