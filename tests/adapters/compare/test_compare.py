"""``compare(...)``, the comparison as a Python function.

One record per backend x batch size x seed x training length x strategy, with the fields of
``Record``; deterministic per seed and independent of ``workers``; accuracies well above
chance on digits; the calibration batch size recorded and shaping the one-pass exact
statistics; the torch CNN; clear ``ValueError``s that name the option.
"""

from __future__ import annotations

import itertools
import math
import re
from collections import Counter

import attrs
import numpy as np
import pytest

from normstats.adapters.compare import Record, compare, report, runner, strategies
from normstats.adapters.compare.backends import HIDDEN, NumpyRun, TorchRun
from normstats.adapters.compare.data import load

from .conftest import GRID, RECORD_FIELDS

DEFAULT_STRATEGIES = (
    "exact",
    "exact-layerwise",
    "cumulative",
    "ema:0.1",
    "ema:0.01",
    "welford",
    "batch",
)

SMALL = {"batch_sizes": [64], "seeds": 2, "epochs": [1]}


def network(record: Record) -> tuple[object, ...]:
    return (record.backend, record.batch_size, record.seed, record.epochs)


# -- the records ---------------------------------------------------------------------------


def test_record_has_the_documented_fields():
    assert tuple(field.name for field in attrs.fields(Record)) == RECORD_FIELDS


def test_default_strategies_are_exactly_the_documented_ones(grid):
    assert strategies.DEFAULT == DEFAULT_STRATEGIES
    by_network: dict[tuple[object, ...], list[str]] = {}
    for record in grid:
        by_network.setdefault(network(record), []).append(record.strategy)
    assert by_network
    for names in by_network.values():
        assert tuple(names) == DEFAULT_STRATEGIES


def test_one_record_per_backend_batch_size_seed_epochs_and_strategy(grid):
    expected = set(
        itertools.product(
            GRID["backends"],
            GRID["batch_sizes"],
            range(GRID["seeds"]),
            GRID["epochs"],
            DEFAULT_STRATEGIES,
        )
    )
    found = Counter((r.backend, r.batch_size, r.seed, r.epochs, r.strategy) for r in grid)
    assert set(found) == expected
    assert set(found.values()) == {1}
    assert len(grid) == 2 * 2 * 2 * 2 * 7


def test_record_values(grid):
    for record in grid:
        assert isinstance(record, Record)
        assert record.model == "mlp"
        assert record.dataset == "digits"
        assert isinstance(record.batch_size, int)
        assert isinstance(record.seed, int)
        assert isinstance(record.epochs, int)
        assert isinstance(record.accuracy, float)
        assert 0.0 <= record.accuracy <= 1.0
        assert record.calibration_batch_size == record.batch_size  # the default
        assert isinstance(record.stats_distance, list)
        assert all(isinstance(d, float) for d in record.stats_distance)
        assert record.stats_distance_note == ""  # nothing missing on digits


def test_stats_distance_one_float_per_batchnorm_layer(grid):
    for record in grid:
        if record.strategy == "batch":
            assert record.stats_distance == []
        elif record.strategy == "exact":
            assert record.stats_distance == [0.0] * len(HIDDEN)
        else:
            assert len(record.stats_distance) == len(HIDDEN)
            assert all(math.isfinite(d) and d >= 0 for d in record.stats_distance)


def test_tracked_strategies_are_not_the_exact_statistics(grid):
    """The training-time estimates differ from the full pass (else the distance is vacuous)."""
    for record in grid:
        if record.strategy in ("cumulative", "welford", "ema:0.1", "ema:0.01"):
            assert max(record.stats_distance) > 1e-3, record


def test_epochs_list_evaluates_at_every_training_length(grid):
    assert {r.epochs for r in grid} == set(GRID["epochs"])
    first = {(r.backend, r.batch_size, r.seed, r.strategy): r for r in grid if r.epochs == 1}
    for record in grid:
        if record.epochs == 2 and record.strategy == "exact-layerwise":
            earlier = first[(record.backend, record.batch_size, record.seed, record.strategy)]
            assert record.stats_distance != earlier.stats_distance  # trained further


def test_sweeping_epochs_matches_training_to_the_last_length_alone(grid):
    """Evaluating after epoch 1 does not disturb the training that goes on to epoch 2."""
    alone = compare("digits", backends=GRID["backends"], batch_sizes=[64], seeds=1, epochs=[2])
    swept = [r for r in grid if r.batch_size == 64 and r.seed == 0 and r.epochs == 2]
    assert len(alone) == len(swept)
    for a, b in zip(sorted(alone, key=_key), sorted(swept, key=_key), strict=True):
        # the tracked strategies fold their batches in chunks, which the evaluation after
        # epoch 1 ends early: the same statistics up to rounding
        assert attrs.evolve(a, stats_distance=[]) == attrs.evolve(b, stats_distance=[])
        assert a.stats_distance == pytest.approx(b.stats_distance, rel=1e-12, abs=0)


def _key(record):
    return (record.backend, record.strategy)


@pytest.mark.parametrize("backend", ["torch", "numpy"])
def test_accuracy_on_digits_is_well_above_chance(grid, backend):
    for record in grid:
        if record.backend == backend and record.batch_size == 64 and record.epochs == 2:
            if record.strategy in ("exact", "exact-layerwise"):
                assert record.accuracy > 0.8, record
            assert record.accuracy > 0.5, record  # chance is 0.1


def test_deterministic_per_seed():
    first = compare("digits", **SMALL, workers=1)
    again = compare("digits", **SMALL, workers=1)
    assert first == again
    seed0 = [attrs.evolve(r, seed=1) for r in first if r.seed == 0]
    seed1 = [r for r in first if r.seed == 1]
    assert seed0 != seed1  # another seed trains another network


def test_workers_do_not_change_the_records(grid):
    assert compare("digits", **GRID, workers=2) == grid


def test_strategies_argument_selects_and_orders(grid):
    records = compare(
        "digits", backends=["numpy"], strategies="batch, exact", **{**SMALL, "seeds": 1}
    )
    assert [r.strategy for r in records] == ["batch", "exact"]
    same = [r for r in grid if r.backend == "numpy" and r.batch_size == 64 and r.seed == 0]
    same = [r for r in same if r.epochs == 1 and r.strategy in ("batch", "exact")]
    assert sorted(records, key=repr) == sorted(same, key=repr)


# -- calibration batch size ----------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "numpy"])
def test_calibration_batch_size_is_recorded_and_shapes_the_one_pass_statistics(backend):
    """The one-pass exact statistics of a deeper layer depend on the batches that flow
    (the layers above normalize with batch statistics during the pass); layer by layer they
    do not. So the distance between the two grows for small calibration batches."""
    kwargs = {
        "backends": [backend],
        "batch_sizes": [64],
        "seeds": 1,
        "epochs": [1],
        "strategies": ["exact", "exact-layerwise"],
    }
    default = compare("digits", **kwargs)
    small = compare("digits", calibration_batch_size=4, **kwargs)
    assert {r.calibration_batch_size for r in default} == {64}
    assert {r.calibration_batch_size for r in small} == {4}
    layerwise_default = next(r for r in default if r.strategy == "exact-layerwise")
    layerwise_small = next(r for r in small if r.strategy == "exact-layerwise")
    # the first BatchNorm sees the same inputs however they are batched
    assert layerwise_default.stats_distance[0] == pytest.approx(0, abs=1e-5)
    assert layerwise_small.stats_distance[0] == pytest.approx(0, abs=1e-5)
    assert layerwise_small.stats_distance[1] > 0.05
    assert layerwise_small.stats_distance[1] > 3 * layerwise_default.stats_distance[1]


@pytest.mark.parametrize("run_class", [NumpyRun, TorchRun], ids=["numpy", "torch"])
def test_calibration_batches_change_exact_but_not_layerwise_statistics(run_class):
    run = run_class(load("digits"), "mlp", 0, ())
    run.train_epochs(1, 64, 0.1)
    small, large = run.calibration_batches(4), run.calibration_batches(64)
    assert sum(len(b) for b in small) == sum(len(b) for b in large) == len(run.data.X_train)
    exact_small = run.statistics("exact", small)
    exact_large = run.statistics("exact", large)
    for (mean_s, var_s), (mean_l, var_l) in zip(exact_small[:1], exact_large[:1], strict=True):
        np.testing.assert_allclose(mean_s, mean_l, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(var_s, var_l, rtol=1e-4, atol=1e-5)
    assert not np.allclose(exact_small[1][1], exact_large[1][1], rtol=1e-2)
    layerwise_small = run.statistics("exact-layerwise", small)
    layerwise_large = run.statistics("exact-layerwise", large)
    for (mean_s, var_s), (mean_l, var_l) in zip(layerwise_small, layerwise_large, strict=True):
        np.testing.assert_allclose(mean_s, mean_l, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(var_s, var_l, rtol=1e-4, atol=1e-5)


# -- models and backends -------------------------------------------------------------------


def test_torch_cnn_on_digits_runs_with_batchnorm2d():
    torch = pytest.importorskip("torch")
    run = TorchRun(load("digits"), "cnn", 0, ())
    assert tuple(run.X_train.shape[1:]) == (1, 8, 8)
    assert any(isinstance(m, torch.nn.Conv2d) for m in run.model.modules())
    records = compare(
        "digits", backends=["torch"], model="cnn", batch_sizes=[64], seeds=1, epochs=[1]
    )
    assert [r.strategy for r in records] == list(DEFAULT_STRATEGIES)
    for record in records:
        assert record.model == "cnn"
        assert 0.0 <= record.accuracy <= 1.0
        assert len(record.stats_distance) == (0 if record.strategy == "batch" else 3)
    assert next(r for r in records if r.strategy == "exact").accuracy > 0.3  # chance 0.1


def test_numpy_cnn_on_digits_uses_the_numpy_conv_layers():
    from normstats.adapters.numpy import Conv

    run = NumpyRun(load("digits"), "cnn", 0, ())
    assert any(isinstance(layer, Conv) and layer.dims == 2 for layer in run.model)
    assert run.X_train.shape[1:] == (1, 8, 8)
    records = compare(
        "digits", backends=["numpy"], model="cnn", batch_sizes=[64], seeds=1, epochs=[1]
    )
    assert {r.backend for r in records} == {"numpy"}
    assert all(len(r.stats_distance) == (0 if r.strategy == "batch" else 3) for r in records)
    assert next(r for r in records if r.strategy == "exact").accuracy > 0.3  # chance 0.1


def test_unknown_model_names_model_option():
    with pytest.raises(ValueError, match="--model"):
        compare("digits", backends=["torch"], model="resnet", batch_sizes=[64], seeds=1)


@pytest.mark.parametrize("backends", [["jax"], ["torch", "tensorflow"], ["both"]])
def test_unknown_backend_names_backend_option(backends):
    with pytest.raises(ValueError, match="--backend"):
        compare("digits", backends=backends, batch_sizes=[64], seeds=1, epochs=[1])


@pytest.mark.parametrize(
    "names", ["exact,median", ["exact", "ema"], "ema:2", "ema:-0.1", "ema:fast", "", []]
)
def test_unknown_strategy_names_strategies_option(names):
    with pytest.raises(ValueError, match="--strategies"):
        compare("digits", strategies=names, batch_sizes=[64], seeds=1, epochs=[1])


def test_parse_keeps_order_and_drops_repeats():
    assert strategies.parse(" welford,exact ,ema:0.05,exact") == ("welford", "exact", "ema:0.05")
    assert strategies.parse(["batch", "cumulative"]) == ("batch", "cumulative")
    assert strategies.parse(strategies.DEFAULT) == DEFAULT_STRATEGIES


# -- the terminal table and the files, from the function's records -------------------------


def test_table_has_a_block_per_backend_and_length_a_row_per_strategy(grid):
    lines = [*report.table(grid).splitlines(), ""]
    headers = [i for i, line in enumerate(lines) if line.startswith("strategy")]
    assert len(headers) == 2 * 2  # backends x training lengths
    for i in headers:
        assert lines[i].split() == ["strategy", "b=16", "b=64"]
        rows = lines[i + 1 : i + 1 + len(DEFAULT_STRATEGIES)]
        assert [row.split()[0] for row in rows] == list(DEFAULT_STRATEGIES)
        assert lines[i + 1 + len(DEFAULT_STRATEGIES)] == ""
        cells = [_cells(row) for row in rows]
        assert all(len(row) == 2 for row in cells)
        for column in range(2):
            assert sum(row[column].endswith("*") for row in cells) >= 1


CELL = re.compile(r"(\d+\.\d)±(\d+\.\d)\s*(\*?)")


def _cells(row: str) -> list[str]:
    """A strategy row's cells, as ``mean±half`` with a trailing ``*`` on the best."""
    return ["{}±{}{}".format(*m.groups()) for m in CELL.finditer(row)]


def test_write_leaves_json_csv_and_pngs(grid, tmp_path):
    paths = report.write(grid, tmp_path / "out")
    names = sorted(p.name for p in paths)
    assert names == ["accuracy.png", "distance.png", "results.csv", "results.json"]
    for path in paths:
        assert path.parent == tmp_path / "out"
        assert path.stat().st_size > 0
    for name in ("accuracy.png", "distance.png"):
        assert (tmp_path / "out" / name).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


# -- distances that do not exist -------------------------------------------------------------


def test_distance_leaves_out_channels_whose_exact_variance_is_zero():
    # Channel 0 varies; channel 1 has exact variance 0 and other statistics (no distance);
    # channel 2 has exact variance 0 and the same statistics (distance 0).
    reference = [(np.array([1.0, 5.0, 2.0]), np.array([4.0, 0.0, 0.0]))]
    stats = [(np.array([2.0, 5.5, 2.0]), np.array([1.0, 1.0, 0.0]))]
    distances, note = runner._distance(stats, reference)
    channel0 = abs(2.0 - 1.0) / 2.0 + abs(np.sqrt(1.0 / 4.0) - 1.0)  # 0.5 + 0.5
    assert distances == [pytest.approx((channel0 + 0.0) / 2, rel=1e-15)]
    assert note.startswith("stats_distance[0] is the mean over 2 of 3 channels")


def test_distance_is_none_with_a_reason_when_no_channel_has_one():
    reference = [(np.zeros(2), np.ones(2)), (np.zeros(3), np.zeros(3))]
    stats = [(np.zeros(2), np.ones(2)), (np.ones(3), np.zeros(3))]
    distances, note = runner._distance(stats, reference)
    assert distances == [0.0, None]
    assert note.startswith("stats_distance[1] is null: the exact variance is 0 in all 3 channels")
    assert runner._distance(reference, reference) == ([0.0, 0.0], "")
    assert runner._distance(None, reference) == ([], "")


def test_write_refuses_nan_rather_than_write_non_standard_json(grid, tmp_path):
    broken = attrs.evolve(grid[0], accuracy=float("nan"))
    with pytest.raises(ValueError, match="not JSON compliant"):
        report.write([broken], tmp_path / "out")
