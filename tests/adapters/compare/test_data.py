"""The comparison's datasets: digits, MNIST-1D generated offline and cached, and a
user's .npz with ``x``/``y``, whose mistakes are reported with the path; inputs standardized
with statistics of the training split only.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from normstats.adapters.compare import compare
from normstats.adapters.compare.data import Dataset, DatasetError, load

from .conftest import blobs

# -- a user's .npz -------------------------------------------------------------------------


def test_user_npz_trains(write_npz):
    x, y = blobs()
    path = write_npz("mine.npz", X=x, y=y)
    data = load(str(path))
    assert isinstance(data, Dataset)
    assert data.name == str(path)
    assert data.X_train.shape == (90, 6)
    assert data.X_test.shape == (30, 6)
    assert data.num_classes == 3
    records = compare(str(path), batch_sizes=[16], seeds=1, epochs=[2], workers=1)
    assert len(records) == 2 * 7
    for record in records:
        assert record.dataset == str(path)
        assert 0.0 <= record.accuracy <= 1.0
    exact = [r for r in records if r.strategy == "exact"]
    assert all(r.accuracy > 0.6 for r in exact), exact  # separable blobs; chance is 1/3


def test_user_npz_trains_a_torch_cnn(write_npz):
    pytest.importorskip("torch")
    x, y = blobs(d=10)
    path = write_npz("mine.npz", X=x.astype(np.float32), y=y.astype(np.int32))
    records = compare(
        str(path), backends=["torch"], model="cnn", batch_sizes=[16], seeds=1, epochs=[1]
    )
    assert len(records) == 7
    assert all(0.0 <= r.accuracy <= 1.0 for r in records)


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "no such.npz"
    with pytest.raises(DatasetError, match="--dataset") as caught:
        load(str(path))
    assert str(path) in str(caught.value)
    with pytest.raises(ValueError, match="no such file"):
        compare(str(path), batch_sizes=[16], seeds=1, epochs=[1])


def _garbage(path: Path) -> None:
    path.write_bytes(bytes(range(256)) * 8)


def _text(path: Path) -> None:
    path.write_text("X,y\n1,2\n")


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _npy(path: Path) -> None:
    with open(path, "wb") as handle:  # one array in .npy format, named .npz
        np.save(handle, np.zeros((10, 3)))


def _directory(path: Path) -> None:
    path.mkdir()


@pytest.mark.parametrize(
    "make",
    [_garbage, _text, _empty, _npy, _directory],
    ids=["garbage", "text", "empty", "npy", "directory"],
)
def test_not_an_npz_names_the_path(tmp_path, make):
    path = tmp_path / "data.npz"
    make(path)
    with pytest.raises(DatasetError, match="--dataset") as caught:
        load(str(path))
    assert str(path) in str(caught.value)


@pytest.mark.parametrize("missing", ["X", "y"])
def test_npz_without_x_or_y_names_the_path_and_array(write_npz, missing):
    x, y = blobs()
    arrays = {"X": x, "y": y}
    del arrays[missing]
    path = write_npz("partial.npz", features=x, **arrays)
    with pytest.raises(DatasetError) as caught:
        load(str(path))
    assert str(path) in str(caught.value)
    assert repr(missing) in str(caught.value)


def test_mismatched_lengths_name_the_path(write_npz):
    x, y = blobs()
    path = write_npz("short.npz", X=x, y=y[:-5])
    with pytest.raises(DatasetError, match="rows") as caught:
        load(str(path))
    assert str(path) in str(caught.value)


@pytest.mark.parametrize(
    "labels",
    [
        np.arange(120) % 3 * 1.0,
        np.arange(120) % 3 + 0.5,
        np.array(["a", "b", "c"] * 40),
        np.array([0, "b", None] * 40, dtype=object),
        np.arange(120) % 2 == 0,
    ],
    ids=["float-integral", "float", "string", "object", "bool"],
)
def test_non_integer_labels_name_the_path(write_npz, labels):
    x, _ = blobs()
    path = write_npz("labels.npz", X=x, y=labels)
    with pytest.raises(DatasetError) as caught:
        load(str(path))
    assert str(path) in str(caught.value)


def test_negative_labels_name_the_path(write_npz):
    x, y = blobs()
    path = write_npz("negative.npz", X=x, y=y - 1)
    with pytest.raises(DatasetError) as caught:
        load(str(path))
    assert str(path) in str(caught.value)


def test_non_numeric_features_name_the_path(write_npz):
    _, y = blobs()
    path = write_npz("strings.npz", X=np.array([["a", "b"]] * 120), y=y)
    with pytest.raises(DatasetError) as caught:
        load(str(path))
    assert str(path) in str(caught.value)


@pytest.mark.parametrize(
    "arrays",
    [
        {"X": np.zeros((0, 3)), "y": np.zeros(0, dtype=np.int64)},
        {"X": np.arange(20.0).reshape(10, 2), "y": np.arange(10)},
    ],
    ids=["no-samples", "one-sample-per-class"],
)
def test_npz_too_small_to_split_names_the_path(write_npz, arrays):
    """Beyond the listed mistakes: data a stratified 75/25 split cannot take."""
    path = write_npz("small.npz", **arrays)
    with pytest.raises(DatasetError) as caught:
        load(str(path))
    assert str(path) in str(caught.value)


def _with_nan(x: Any) -> Any:
    x = x.copy()
    x[7, 3] = np.nan
    return x


def _with_inf(x: Any) -> Any:
    x = x.copy()
    x[[9, 11], 0] = -np.inf
    return x


MALFORMED = {
    # name: (arrays from blobs' x and y, the array the message names, a word it holds)
    "object-X": (lambda x, y: {"X": x.astype(object), "y": y}, "X", "objects"),
    "0-d-X": (lambda x, y: {"X": np.array(1.0), "y": y}, "X", "shape ()"),
    "0-d-y": (lambda x, y: {"X": x, "y": np.array(1)}, "y", "shape ()"),
    "1-d-X": (lambda x, y: {"X": x[:, 0], "y": y}, "X", "shape (120,)"),
    "2-d-y": (lambda x, y: {"X": x, "y": np.stack([y, y], axis=1)}, "y", "shape (120, 2)"),
    "nan-in-X": (lambda x, y: {"X": _with_nan(x), "y": y}, "X", "NaN or Inf in 1 of 120"),
    "inf-in-X": (lambda x, y: {"X": _with_inf(x), "y": y}, "X", "NaN or Inf in 2 of 120"),
    "complex-X": (lambda x, y: {"X": x + 1j, "y": y}, "X", "complex128"),
    "no-features": (lambda x, y: {"X": x[:, :0], "y": y}, "X", "at least one feature"),
    "squares-overflow": (lambda x, y: {"X": x * 1e300, "y": y}, "X", "overflow"),
    "labels-with-a-gap": (lambda x, y: {"X": x, "y": np.where(y == 2, 10**12, y)}, "y", "0..K-1"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_npz_names_the_path_and_the_array(write_npz, case):
    # Before the fix: 0-d arrays raised TypeError (len() of unsized object), a 1-d X an
    # IndexError, a 2-d y "object too deep", NaN or Inf a ValueError naming neither file nor
    # array, complex X was cast to real (a ComplexWarning, imaginary part dropped), an X
    # without features loaded, and a label of 10**12 tried to allocate 7.3 TiB.
    make, name, word = MALFORMED[case]
    x, y = blobs()
    path = write_npz("bad.npz", **make(x, y))
    with pytest.raises(DatasetError) as caught:
        load(str(path))
    message = str(caught.value)
    assert message.startswith(f"--dataset: {path}: ")
    assert f": {name} " in message or f"({name}" in message or f"{name} must" in message
    assert word in message


@pytest.mark.parametrize("dtype", [np.uint8, np.uint64, np.int32])
def test_labels_of_any_integer_dtype_load(write_npz, dtype):
    x, y = blobs()
    data = load(str(write_npz("labels.npz", X=x.astype(np.float16), y=y.astype(dtype))))
    assert data.num_classes == 3
    assert data.y_train.dtype == np.int64
    assert np.isfinite(data.X_train).all()


# -- standardization with the training split -----------------------------------------------


def assert_standardized(x: Any) -> None:
    np.testing.assert_allclose(x.mean(axis=0), 0, atol=1e-9)
    std = x.std(axis=0)
    varying = std > 1e-12
    np.testing.assert_allclose(std[varying], 1, rtol=1e-9)
    np.testing.assert_array_equal(x[:, ~varying], 0)  # constant columns stay at zero


def test_digits_standardized_with_the_training_split():
    data = load("digits")
    assert data.name == "digits"
    assert data.image_shape == (1, 8, 8)
    assert data.X_train.shape[1] == data.X_test.shape[1] == 64
    assert (data.X_train.std(axis=0) < 1e-12).any()  # digits has constant pixels
    assert_standardized(data.X_train)
    assert not np.allclose(data.X_test.mean(axis=0), 0, atol=1e-6)
    both = np.concatenate([data.X_train, data.X_test])
    assert not np.allclose(both.mean(axis=0), 0, atol=1e-6)  # not fitted on everything


def test_npz_standardized_with_training_statistics_applied_to_test(write_npz):
    """Recover which raw rows went where (column 0 is a row index), then redo the scaling."""
    x, y = blobs()
    x[:, 0] = 3.0 * np.arange(len(x)) + 7.0
    data = load(str(write_npz("indexed.npz", X=x, y=y)))
    assert_standardized(data.X_train)
    values = np.concatenate([data.X_train[:, 0], data.X_test[:, 0]])
    rank = np.empty(len(values), dtype=np.int64)
    rank[np.argsort(values)] = np.arange(len(values))  # the scaling keeps the order
    train, test = rank[: len(data.X_train)], rank[len(data.X_train) :]
    np.testing.assert_array_equal(data.y_train, y[train])
    np.testing.assert_array_equal(data.y_test, y[test])
    mean, std = x[train].mean(axis=0), x[train].std(axis=0)
    np.testing.assert_allclose(data.X_train, (x[train] - mean) / std, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(data.X_test, (x[test] - mean) / std, rtol=1e-9, atol=1e-9)


# -- MNIST-1D, generated offline, cached ---------------------------------------------------


@pytest.fixture(scope="module")
def mnist1d_cache(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Dataset]:
    """One generation (a few seconds) into a fresh cache, with the network unreachable."""
    pytest.importorskip("mnist1d")
    cache = tmp_path_factory.mktemp("cache")

    def offline(*args: Any, **kwargs: Any) -> None:
        raise OSError("network access during an offline dataset generation")

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(cache))
        patch.setattr(socket.socket, "connect", offline)
        patch.setattr(socket, "create_connection", offline)
        assert not (cache / "normstats" / "mnist1d.npz").exists()
        data = load("mnist1d")
    return cache, data


def test_mnist1d_generated_and_cached(mnist1d_cache):
    cache, data = mnist1d_cache
    path = cache / "normstats" / "mnist1d.npz"
    assert path.is_file()
    with np.load(path) as stored:
        assert {"x", "y", "x_test", "y_test"} <= set(stored.files)
        assert len(stored["x"]) == len(data.X_train)
        assert len(stored["x_test"]) == len(data.X_test)
    assert data.name == "mnist1d"
    assert data.X_train.shape == (4000, 40)
    assert data.X_test.shape == (1000, 40)
    assert data.image_shape == (1, 40)
    assert data.num_classes == 10
    assert set(np.unique(data.y_train)) == set(range(10))
    assert_standardized(data.X_train)
    assert not np.allclose(data.X_test.mean(axis=0), 0, atol=1e-6)


def test_mnist1d_second_load_reads_the_cache(mnist1d_cache, monkeypatch):
    import mnist1d.data

    cache, data = mnist1d_cache

    def no_generation(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("generated again instead of reading the cache")

    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    monkeypatch.setattr(mnist1d.data, "make_dataset", no_generation)
    again = load("mnist1d")
    np.testing.assert_array_equal(again.X_train, data.X_train)
    np.testing.assert_array_equal(again.y_test, data.y_test)


def test_mnist1d_torch_cnn_runs(mnist1d_cache, monkeypatch):
    """One tiny run of the natural model there, a 1-D CNN with BatchNorm1d."""
    pytest.importorskip("torch")
    cache, _ = mnist1d_cache
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    records = compare(
        "mnist1d",
        backends=["torch"],
        model="cnn",
        batch_sizes=[64],
        seeds=1,
        epochs=[1],
        strategies=["exact", "batch"],
    )
    assert [(r.dataset, r.model, r.strategy) for r in records] == [
        ("mnist1d", "cnn", "exact"),
        ("mnist1d", "cnn", "batch"),
    ]
    assert records[0].stats_distance == [0.0, 0.0, 0.0]
    assert records[0].accuracy > 0.3  # chance is 0.1


@pytest.mark.parametrize(
    ("shape", "image_shape"),
    [((6,), (1, 6)), ((4, 5), (1, 4, 5)), ((3, 4, 5), (3, 4, 5))],
    ids=["rows", "one-channel", "channels-first"],
)
def test_npz_sample_shape_keeps_the_channels(write_npz, shape, image_shape):
    # (n, C, H, W) was read as a one-channel (1, C, H, W) sample, which no CNN could take
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 40)
    path = write_npz("images.npz", X=rng.normal(size=(len(y), *shape)), y=y)
    data = load(str(path))
    assert data.image_shape == image_shape
    assert data.X_train.shape == (90, int(np.prod(shape)))


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_npz_channels_first_images_train_a_cnn(write_npz, backend):
    if backend == "torch":
        pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(2), 40)
    x = rng.normal(size=(len(y), 3, 4, 4)) + y[:, None, None, None]
    path = write_npz("rgb.npz", X=x, y=y)
    records = compare(
        str(path),
        backends=[backend],
        model="cnn",
        batch_sizes=[16],
        seeds=1,
        epochs=[1],
        strategies=["exact"],
        workers=1,
    )
    assert [r.strategy for r in records] == ["exact"]
    assert 0.0 <= records[0].accuracy <= 1.0


def test_npz_of_more_than_four_dimensions_names_the_shape(write_npz):
    y = np.repeat(np.arange(2), 40)
    path = write_npz("volumes.npz", X=np.zeros((len(y), 1, 2, 2, 2)), y=y)
    with pytest.raises(DatasetError, match=r"channels-first images \(n, C, H, W\), got shape"):
        load(str(path))
