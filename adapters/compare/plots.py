"""The comparison's figures, each a function of a list of records.

``accuracy.png``: test accuracy against batch size, one line per strategy with its 95%
confidence interval, a panel per block of the table (backend, model, dataset, training
length, shift, calibration samples); under each, with ``exact`` evaluated, the paired
difference of every strategy from ``exact`` (per seed, on the same network). ``distance.png``:
the distance of each strategy's statistics from the exact ones. Because the figures read
only records, :func:`plots_from_results` redraws them from a saved ``results.json``.

How the figures keep every line visible:

- Each panel's vertical range is that of its means and intervals without the far outliers
  (means further from the panel's median than five spreads, a spread being 1.4826 median
  absolute deviations and at least 2 points): one collapsed setting, typically batch size
  2, would otherwise squash every other difference into a few pixels. Only a minority is
  left out (at most a quarter of the means), and the zero line of the differences always
  shows. A mean off the range is drawn as a
  triangle on the panel's edge with its value written beside it, so it is not hidden
  either.
- Every strategy has its own colour, marker and line style (open markers on every other
  one) and a small horizontal offset on the logarithmic batch-size axis, so two strategies
  with equal accuracy (``exact`` and ``exact-layerwise`` often are) both show.
- One legend for the whole figure, outside the panels.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import strategies as strategy_names
from .records import ALL, Record
from .report import BLOCK, block_title, blocks, by_seed, paired, summary

MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "<", ">", "h")
LINESTYLES = ("-", "--", ":", "-.")
DODGE = 0.05
"""Horizontal offset between neighbouring strategies, in octaves of batch size."""
FENCE = 5.0
"""A mean further from the panel's median than this many spreads is off the scale."""
MAD_TO_SIGMA = 1.4826
"""The median absolute deviation times this estimates a normal standard deviation."""
OUTLIER_SHARE = 0.25
"""At most this share of a panel's means is drawn off the scale (see :func:`view`)."""
MIN_SPREAD = 2.0
"""The least spread (points): panels whose means nearly agree keep a range of 20 points."""
COLUMNS = 4
"""Panels side by side before a figure wraps to another row."""


def style(index: int) -> dict[str, Any]:
    """Colour, marker, line style and marker fill of the ``index``-th strategy."""
    return {
        "color": f"C{index % 10}",
        "marker": MARKERS[index % len(MARKERS)],
        "linestyle": LINESTYLES[index % len(LINESTYLES)],
        "markerfacecolor": "none" if index % 2 else f"C{index % 10}",
    }


def view(
    values: Sequence[float], extent: Sequence[float] = (), shown: Sequence[float] = ()
) -> tuple[float, float]:
    """The vertical range of a panel: ``values`` (means) and ``extent`` (their interval ends)
    without the far outliers of ``values``, and every level of ``shown`` (the zero line of a
    panel of differences).

    An outlier is a minority: when more than a quarter of the means would fall outside, the
    panel shows them all (under a shift most strategies can collapse together while a few,
    ``exact`` among them, do not: then the collapse is the panel's content, not an outlier).

    >>> view([90.0, 92.0, 95.0, 96.0, 10.0])
    (89.5, 96.5)
    >>> view([10.0, 11.0, 10.0, 12.0, 95.0, 96.0])
    (5.7, 100.3)
    """
    points = np.asarray(values, dtype=float)
    middle = float(np.median(points))
    spread = max(MAD_TO_SIGMA * float(np.median(np.abs(points - middle))), MIN_SPREAD)
    low, high = middle - FENCE * spread, middle + FENCE * spread
    if np.count_nonzero((points < low) | (points > high)) > OUTLIER_SHARE * len(points):
        low, high = -math.inf, math.inf
    kept = [*(v for v in (*values, *extent) if low <= v <= high), *shown]
    bottom, top = min(kept), max(kept)
    pad = max(0.05 * (top - bottom), 0.5)
    return round(bottom - pad, 6), round(top + pad, 6)


def plot_accuracy(records: Sequence[Record], path: Path) -> Path:
    """Draw ``accuracy.png`` (see the module's docstring) from ``records`` into ``path``."""
    plt = _pyplot()
    stats = summary(records)
    seeds = by_seed(records)
    panels = blocks(stats)
    names = list(dict.fromkeys(r.strategy for r in records))
    rows_per_panel = 2 if "exact" in names else 1
    columns = min(len(panels), COLUMNS)
    panel_rows = math.ceil(len(panels) / columns)
    figure = plt.figure(
        figsize=(4.2 * columns + 2.2, 3.2 * rows_per_panel * panel_rows), layout="constrained"
    )
    grid = figure.add_gridspec(rows_per_panel * panel_rows, columns)
    off_scale = False
    for number, block in enumerate(panels):
        row, column = divmod(number, columns)
        ax = figure.add_subplot(grid[rows_per_panel * row, column])
        lines = {}
        for strategy in names:
            keys = sorted(
                (k for k in stats if k[:BLOCK] == block and k[BLOCK] == strategy),
                key=lambda k: k[BLOCK + 1],
            )
            if keys:
                lines[strategy] = [(k[BLOCK + 1], *stats[k][:2]) for k in keys]
        off_scale |= _draw(ax, lines, names, scale=100.0)
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(block_title(block), fontsize=8)
        if rows_per_panel == 1:
            ax.set_xlabel("batch size")
            continue
        below = figure.add_subplot(grid[rows_per_panel * row + 1, column], sharex=ax)
        differences = {}
        for strategy in names:
            if strategy == "exact":
                continue
            found = []
            for b, _, _ in lines.get(strategy, []):
                pair = paired(seeds, (*block, strategy, b), (*block, "exact", b))
                if pair is not None:
                    found.append((b, pair[0], pair[1]))
            if found:
                differences[strategy] = found
        exact_style = style(names.index("exact"))
        below.axhline(0.0, color=exact_style["color"], linestyle=exact_style["linestyle"])
        off_scale |= _draw(below, differences, names, scale=100.0, shown=(0.0,))
        below.set_xlabel("batch size")
        below.set_ylabel("minus exact (points,\npaired, 95% CI)")
    handles = [_handle(plt, style(i), name) for i, name in enumerate(names)]
    if off_scale:
        handles.append(
            _handle(plt, {"color": "0.3", "marker": "v", "linestyle": "none"}, "off the scale")
        )
    figure.legend(handles=handles, loc="outside right upper", fontsize=8)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _draw(
    ax: Any,
    lines: dict[str, list[tuple[int, float, float]]],
    names: list[str],
    scale: float,
    shown: Sequence[float] = (),
) -> bool:
    """Draw each strategy's (batch size, mean, half-width) with its style on ``ax``, in a
    range that far outliers do not set and that includes ``shown``; return whether any mean
    is off that range."""
    ax.set_xscale("log", base=2)
    ax.grid(alpha=0.3)
    if not lines:
        return False
    means = [scale * m for points in lines.values() for _, m, _ in points]
    ends = [scale * (m + s * h) for points in lines.values() for _, m, h in points for s in (-1, 1)]
    bottom, top = view(means, ends, shown)
    ax.set_ylim(bottom, top)
    middle = (len(names) - 1) / 2
    stacked: dict[tuple[int, bool], int] = defaultdict(int)  # values written per edge point
    off_scale = False
    for strategy, points in lines.items():
        index = names.index(strategy)
        batch_sizes = [b for b, _, _ in points]
        sizes = [b * 2 ** (DODGE * (index - middle)) for b in batch_sizes]
        values = [scale * m for _, m, _ in points]
        ax.errorbar(
            sizes,
            values,
            yerr=[scale * h for _, _, h in points],
            label=strategy,
            capsize=2,
            linewidth=1.2,
            markersize=4,
            **style(index),
        )
        for b, x, y in zip(batch_sizes, sizes, values, strict=True):
            if bottom <= y <= top:
                continue
            off_scale = True
            low = y < bottom
            edge, marker, align = (bottom, "v", "bottom") if low else (top, "^", "top")
            color = style(index)["color"]
            ax.plot([x], [edge], marker=marker, color=color, clip_on=False, linestyle="none")
            above = 7 * stacked[(b, low)]  # one value above the other, never on top
            stacked[(b, low)] += 1
            ax.annotate(
                f"{y:.1f}",
                (x, edge),
                xytext=(4, 2 + above if low else -2 - above),
                textcoords="offset points",
                fontsize=6,
                color=color,
                va=align,
            )
    return off_scale


def plot_distance(records: Sequence[Record], path: Path) -> Path:
    """Draw ``distance.png`` into ``path``: per backend, each strategy's distance from the
    exact statistics of the whole training set against batch size, averaged over layers,
    channels, seeds and shifts (one line per training length when there are several, and
    per number of calibration samples for the recalibrated strategies)."""
    plt = _pyplot()
    names = list(dict.fromkeys(r.strategy for r in records))
    distances: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    several = len({r.epochs for r in records}) > 1  # keep training lengths apart
    labels: dict[str, int] = {}
    for r in records:
        known = [d for d in r.stats_distance if d is not None]
        if not known:
            continue
        label = r.strategy
        if r.strategy in strategy_names.CALIBRATED and r.calibration_samples != ALL:
            label += f" ({r.calibration_samples} samples)"
        if several:
            label += f" ({r.epochs} ep)"
        labels.setdefault(label, names.index(r.strategy))
        distances[(r.backend, label, r.batch_size)].append(float(np.mean(known)))
    backends = sorted({k[0] for k in distances}) or ["no distances"]
    figure = plt.figure(figsize=(5.5 * len(backends) + 2.2, 4.2), layout="constrained")
    order = {label: i for i, label in enumerate(labels)}
    for number, backend in enumerate(backends):
        ax = figure.add_subplot(1, len(backends), number + 1)
        for label in labels:
            keys = sorted(k for k in distances if k[0] == backend and k[1] == label)
            if keys:
                ax.plot(
                    [k[2] for k in keys],
                    [np.mean(distances[k]) for k in keys],
                    label=label,
                    **style(order[label]),
                )
        ax.set_xscale("log", base=2)
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("batch size")
        ax.set_ylabel("distance from exact statistics\n(mean over layers and channels)")
        ax.set_title(backend)
        ax.grid(alpha=0.3)
    handles = [_handle(plt, style(order[label]), label) for label in labels]
    if handles:
        figure.legend(handles=handles, loc="outside right upper", fontsize=8)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plots_from_results(results_json_path: str | Path, out_dir: str | Path) -> list[Path]:
    """Redraw ``accuracy.png`` and ``distance.png`` into ``out_dir`` from the records of a
    comparison's ``results.json``; returns their paths."""
    document = json.loads(Path(results_json_path).read_text())
    records = [Record.from_dict(row) for row in document["records"]]
    if not records:
        raise ValueError(f"results_json_path: expected records, got none in {results_json_path}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [
        plot_accuracy(records, out / "accuracy.png"),
        plot_distance(records, out / "distance.png"),
    ]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _handle(plt: Any, line_style: dict[str, Any], label: str) -> Any:
    return plt.Line2D([], [], label=label, markersize=5, **line_style)
