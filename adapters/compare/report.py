"""What a comparison leaves behind: a terminal table, results.json / results.csv, PNG plots."""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .runner import Missing, Record


def summary(records: Sequence[Record]) -> dict[tuple[Any, ...], tuple[float, float, int]]:
    """Mean accuracy and the half-width of its 95% confidence interval over seeds, by
    (backend, model, dataset, epochs, strategy, batch size)."""
    groups: dict[tuple[Any, ...], list[float]] = defaultdict(list)
    for r in records:
        groups[(r.backend, r.model, r.dataset, r.epochs, r.strategy, r.batch_size)].append(
            r.accuracy
        )
    return {key: (float(np.mean(v)), _half_width(v), len(v)) for key, v in groups.items()}


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
    """Strategy x batch size, mean ± 95% CI (in %) over seeds; ``*`` marks the best of each
    column. One block per backend, model, dataset and training length."""
    stats = summary(records)
    blocks = sorted({key[:4] for key in stats})
    lines: list[str] = []
    for block in blocks:
        backend, model, dataset, epochs = block
        strategies = list(dict.fromkeys(r.strategy for r in records))
        sizes = sorted({key[5] for key in stats if key[:4] == block})
        seeds = max(n for key, (_, _, n) in stats.items() if key[:4] == block)
        lines.append(
            f"{backend} / {model} / {Path(dataset).name} / {epochs} "
            f"epoch{'s' if epochs != 1 else ''} — test accuracy %, "
            f"mean ± 95% CI over {seeds} seed{'s' if seeds != 1 else ''} (* best per column)"
        )
        # the names column fits the longest name (a user's module:Class may be long)
        width = max([16, *(len(strategy) + 2 for strategy in strategies)])
        lines.append(f"{'strategy':<{width}}" + "".join(f"{f'b={b}':>14}" for b in sizes))
        best = {
            b: max(stats[key][0] for key in stats if key[:4] == block and key[5] == b)
            for b in sizes
        }
        for strategy in strategies:
            cells = []
            for b in sizes:
                key = (*block, strategy, b)
                if key not in stats:
                    cells.append(f"{'-':>14}")
                    continue
                mean, half, _ = stats[key]
                mark = "*" if mean == best[b] else " "
                cells.append(f"{100 * mean:>7.1f}±{100 * half:<4.1f}{mark} ")
            lines.append(f"{strategy:<{width}}" + "".join(cells))
        lines.append("")
    return "\n".join(lines)


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
    return [out / "results.json", out / "results.csv", *(plot(records, out) if rows else [])]


def plot(records: Sequence[Record], out: Path) -> list[Path]:
    """accuracy.png (accuracy vs batch size per strategy, 95% CI error bars) and
    distance.png (distance of each strategy's statistics from the exact ones)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = summary(records)
    blocks = sorted({key[:4] for key in stats})
    strategies = list(dict.fromkeys(r.strategy for r in records))
    paths = []
    figure, axes = plt.subplots(1, len(blocks), figsize=(6 * len(blocks), 4.2), squeeze=False)
    for ax, block in zip(axes[0], blocks, strict=True):
        for strategy in strategies:
            keys = sorted(
                (k for k in stats if k[:4] == block and k[4] == strategy), key=lambda k: k[5]
            )
            if not keys:
                continue
            sizes = [k[5] for k in keys]
            ax.errorbar(
                sizes,
                [100 * stats[k][0] for k in keys],
                yerr=[100 * stats[k][1] for k in keys],
                label=strategy,
                marker="o",
                capsize=3,
            )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(
            " / ".join(str(b) for b in (block[0], block[1], Path(block[2]).name))
            + f" / {block[3]} ep"
        )
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8)
    figure.tight_layout()
    paths.append(out / "accuracy.png")
    figure.savefig(paths[-1], dpi=110)
    plt.close(figure)

    distances: dict[tuple[Any, ...], list[float]] = defaultdict(list)
    several = len({r.epochs for r in records}) > 1  # keep training lengths apart
    for r in records:
        known = [d for d in r.stats_distance if d is not None]
        if known:
            label = f"{r.strategy} ({r.epochs} ep)" if several else r.strategy
            distances[(r.backend, label, r.batch_size)].append(float(np.mean(known)))
    backends = sorted({k[0] for k in distances})
    figure, axes = plt.subplots(
        1, max(len(backends), 1), figsize=(6 * max(len(backends), 1), 4.2), squeeze=False
    )
    for ax, backend in zip(axes[0], backends, strict=False):
        labels = list(dict.fromkeys(k[1] for k in distances if k[0] == backend))
        for strategy in labels:
            keys = sorted(k for k in distances if k[0] == backend and k[1] == strategy)
            if not keys:
                continue
            ax.plot(
                [k[2] for k in keys],
                [np.mean(distances[k]) for k in keys],
                marker="o",
                label=strategy,
            )
        ax.set_xscale("log", base=2)
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("batch size")
        ax.set_ylabel("distance from exact statistics\n(mean over layers and channels)")
        ax.set_title(backend)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    figure.tight_layout()
    paths.append(out / "distance.png")
    figure.savefig(paths[-1], dpi=110)
    plt.close(figure)
    return paths
