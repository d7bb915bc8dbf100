"""Charts of the report drawn with matplotlib as SVG documents (text kept as ``<text>``, so it
stays searchable and sharp; no pyplot and no GUI backend: a bare ``Figure`` on the SVG canvas).

Each line of a series is its own artist with an SVG id: ``line-<series>-<run>`` for a stretch
of consecutive finite values, ``point-<series>-<run>`` for an isolated finite value (NaN/None
values break a line), and the title is ``<g id="title">``, so a chart's content can be checked
from its SVG.
"""
from __future__ import annotations

import io
import math
from typing import Mapping, Sequence

import matplotlib
import numpy as np
from matplotlib.backends.backend_svg import FigureCanvasSVG
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

CHART_COLORS = ("#1a67d2", "#e37400", "#1e8e3e", "#9334e6", "#c5221f", "#12a4af")
#: Chart size in inches at 100 dpi (460 x 230 px); the page scales it to 460 px wide.
CHART_SIZE = (4.6, 2.3)
#: A log scale is chosen (``log_y=None``) for positive values spanning more than this ratio.
LOG_RATIO = 50.0
SVG_STYLE = {"svg.fonttype": "none", "svg.hashsalt": "mono4d-report", "font.size": 8.0,
             "axes.titlesize": 9.0, "axes.edgecolor": "#bbbbbb", "axes.linewidth": 0.8,
             "xtick.color": "#333333", "ytick.color": "#333333", "grid.color": "#eeeeee"}


def svg_text(figure: Figure) -> str:
    """The SVG document of ``figure`` (no creation date, so equal charts give equal files)."""
    buffer = io.StringIO()
    FigureCanvasSVG(figure).print_svg(buffer, metadata={"Date": None})
    return buffer.getvalue()


def finite_runs(ok: np.ndarray) -> list[np.ndarray]:
    """Index ranges of consecutive True values of the boolean ``ok`` (N,)."""
    runs = np.split(np.arange(len(ok)), np.flatnonzero(np.diff(ok.astype(np.int8)) != 0) + 1)
    return [run for run in runs if len(run) and ok[run[0]]]


def line_chart(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], title: str, x_label: str = "",
               log_y: bool | None = None) -> str:
    """An SVG line chart of ``{name: (x, y)}``: one colour per series (legend with two or more),
    NaN/None values break a line, an isolated value is a dot. ``log_y`` None picks a log scale for
    positive values spanning more than :data:`LOG_RATIO`; a log scale is never used for values
    that are not all positive. Without any finite value the chart says "no finite values"."""
    data = {name: (np.asarray(x, np.float64), np.array([np.nan if v is None else v for v in y], np.float64))
            for name, (x, y) in series.items()}
    finite_y = np.concatenate([y[np.isfinite(y)] for _, y in data.values()] or [np.zeros(0)])
    finite_x = np.concatenate([x[np.isfinite(x)] for x, _ in data.values()] or [np.zeros(0)])
    with matplotlib.rc_context(SVG_STYLE):
        figure = Figure(figsize=CHART_SIZE, dpi=100, layout="constrained")
        axes = figure.add_subplot()
        axes.set_title(title, loc="left", fontweight="bold", gid="title")
        if finite_y.size == 0 or finite_x.size == 0:
            axes.set_axis_off()
            axes.text(0.5, 0.5, f"{title}: no finite values", ha="center", va="center", transform=axes.transAxes)
            return svg_text(figure)
        positive = bool((finite_y > 0).all())
        if log_y is None:
            log_y = positive and finite_y.max() / finite_y.min() > LOG_RATIO
        log_y = bool(log_y and positive)
        for number, (name, (x, y)) in enumerate(data.items()):
            color = CHART_COLORS[number % len(CHART_COLORS)]
            label = name if len(data) > 1 else None
            for index, run in enumerate(finite_runs(np.isfinite(x) & np.isfinite(y))):
                kind = "line" if len(run) > 1 else "point"
                axes.plot(x[run], y[run], color=color, linewidth=1.5, marker=None if len(run) > 1 else "o",
                          markersize=3, label=label, gid=f"{kind}-{number}-{index}")
                label = None
        if log_y:
            axes.set_yscale("log")
            decades = math.log10(finite_y.max()) - math.log10(finite_y.min())
            if decades < 2:  # too few powers of ten to read the scale: label 1, 2 and 5 of each decade
                axes.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            axes.yaxis.set_minor_formatter(NullFormatter())
        axes.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:.4g}"))
        axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:.6g}"))
        axes.grid(True, which="major", linewidth=0.6)
        axes.set_axisbelow(True)
        if x_label:
            axes.set_xlabel(x_label)
        if len(data) > 1:
            axes.legend(loc="upper right", frameon=False, fontsize=7)
        return svg_text(figure)
