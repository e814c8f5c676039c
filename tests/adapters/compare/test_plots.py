"""The figures, inspected through matplotlib's artists (Agg backend): files written, panels,
one legend naming every strategy, exact and exact-layerwise both visible, a vertical range
that an outlying batch size does not set, the paired differences, and the redrawing from a
saved results.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from normstats.adapters.compare import Record, plots, plots_from_results, report

STRATEGIES = ("exact", "exact-layerwise", "ema:0.1", "batch")
SIZES = (2, 8, 32, 128)


def record(strategy: str, batch_size: int, seed: int, accuracy: float, **fields: Any) -> Record:
    values: dict[str, Any] = {
        "backend": "numpy",
        "model": "mlp",
        "dataset": "digits",
        "batch_size": batch_size,
        "seed": seed,
        "epochs": 5,
        "train_mode": "batchnorm",
        "strategy": strategy,
        "shift": "none",
        "accuracy": accuracy,
        "lr": 0.1 * batch_size / 64,
        "calibration_batch_size": batch_size,
        "calibration_samples": "all",
        "test_batch_size": batch_size,
        "test_size": 450,
        "version": "0",
        "stats_distance": [] if strategy == "batch" else [0.0 if "exact" in strategy else 0.1],
    }
    return Record(**{**values, **fields})


def accuracy_of(strategy: str, batch_size: int, seed: int) -> float:
    """b=2 collapses to 0.1; elsewhere 0.9 and more; exact and exact-layerwise equal."""
    if batch_size == 2:
        return 0.1 + 0.01 * seed
    step = {"exact": 0.0, "exact-layerwise": 0.0, "ema:0.1": -0.02, "batch": -0.04}[strategy]
    return 0.95 + step + 0.005 * seed + 0.001 * np.log2(batch_size)


def synthetic(shifts: tuple[str, ...] = ("none",), **fields: Any) -> list[Record]:
    return [
        record(s, b, seed, accuracy_of(s, b, seed), shift=shift, **fields)
        for shift in shifts
        for s in STRATEGIES
        for b in SIZES
        for seed in range(3)
    ]


@pytest.fixture
def drawn(monkeypatch, tmp_path):
    """plot_accuracy's figure, kept open for inspection: ``drawn(records)``."""
    figures: list[Any] = []
    close = plt.close
    monkeypatch.setattr(plt, "close", figures.append)

    def draw(records: list[Record]) -> Any:
        path = plots.plot_accuracy(records, tmp_path / "accuracy.png")
        assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
        return figures[-1]

    yield draw
    for figure in figures:
        close(figure)


def containers(ax: Any) -> dict[str, Any]:
    return {c.get_label(): c for c in ax.containers}


def data(line: Any) -> tuple[Any, Any]:
    """A line's x and y as float arrays (errorbar keeps object arrays)."""
    return np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float)


def test_a_difference_panel_under_each_accuracy_panel(drawn):
    figure = drawn(synthetic(shifts=("none", "offset:0.5", "noise:1")))
    assert len(figure.axes) == 6  # 3 shifts x (accuracy, difference)
    titles = [ax.get_title() for ax in figure.axes[::2]]
    assert [t.rsplit("/ shift ", 1)[1] for t in titles] == ["none", "noise:1", "offset:0.5"]
    for ax in figure.axes[1::2]:
        assert "minus exact" in ax.get_ylabel()
        assert set(containers(ax)) == set(STRATEGIES) - {"exact"}
    without_exact = drawn([r for r in synthetic() if r.strategy != "exact"])
    assert len(without_exact.axes) == 1  # no reference, no difference panel


def test_difference_panel_shows_the_paired_mean_and_ci():
    records = synthetic()
    seeds = report.by_seed(records)
    block = ("numpy", "mlp", "digits", 5, "batchnorm", "none", "all")
    mean, half, n = report.paired(seeds, (*block, "ema:0.1", 32), (*block, "exact", 32))
    assert n == 3
    assert mean == pytest.approx(-0.02)  # the same offset on every seed: no spread
    assert half == pytest.approx(0.0, abs=1e-12)


def test_difference_panel_values(drawn):
    figure = drawn(synthetic())
    line = containers(figure.axes[1])["ema:0.1"].lines[0]
    np.testing.assert_allclose(data(line)[1], [0.0, -2.0, -2.0, -2.0], atol=1e-9)


def test_one_legend_outside_the_panels_names_every_strategy(drawn):
    figure = drawn(synthetic(shifts=("none", "offset:0.5")))
    assert [ax.get_legend() for ax in figure.axes] == [None] * len(figure.axes)
    assert len(figure.legends) == 1
    legend = figure.legends[0]
    labels = [text.get_text() for text in legend.get_texts()]
    assert labels[: len(STRATEGIES)] == list(STRATEGIES)
    figure.canvas.draw()
    box = legend.get_window_extent()
    for ax in figure.axes:
        assert not box.overlaps(ax.get_window_extent())


def test_exact_and_exact_layerwise_both_show_with_different_styles(drawn):
    figure = drawn(synthetic())
    found = containers(figure.axes[0])
    exact, layerwise = found["exact"].lines[0], found["exact-layerwise"].lines[0]
    np.testing.assert_array_equal(data(exact)[1], data(layerwise)[1])  # equal accuracies
    assert exact.get_marker() != layerwise.get_marker()
    assert exact.get_linestyle() != layerwise.get_linestyle()
    assert exact.get_color() != layerwise.get_color()
    assert layerwise.get_markerfacecolor() == "none"  # open: what lies below shows through
    assert np.all(data(exact)[0] < data(layerwise)[0])  # side by side
    # the offsets are small: each point stays within a few percent of its batch size
    np.testing.assert_allclose(data(exact)[0], SIZES, rtol=0.1)
    np.testing.assert_allclose(data(layerwise)[0], SIZES, rtol=0.1)


def test_an_outlying_batch_size_does_not_set_the_vertical_range(drawn):
    figure = drawn(synthetic())
    accuracy, difference = figure.axes[0], figure.axes[1]
    bottom, top = accuracy.get_ylim()
    # Before: the range reached down to 10% to show b=2, leaving 91-97% in a tenth of it.
    others = [100 * r.accuracy for r in synthetic() if r.batch_size != 2]
    assert 85 < bottom < min(others)
    assert max(others) < top < 100
    assert difference.get_ylim()[0] > -20  # b=2 differs by 0 here; the others by -2 to -4
    # the collapsed b=2 means are drawn on the lower edge with their values written
    notes = [t.get_text() for t in accuracy.texts]
    assert notes == ["11.0"] * len(STRATEGIES)  # the mean of 10, 11 and 12%
    assert "off the scale" in [t.get_text() for t in figure.legends[0].get_texts()]


def test_a_range_with_no_outlier_shows_every_mean_and_interval():
    values = [20.0, 35.0, 50.0, 61.0]
    bottom, top = plots.view(values, [18.0, 64.0])
    assert bottom < 18.0
    assert top > 64.0
    assert plots.view([90.0, 92.0, 95.0, 96.0, 10.0]) == (89.5, 96.5)
    assert plots.view([-2.0, -3.0, -1.0], [0.0])[1] > 0.0  # the zero line shows


def test_write_and_plots_from_results_draw_the_same_figures(tmp_path):
    records = synthetic(calibration_samples=64) + synthetic()
    written = report.write(records, tmp_path / "run")
    assert [p.name for p in written] == [
        "results.json",
        "results.csv",
        "accuracy.png",
        "distance.png",
    ]
    redrawn = plots_from_results(tmp_path / "run" / "results.json", tmp_path / "again")
    assert redrawn == [tmp_path / "again" / "accuracy.png", tmp_path / "again" / "distance.png"]
    for path in redrawn:
        assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_plots_from_results_reads_files_written_before_calibration_samples(tmp_path, drawn):
    rows = [r.as_dict() for r in synthetic()]
    for row in rows:
        del row["calibration_samples"]
    saved = tmp_path / "results.json"
    saved.write_text(json.dumps({"records": rows, "missing": []}))
    paths = plots_from_results(saved, tmp_path / "out")
    assert all(Path(p).exists() for p in paths)
    assert Record.from_dict(rows[0]).calibration_samples == "all"


def test_plots_from_results_refuses_a_file_without_records(tmp_path):
    saved = tmp_path / "results.json"
    saved.write_text(json.dumps({"records": [], "missing": []}))
    with pytest.raises(ValueError, match="results_json_path: expected records, got none"):
        plots_from_results(saved, tmp_path / "out")


def test_calibration_samples_get_panels_of_their_own(drawn):
    figure = drawn(synthetic(calibration_samples=64) + synthetic())
    titles = [ax.get_title() for ax in figure.axes[::2]]
    assert titles == [
        "numpy / mlp / digits / 5 epochs / shift none / 64 calibration samples",
        "numpy / mlp / digits / 5 epochs / shift none",
    ]


def test_a_collapse_of_most_strategies_is_shown_not_cut():
    # Under a strong shift, most strategies can collapse together while exact does not:
    # the median and its spread then sat at the collapse, and exact's 95% was drawn as an
    # off-scale triangle (the range was 5.75-15.2 before).
    collapsed = [10.0, 11.0, 10.0, 12.0, 10.5, 11.5]
    bottom, top = plots.view([*collapsed, 95.0, 94.0, 96.0])
    assert bottom < 10.0
    assert top > 96.0
    # a single collapsed mean among many is still left out
    assert plots.view([90.0, 91.0, 92.0, 93.0, 94.0, 95.0, 96.0, 10.0])[0] > 85.0
    # the zero line of a panel of differences always shows
    assert plots.view([-12.0, -11.0, -13.0], shown=[0.0])[1] > 0.0
