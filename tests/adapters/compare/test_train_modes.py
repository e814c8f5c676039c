"""The comparison's training-mode axis: ``--train-mode batchnorm,renorm,ghost:V``.

Each mode trains its own network from the same seed; every inference strategy is evaluated
on it. The references: ghost batches of at least the batch size are plain BatchNorm, so
their records equal those of ``batchnorm``; a renorm network's layers correct towards the
tracked estimator the mode names; old results without the field read as ``batchnorm``.
"""

from __future__ import annotations

import numpy as np
import pytest

from normstats.adapters.compare import Record, compare
from normstats.adapters.compare import train_modes as modes
from normstats.adapters.compare.backends import NumpyRun
from normstats.adapters.compare.data import load
from normstats.adapters.compare.report import block_title, blocks, summary, table

from .test_cli_options import run_main

TINY = ["--backend", "numpy", "--batch-sizes", "16", "--seeds", "1", "--epochs", "1"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "ghost:1",
            "--train-mode: 'ghost:1': expected ghost:<virtual batch size>, an integer "
            ">= 2, got '1'",
        ),
        (
            "ghost:x",
            "--train-mode: 'ghost:x': expected ghost:<virtual batch size>, an integer "
            ">= 2, got 'x'",
        ),
        (
            "renorm:exact",
            "--train-mode: 'renorm:exact': expected renorm or renorm:<strategy> "
            "with a strategy tracked in training (cumulative, welford, ema:<momentum>, "
            "module:Class), got 'exact' (not a strategy tracked in training)",
        ),
        (
            "renorm:batch",
            "--train-mode: 'renorm:batch': expected renorm or renorm:<strategy> "
            "with a strategy tracked in training (cumulative, welford, ema:<momentum>, "
            "module:Class), got 'batch' (not a strategy tracked in training)",
        ),
        (
            "sgd",
            "--train-mode: unknown training mode 'sgd'; expected batchnorm, renorm, "
            "renorm:<strategy> or ghost:<virtual batch size>",
        ),
        ("renorm,renorm", "--train-mode: expected each value once, got ['renorm'] more than once"),
    ],
)
def test_bad_training_modes_exit_2_with_one_line(tmp_path, capsys, text, message):
    code, out, err = run_main(
        ["compare", *TINY, "--out", str(tmp_path), "--train-mode", text], capsys
    )
    assert code == 2
    assert err.strip() == f"normstats compare: {message}"
    assert out == ""
    assert list(tmp_path.iterdir()) == []  # refused before any training


def test_modes_parse_to_their_settings():
    assert modes.mode("renorm") == modes.TrainMode("renorm", reference="ema:0.1")
    assert modes.mode("renorm:ema:0.01").reference == "ema:0.01"
    assert modes.mode("renorm:cumulative").reference == "cumulative"
    assert modes.mode("ghost:4").virtual_batch_size == 4
    assert modes.mode("batchnorm") == modes.TrainMode("batchnorm")


def test_old_results_without_a_training_mode_read_as_batchnorm():
    row = {
        "backend": "numpy",
        "model": "mlp",
        "dataset": "digits",
        "batch_size": 16,
        "seed": 0,
        "epochs": 1,
        "strategy": "exact",
        "shift": "none",
        "accuracy": 0.9,
        "lr": 0.025,
        "calibration_batch_size": 16,
        "calibration_samples": "all",
        "test_batch_size": 16,
        "test_size": 450,
        "version": "0.1.0",
        "stats_distance": [0.0, 0.0],
    }
    assert Record.from_dict(row).train_mode == "batchnorm"


@pytest.fixture(scope="module")
def by_mode():
    records = compare(
        "digits",
        backends=["numpy", "torch"],
        batch_sizes=[16],
        seeds=1,
        epochs=[1],
        strategies=["exact", "ema:0.1", "batch"],
        train_modes=["batchnorm", "ghost:16", "ghost:4", "renorm:welford"],
    )
    return records


def test_one_network_per_mode_every_strategy_on_each(by_mode):
    found = {(r.backend, r.train_mode, r.strategy) for r in by_mode}
    assert len(by_mode) == len(found) == 2 * 4 * 3


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_ghost_batches_of_the_whole_batch_are_batchnorm(by_mode, backend):
    # one virtual batch of all 16 samples normalizes exactly as BatchNorm does
    def accuracies(mode):
        return {
            r.strategy: r.accuracy for r in by_mode if (r.backend, r.train_mode) == (backend, mode)
        }

    assert accuracies("ghost:16") == pytest.approx(accuracies("batchnorm"), abs=1 / 450)
    plain = [r for r in by_mode if (r.backend, r.train_mode) == (backend, "batchnorm")]
    ghost = [r for r in by_mode if (r.backend, r.train_mode) == (backend, "ghost:16")]
    for a, b in zip(plain, ghost, strict=True):
        np.testing.assert_allclose(a.stats_distance, b.stats_distance, rtol=1e-6, atol=1e-9)


def test_the_table_has_a_block_per_mode_batchnorm_first(by_mode):
    titles = [block_title(b) for b in blocks(summary(by_mode))]
    numpy_titles = [t for t in titles if t.startswith("numpy")]
    assert numpy_titles == [
        "numpy / mlp / digits / 1 epoch / shift none",
        "numpy / mlp / digits / 1 epoch / ghost:16 / shift none",
        "numpy / mlp / digits / 1 epoch / ghost:4 / shift none",
        "numpy / mlp / digits / 1 epoch / renorm:welford / shift none",
    ]
    assert "renorm:welford / shift none" in table(by_mode)


@pytest.mark.parametrize("reference", ["cumulative", "ema:0.01", "welford"])
def test_a_renorm_network_corrects_towards_the_strategy_it_names(monkeypatch, reference):
    # Every renormalized step of the first layer gets, as its running statistics, those of an
    # independent estimator of that name fed the layer's earlier training inputs.
    import normstats as ns
    from normstats import functional
    from normstats.adapters.compare import strategies

    seen = []
    renorm_forward = functional.renorm_forward

    def spy(x, gamma, beta, mean, var, **kwargs):
        seen.append((x.copy(), mean, var))
        return renorm_forward(x, gamma, beta, mean, var, **kwargs)

    monkeypatch.setattr(functional, "renorm_forward", spy)
    data = load("digits")
    run = NumpyRun(data, "mlp", 0, ("ema:0.1",), modes.mode(f"renorm:{reference}"))
    first = run.norms[0]
    assert first.renorm
    run.train_epochs(1, 256, 0.4)
    steps = [s for s in seen if s[0].shape[1] == first.num_features][:5]
    assert len(steps) == 5
    independent = strategies.estimator(reference)
    for x, mean, var in steps:
        if independent.num_batches == 0:
            assert mean is None
            assert var is None
        else:
            np.testing.assert_allclose(mean, independent.mean, rtol=1e-12, atol=1e-14)
            np.testing.assert_allclose(var, independent.var, rtol=1e-12)
        independent.update_moments(ns.Moments.from_array(x, axis=0))
