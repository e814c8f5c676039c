"""Covariate shifts of the test split (``--shift``) and the test batch size.

Each shift against its formula computed here on the standardized test inputs; ``none``
always evaluated first and unchanged by the others; translate refused on flat features;
``--test-batch-size`` changes only what uses test batches.
"""

from __future__ import annotations

import numpy as np
import pytest

from normstats.adapters.compare import cli, compare, shifts
from normstats.adapters.compare.data import load

from .conftest import blobs
from .test_cli_options import run_main

SMALL = {"backends": ["numpy"], "batch_sizes": [32], "seeds": 1, "epochs": [1]}


@pytest.fixture(scope="module")
def digits():
    return load("digits")


def test_noise_is_seeded_gaussian_with_sigma_the_severity(digits):
    x = digits.X_test
    expected = x + 0.7 * np.random.default_rng(3).standard_normal(x.shape)
    np.testing.assert_array_equal(shifts.apply("noise:0.7", x, digits.image_shape, 3), expected)
    other_seed = shifts.apply("noise:0.7", x, digits.image_shape, 4)
    assert not np.array_equal(other_seed, expected)
    noise = expected - x
    assert abs(noise.std() - 0.7) < 0.01


@pytest.mark.parametrize(("name", "formula"), [("contrast:0.4", 0.6), ("offset:-1.5", None)])
def test_contrast_and_offset(digits, name, formula):
    x = digits.X_test
    found = shifts.apply(name, x, digits.image_shape, 0)
    expected = x * formula if formula is not None else x - 1.5
    np.testing.assert_array_equal(found, expected)


@pytest.mark.parametrize("k", [2, -3])
def test_translate_moves_digits_images_by_pixels_with_zero_fill(digits, k):
    x = digits.X_test
    found = shifts.apply(f"translate:{k}", x, digits.image_shape, 0).reshape(-1, 8, 8)
    images = x.reshape(-1, 8, 8)
    for column in range(8):
        source = column - k
        if 0 <= source < 8:
            np.testing.assert_array_equal(found[:, :, column], images[:, :, source])
        else:
            assert (found[:, :, column] == 0).all()


def test_translate_moves_a_signal_along_its_sequence():
    signals = np.arange(2 * 40, dtype=np.float64).reshape(2, 40)
    found = shifts.apply("translate:5", signals, (1, 40), 0)
    np.testing.assert_array_equal(found[:, 5:], signals[:, :35])
    np.testing.assert_array_equal(found[:, :5], 0.0)


def test_none_is_always_first_and_leaves_the_test_set_as_it_is(digits):
    assert shifts.parse("noise:0.5,offset:1") == ("none", "noise:0.5", "offset:1")
    assert shifts.parse("offset:1,none") == ("none", "offset:1")
    assert shifts.apply("none", digits.X_test, digits.image_shape, 0) is digits.X_test


def test_shifted_records_follow_the_unshifted_ones_which_do_not_change():
    plain = compare("digits", **SMALL, strategies="exact,batch")
    shifted = compare("digits", **SMALL, strategies="exact,batch", shifts="offset:0,contrast:1")
    assert [(r.shift, r.strategy) for r in shifted] == [
        ("none", "exact"),
        ("none", "batch"),
        ("offset:0", "exact"),
        ("offset:0", "batch"),
        ("contrast:1", "exact"),
        ("contrast:1", "batch"),
    ]
    assert shifted[:2] == plain
    # offset 0 is the identity: the same accuracy as unshifted
    assert [r.accuracy for r in shifted[2:4]] == [r.accuracy for r in plain]
    # contrast 1 makes every test input the training mean: one class for all of them
    constant = shifted[4]
    counts = np.bincount(load("digits").y_test)
    assert constant.accuracy in {c / 450 for c in counts}


def test_offset_lowers_the_exact_statistics_accuracy():
    records = compare("digits", **SMALL, strategies="exact", shifts="offset:3")
    assert records[1].accuracy < records[0].accuracy - 0.2


def test_test_batch_size_changes_only_batch_statistics():
    small = compare("digits", **SMALL, strategies="exact,batch", test_batch_size=4)
    large = compare("digits", **SMALL, strategies="exact,batch", test_batch_size=450)
    assert small[0] == large[0].__class__(**{**large[0].as_dict(), "test_batch_size": 4})
    assert small[1].accuracy < large[1].accuracy
    assert (small[1].test_batch_size, large[1].test_batch_size) == (4, 450)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            "blur:1",
            "--shift: expected none or NAME:SEVERITY with NAME one of noise, contrast, offset, "
            "translate (as noise:0.5), got 'blur:1'",
        ),
        (
            "noise",
            "--shift: expected none or NAME:SEVERITY with NAME one of noise, contrast, "
            "offset, translate (as noise:0.5), got 'noise'",
        ),
        ("noise:-1", "--shift: 'noise:-1': expected a noise sigma >= 0, got -1"),
        ("contrast:2", "--shift: 'contrast:2': expected a contrast severity in [0, 1], got 2"),
        ("offset:x", "--shift: 'offset:x': expected a number after offset:"),
        ("offset:inf", "--shift: 'offset:inf': expected a finite severity, got inf"),
        (
            "translate:1.5",
            "--shift: 'translate:1.5': expected a whole number of positions, got 1.5",
        ),
        (
            "translate:8",
            "--shift: 'translate:8': expected fewer positions than the sample's last axis (8), "
            "got 8",
        ),
        ("noise:1,noise:1", "--shift: expected each shift once, got noise:1 twice"),
    ],
)
def test_bad_shifts_exit_2_with_one_line(tmp_path, capsys, value, message):
    argv = ["compare", "--backend", "numpy", "--batch-sizes", "64", "--epochs", "1", "--quiet"]
    argv += ["--workers", "1", "--shift", value, "--out", str(tmp_path / "out")]
    code, out, err = run_main(argv, capsys)
    assert code == 2
    assert err == f"normstats compare: {message}\n"
    assert out == ""
    assert not (tmp_path / "out").exists()


def test_translate_is_refused_on_flat_features(write_npz, capsys, tmp_path):
    x, y = blobs()
    path = write_npz("flat.npz", X=x, y=y)
    argv = ["compare", "--dataset", str(path), "--backend", "numpy", "--batch-sizes", "16"]
    argv += ["--workers", "1", "--shift", "translate:1", "--out", str(tmp_path / "out")]
    code, _, err = run_main(argv, capsys)
    assert code == 2
    assert err == (
        "normstats compare: --shift: 'translate:1': translate needs samples with a spatial "
        f"axis (images or signals), got flat features in {path} (an .npz whose X is 2-D)\n"
    )


def test_user_npz_takes_noise_and_an_image_npz_translate(write_npz):
    x, y = blobs(d=6)
    flat = compare(str(write_npz("flat.npz", X=x, y=y)), **SMALL, strategies="exact",
                   shifts="noise:0.5,contrast:0.5")  # fmt: skip
    assert [r.shift for r in flat] == ["none", "noise:0.5", "contrast:0.5"]
    images = compare(str(write_npz("img.npz", X=x.reshape(-1, 2, 3), y=y)), **SMALL,
                     strategies="exact", shifts="translate:1")  # fmt: skip
    assert [r.shift for r in images] == ["none", "translate:1"]


def test_cli_shift_option_reaches_the_records(tmp_path, capsys):
    argv = ["compare", "--backend", "numpy", "--batch-sizes", "64", "--epochs", "1", "--quiet"]
    argv += ["--workers", "1", "--seeds", "1", "--strategies", "exact", "--shift", "noise:1"]
    code, out, _ = run_main([*argv, "--out", str(tmp_path / "out")], capsys)
    assert code == 0
    assert "noise:1" in out
    assert cli.parser().parse_args(["compare"]).shift == "none"
