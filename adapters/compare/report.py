"""What a comparison leaves behind: a terminal table, results.json / results.csv and the
plots (drawn by :mod:`.plots`)."""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .records import ALL, Missing, Record

WIDTH = 100
"""Terminal columns a table line may take; wider tables are cut into column groups."""

Key = tuple[Any, ...]
"""(backend, model, dataset, epochs, training mode, shift, calibration samples, strategy,
batch size): the first seven name a block of the table (a panel of the plots), then its row
and its column."""
BLOCK = 7


def by_seed(records: Sequence[Record]) -> dict[Key, dict[int, float]]:
    """Accuracy by seed, by :data:`Key`."""
    groups: dict[Key, dict[int, float]] = defaultdict(dict)
    for r in records:
        block = (
            r.backend,
            r.model,
            r.dataset,
            r.epochs,
            r.train_mode,
            r.shift,
            r.calibration_samples,
        )
        key = (*block, r.strategy, r.batch_size)
        groups[key][r.seed] = r.accuracy
    return groups


def summary(records: Sequence[Record]) -> dict[Key, tuple[float, float, int]]:
    """Mean accuracy, the half-width of its 95% confidence interval over seeds and the
    number of seeds, by :data:`Key`."""
    return {key: _mean_ci(list(v.values())) for key, v in by_seed(records).items()}


def paired(
    seeds: dict[Key, dict[int, float]], key: Key, reference: Key
) -> tuple[float, float, int] | None:
    """Mean and 95% half-width over seeds of accuracy(key) - accuracy(reference), taken per
    seed (the same network); None when they share no seed."""
    common = sorted(set(seeds.get(key, {})) & set(seeds.get(reference, {})))
    if not common:
        return None
    return _mean_ci([seeds[key][s] - seeds[reference][s] for s in common])


def _mean_ci(values: Sequence[float]) -> tuple[float, float, int]:
    return float(np.mean(values)), _half_width(values), len(values)


def _half_width(values: Sequence[float]) -> float:
    """Student-t 95% half-width of the mean (0 for a single seed)."""
    n = len(values)
    if n < 2:
        return 0.0
    try:
        from scipy.stats import t

        quantile = float(t.ppf(0.975, n - 1))
    except ImportError:  # scikit-learn brings scipy; without it, the normal quantile
        quantile = 1.96
    return quantile * float(np.std(values, ddof=1)) / math.sqrt(n)


def table(records: Sequence[Record]) -> str:
    """Strategy x batch size, mean ± 95% CI (in %) over seeds, one block per backend, model,
    dataset, training length, shift and number of calibration samples. ``*`` marks the best
    mean of each column (unrounded) and ``=`` every strategy whose paired difference from the
    best has a 95% CI that holds 0; with ``exact`` among the strategies, a second block gives
    each strategy's paired difference from it. Lines fit in 100 columns (wide tables are cut
    into column groups)."""
    seeds = by_seed(records)
    stats = {key: _mean_ci(list(v.values())) for key, v in seeds.items()}
    strategies = list(dict.fromkeys(r.strategy for r in records))
    lines: list[str] = []
    for block in blocks(stats):
        sizes = sorted({key[BLOCK + 1] for key in stats if key[:BLOCK] == block})
        count = max(n for key, (_, _, n) in stats.items() if key[:BLOCK] == block)
        title = block_title(block)
        over = f"over {count} seed{'s' if count != 1 else ''}"
        cells: dict[str, list[str]] = {}
        for strategy in strategies:
            cells[strategy] = []
            for b in sizes:
                key = (*block, strategy, b)
                if key not in stats:
                    cells[strategy].append("-")
                    continue
                mean, half, _ = stats[key]
                cells[strategy].append(f"{100 * mean:.1f}±{100 * half:.1f}{_mark(seeds, key)}")
        lines += _grid(f"{title} — test accuracy % {over}", "strategy", sizes, cells)
        lines.append("")
        lines.append(
            "mean ± 95% CI over seeds; * best mean; = paired difference from the best not "
            "significant"
        )
        lines.append("")
        if "exact" not in strategies:
            continue
        differences: dict[str, list[str]] = {}
        for strategy in strategies:
            if strategy == "exact":
                continue
            differences[strategy] = []
            for b in sizes:
                found = paired(seeds, (*block, strategy, b), (*block, "exact", b))
                if found is None:
                    differences[strategy].append("-")
                    continue
                mean, half, _ = found
                differences[strategy].append(f"{100 * mean:+.1f}±{100 * half:.1f}")
        if differences:
            heading = f"{title} — minus exact, points, {over}"
            lines += _grid(heading, "difference", sizes, differences)
            lines.append("")
            lines.append("paired mean ± 95% CI over seeds (the same network for both)")
            lines.append("")
    return "\n".join(lines)


def blocks(stats: dict[Key, Any]) -> list[Key]:
    """The blocks of ``stats``' keys in table order: by backend, model, dataset, epochs and
    training mode (batchnorm first); the unshifted test set before the shifts; calibration
    samples from few to all."""

    def order(block: Key) -> tuple[Any, ...]:
        *network, mode, shift, samples = block
        plain = mode != "batchnorm"
        return (
            *network,
            plain,
            mode,
            shift != "none",
            shift,
            samples == ALL,
            str(samples).zfill(9),
        )

    return sorted({key[:BLOCK] for key in stats}, key=order)


def block_title(block: Key) -> str:
    """``torch / mlp / digits / 5 epochs / shift none``, with the training mode after the
    epochs unless it is plain BatchNorm, then ``/ 64 calibration samples`` unless the exact
    pass took the whole training set."""
    backend, model, dataset, epochs, mode, shift, samples = block
    trained = "" if mode == "batchnorm" else f" / {mode}"
    title = (
        f"{backend} / {model} / {Path(dataset).name} / {epochs} "
        f"epoch{'s' if epochs != 1 else ''}{trained} / shift {shift}"
    )
    return title if samples == ALL else f"{title} / {samples} calibration samples"


def _mark(seeds: dict[Key, dict[int, float]], key: Key) -> str:
    """``*`` for the best unrounded mean of the column, ``=`` for a strategy whose paired
    difference from the best is not significant, a space otherwise."""
    column = {k: float(np.mean(list(v.values()))) for k, v in seeds.items() if _same_cell(k, key)}
    best = max(column.values())
    if column[key] == best:
        return "*"
    leader = next(k for k, mean in column.items() if mean == best)
    found = paired(seeds, key, leader)
    if found is None or found[2] < 2:
        return " "
    mean, half, _ = found
    return "=" if abs(mean) <= half else " "


def _same_cell(a: Key, b: Key) -> bool:
    return a[:BLOCK] == b[:BLOCK] and a[BLOCK + 1] == b[BLOCK + 1]


def _grid(title: str, corner: str, sizes: list[int], rows: dict[str, list[str]]) -> list[str]:
    """A title, then the rows under batch-size columns, in groups of columns that fit WIDTH."""
    names = max([len(corner), *(len(name) for name in rows)]) + 2
    cell = max([6, *(len(c) for cells in rows.values() for c in cells)]) + 2
    per_line = max(1, (WIDTH - names) // cell)
    lines = [title]
    for first in range(0, len(sizes), per_line):
        chunk = range(first, min(first + per_line, len(sizes)))
        lines.append(f"{corner:<{names}}" + "".join(f"{f'b={sizes[i]}':>{cell}}" for i in chunk))
        for name, cells in rows.items():
            lines.append(f"{name:<{names}}" + "".join(f"{cells[i]:>{cell}}" for i in chunk))
    return lines


def write(records: Sequence[Record], out: Path, missing: Sequence[Missing] = ()) -> list[Path]:
    """``results.json`` (the records, and the networks ``missing`` with the reason),
    ``results.csv`` and the plots in ``out``; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    rows = [r.as_dict() for r in records]
    # Strict JSON: a missing value is null (its record says why); a NaN or Inf raises here
    # rather than be written as the bare NaN that standard JSON parsers refuse.
    document = {"records": rows, "missing": [m.as_dict() for m in missing]}
    (out / "results.json").write_text(json.dumps(document, indent=1, allow_nan=False))
    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["strategy"])
        writer.writeheader()
        for row in rows:
            distance = json.dumps(row["stats_distance"], allow_nan=False)
            writer.writerow({**row, "stats_distance": distance})
    if not rows:
        return [out / "results.json", out / "results.csv"]
    from .plots import plot_accuracy, plot_distance

    figures = [plot_accuracy(records, out / "accuracy.png")]
    figures.append(plot_distance(records, out / "distance.png"))
    return [out / "results.json", out / "results.csv", *figures]
