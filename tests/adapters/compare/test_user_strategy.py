"""The comparison with docs/strategies.md's ``LastK`` named by its import path.

``LastK`` (built with no arguments: ``k=8``) is tracked during training like ``welford``
and reported under its path. On digits at batch size 256 one epoch is at most 8 batches
(1797 samples in all), so after one epoch its window holds every training batch and its
statistics are Welford's pooled ones; after two epochs the window has dropped the first
batches and they differ. The built-in Welford named by path (``normstats:Welford``) must be
the ``welford`` records exactly.
"""

from __future__ import annotations

import json
import math

import pytest

from normstats.adapters.compare import cli, compare, report

PATH = "tests.user_strategies:LastK"
TINY = {"batch_sizes": [256], "seeds": 1, "workers": 1}
FLAGS = ["--batch-sizes", "256", "--seeds", "1", "--epochs", "1", "--workers", "1"]


@pytest.fixture(scope="module")
def records():
    """Both backends, one network each, one and two epochs."""
    strategies = ("exact", "welford", "normstats:Welford", PATH)
    return compare(
        "digits", backends=("torch", "numpy"), epochs=[1, 2], strategies=strategies, **TINY
    )


def by_strategy(records, backend, epochs):
    return {r.strategy: r for r in records if r.backend == backend and r.epochs == epochs}


@pytest.mark.parametrize("backend", ["torch", "numpy"])
def test_last_k_is_tracked_and_reported_under_its_path(records, backend):
    for epochs in (1, 2):
        found = by_strategy(records, backend, epochs)
        assert list(found) == ["exact", "welford", "normstats:Welford", PATH]
        last_k = found[PATH]
        assert math.isfinite(last_k.accuracy)
        assert last_k.accuracy > 0.5, last_k  # chance is 0.1
        assert len(last_k.stats_distance) == 2  # one per BatchNorm layer
        assert all(d is not None and math.isfinite(d) for d in last_k.stats_distance)
        # the built-in strategy by path is the built-in one
        named, by_path = found["welford"], found["normstats:Welford"]
        assert by_path.accuracy == named.accuracy
        assert by_path.stats_distance == named.stats_distance


@pytest.mark.parametrize("backend", ["torch", "numpy"])
def test_last_k_forgets_what_left_its_window(records, backend):
    one, two = by_strategy(records, backend, 1), by_strategy(records, backend, 2)
    # one epoch fits the window of 8 batches: the pooled statistics of every batch
    assert one[PATH].accuracy == one["welford"].accuracy
    assert one[PATH].stats_distance == pytest.approx(one["welford"].stats_distance, rel=1e-9)
    # two epochs do not: the window has dropped the first batches, Welford has not
    assert two[PATH].stats_distance != pytest.approx(two["welford"].stats_distance, rel=1e-6)


def test_cli_runs_a_strategy_by_path(tmp_path, capsys):
    argv = ["compare", "--backend", "numpy", *FLAGS, "--strategies", f"exact,{PATH}"]
    assert cli.main([*argv, "--quiet", "--out", str(tmp_path / "out")]) == 0
    saved = json.loads((tmp_path / "out" / "results.json").read_text())["records"]
    assert [r["strategy"] for r in saved] == ["exact", PATH]
    assert all(math.isfinite(r["accuracy"]) for r in saved)
    table = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(table) if line.startswith("strategy"))
    assert table[header + 2].startswith(PATH + " ")
    # the names column fits the path: every line of the table is as long as its header
    assert len(table[header + 1]) == len(table[header + 2]) == len(table[header])


def test_table_column_fits_a_long_name(records):
    lines = report.table(records).splitlines()
    headers = [i for i, line in enumerate(lines) if line.startswith("strategy")]
    assert len(headers) == 4  # backends x training lengths
    for i in headers:
        rows = lines[i + 1 : i + 5]
        assert [row.split()[0] for row in rows] == ["exact", "welford", "normstats:Welford", PATH]
        assert {len(row) for row in rows} == {len(lines[i])}


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("nope.mod:X", "cannot import module 'nope.mod'"),
        ("tests.user_strategies:LastQ", "has no attribute 'LastQ'"),
        ("tests.helpers:StrategyConfig", "subclass of normstats.Strategy"),
    ],
)
def test_cli_bad_path_exits_2_with_one_line_naming_the_option(tmp_path, capsys, path, reason):
    out = tmp_path / "out"
    argv = ["compare", *FLAGS, "--strategies", f"exact,{path}", "--out", str(out)]
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"normstats compare: --strategies: {path!r}: "), lines[0]
    assert reason in lines[0]
    assert "name: " not in lines[0]  # make_stats' parameter means nothing on the command line
    assert not out.exists()
