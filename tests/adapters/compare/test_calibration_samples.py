"""``--calibration-samples``: the exact pass on a seeded random subset of the training set.

The subsets (sizes, nesting, seeding), ``all`` reproducing the whole-set records, the
subset feeding ``exact``, ``exact-layerwise`` and the test-time strategies' source, the
distance from the whole-set exact statistics shrinking as the subset grows, and the option's
validation. Also: ``exact`` is evaluated with its own statistics wherever it stands in
``--strategies``.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from normstats.adapters.compare import compare, runner
from normstats.adapters.compare.backends import NumpyRun
from normstats.adapters.compare.data import load

from .test_cli_options import TINY, run_main

DIGITS_TRAIN = 1347
"""Samples in the digits training split."""

ONE = {"backends": ["numpy"], "batch_sizes": [64], "seeds": 1, "epochs": [1], "workers": 1}


def without_samples(record: Any) -> dict[str, Any]:
    row = record.as_dict()
    del row["calibration_samples"]
    return row


def test_subsets_have_the_size_asked_nested_sorted_and_seeded():
    subsets = {c: runner.calibration_subset(DIGITS_TRAIN, c, seed=3) for c in (2, 64, 256, 1024)}
    for size, rows in subsets.items():
        assert rows is not None
        assert len(rows) == len(set(rows.tolist())) == size
        assert rows.min() >= 0
        assert rows.max() < DIGITS_TRAIN
        assert np.all(np.diff(rows) > 0)  # in the training set's order
    assert set(subsets[64]) <= set(subsets[256]) <= set(subsets[1024])
    again = runner.calibration_subset(DIGITS_TRAIN, 64, seed=3)
    other = runner.calibration_subset(DIGITS_TRAIN, 64, seed=4)
    np.testing.assert_array_equal(again, subsets[64])
    assert not np.array_equal(other, subsets[64])
    expected = np.sort(np.random.default_rng(3).permutation(DIGITS_TRAIN)[:64])
    np.testing.assert_array_equal(subsets[64], expected)
    assert runner.calibration_subset(DIGITS_TRAIN, "all", seed=3) is None


def test_calibration_batches_of_a_subset_hold_exactly_its_rows():
    run = NumpyRun(load("digits"), "mlp", 0, ())
    rows = runner.calibration_subset(len(run.X_train), 100, seed=0)
    found = run.calibration_batches(32, rows)
    assert [len(b) for b in found] == [32, 32, 32, 4]  # a last, shorter batch is kept
    np.testing.assert_array_equal(np.concatenate(found), run.X_train[rows])


def test_all_is_the_default_and_the_whole_training_set():
    strategies = ("exact", "exact-layerwise", "ema:0.1", "batch", "prior:16", "stream:welford")
    default = compare("digits", strategies=strategies, shifts=("offset:0.5",), **ONE)
    explicit = compare(
        "digits", strategies=strategies, shifts=("offset:0.5",), calibration_samples="all", **ONE
    )
    whole = compare(
        "digits",
        strategies=strategies,
        shifts=("offset:0.5",),
        calibration_samples=[DIGITS_TRAIN],
        **ONE,
    )
    assert default == explicit
    assert {r.calibration_samples for r in default} == {"all"}
    assert {r.calibration_samples for r in whole} == {DIGITS_TRAIN}
    assert [without_samples(r) for r in whole] == [without_samples(r) for r in default]


def test_each_value_is_a_record_axis_and_only_calibrated_strategies_change():
    strategies = ("exact", "exact-layerwise", "welford", "batch", "prior:100000")
    records = compare(
        "digits", strategies=strategies, calibration_samples=[32, "all"], **{**ONE, "seeds": [0]}
    )
    assert [(r.calibration_samples, r.strategy) for r in records] == [
        (c, s) for c in (32, "all") for s in strategies
    ]
    by = {(r.calibration_samples, r.strategy): r for r in records}
    for name in ("welford", "batch"):  # neither uses the exact pass
        assert without_samples(by[(32, name)]) == without_samples(by[("all", name)])
    # the distances are from the whole training set's exact statistics
    assert by[("all", "exact")].stats_distance == [0.0, 0.0]
    assert min(by[(32, "exact")].stats_distance) > 0.01  # type: ignore[type-var]
    assert (
        by[(32, "exact-layerwise")].stats_distance != by[("all", "exact-layerwise")].stats_distance
    )
    # prior:N with N >> the test batch is its source statistics: the subset's exact ones
    for samples in (32, "all"):
        assert by[(samples, "prior:100000")].accuracy == by[(samples, "exact")].accuracy


def test_distance_from_the_whole_set_statistics_shrinks_as_samples_grow():
    sizes = [16, 128, 1024, "all"]
    records = compare(
        "digits", strategies=["exact"], calibration_samples=sizes, **{**ONE, "seeds": 2}
    )
    mean = {
        size: np.mean([r.stats_distance for r in records if r.calibration_samples == size])
        for size in sizes
    }
    assert mean["all"] == 0.0
    assert mean[16] > mean[128] > mean[1024] > mean["all"]
    assert mean[16] > 2 * mean[1024]


def test_exact_is_evaluated_with_its_own_statistics_wherever_it_is_listed():
    # Before: listed after a tracked strategy, exact was evaluated with that strategy's
    # statistics (on digits b=16 seed 0, exact read 0.9444, ema:0.01's accuracy; 0.9467 now).
    first = compare("digits", strategies=["exact", "ema:0.01"], **ONE)
    last = compare("digits", strategies=["ema:0.01", "exact"], **ONE)
    assert sorted(first, key=repr) == sorted(last, key=repr)


# -- validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "parsed"),
    [
        ("all", ("all",)),
        ("64,256,1024,all", (64, 256, 1024, "all")),
        (" 2 , all,", (2, "all")),
        ([np.int64(64), "all"], (64, "all")),
        ((1024, 64), (1024, 64)),
    ],
)
def test_calibration_sample_list_takes_exactly_the_values_given(given, parsed):
    assert runner.calibration_sample_list(given) == parsed


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("1", "expected integers >= 2 or 'all', got '1'"),
        ("64,abc", "expected integers >= 2 or 'all', got '64,abc'"),
        ("64,ALL", "expected integers >= 2 or 'all', got '64,ALL'"),
        ("64.5", "expected integers >= 2 or 'all', got '64.5'"),
        (",", "expected integers >= 2 or 'all', got ','"),
        ("64,all,64", "expected each value once, got [64] more than once"),
        (
            "64,2000",
            "expected at most the training set's 1347 samples (digits) or 'all', got [2000]",
        ),
    ],
)
def test_bad_calibration_samples_exit_2_with_one_line_before_training(
    tmp_path, capsys, value, message
):
    out = tmp_path / "out"
    argv = ["compare", *TINY, "--calibration-samples", value, "--out", str(out)]
    code, printed, err = run_main(argv, capsys)
    assert code == 2
    assert err == f"normstats compare: --calibration-samples: {message}\n"
    assert printed == ""
    assert not out.exists()


@pytest.mark.parametrize("value", [[True], [1.5], [64, None], []])
def test_calibration_sample_list_refuses_non_integers(value):
    with pytest.raises(ValueError, match="--calibration-samples: expected integers >= 2"):
        runner.calibration_sample_list(value)


def test_the_option_reaches_the_records(tmp_path, capsys):
    argv = ["compare", *TINY, "--seeds", "1", "--calibration-samples", "64,all"]
    code, printed, _ = run_main([*argv, "--out", str(tmp_path)], capsys)
    assert code == 0
    rows = json.loads((tmp_path / "results.json").read_text())["records"]
    assert [(r["strategy"], r["calibration_samples"]) for r in rows] == [
        ("exact", 64),
        ("exact", "all"),
    ]
    assert "64 calibration samples" in printed
