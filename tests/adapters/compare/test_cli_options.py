"""The command line's options taken exactly as given, checked before any training.

``--out`` refused when it is a file or under one; ``--seeds`` a count or exactly the seeds
listed; single-value options refuse a list instead of cutting it to its first value; a batch
size above the training set refused; ``--help`` with every default and the strategy and shift
names; ``--version``; a diverging network or Ctrl-C leaves the finished records, the reason
for the others and one line on stderr; progress lines when stderr is not a terminal.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import normstats as ns
from normstats.adapters.compare import Record, cli, compare, runner
from normstats.adapters.compare.backends import NumpyRun
from normstats.adapters.compare.data import load

from .conftest import RECORD_FIELDS
from .test_cli import SCRIPT

TINY = ["--backend", "numpy", "--batch-sizes", "64", "--epochs", "1", "--workers", "1"]
TINY += ["--strategies", "exact", "--quiet"]


def run_main(argv: list[str], capsys: Any) -> tuple[int, str, str]:
    try:
        code = cli.main(argv)
    except SystemExit as exited:  # argparse
        code = int(exited.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if a comparison starts."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the comparison started")

    monkeypatch.setattr(runner, "compare", refuse)


# -- --out ---------------------------------------------------------------------------------


def test_out_an_existing_file_is_refused_before_training(tmp_path, capsys, no_training):
    # Before: trained every network, then died in mkdir with a FileExistsError traceback
    # (exit status 1).
    path = tmp_path / "afile"
    path.write_text("keep me")
    code, out, err = run_main(["compare", *TINY, "--out", str(path)], capsys)
    assert code == 2
    assert err == f"normstats compare: --out: expected a directory, got the existing file {path}\n"
    assert out == ""
    assert path.read_text() == "keep me"


def test_out_below_a_file_is_refused_before_training(tmp_path, capsys, no_training):
    parent = tmp_path / "afile"
    parent.write_text("")
    code, _, err = run_main(["compare", *TINY, "--out", str(parent / "sub" / "out")], capsys)
    assert code == 2
    assert err == (
        f"normstats compare: --out: cannot create {parent / 'sub' / 'out'}: {parent} is a "
        "file, not a directory\n"
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_out_in_a_read_only_directory_is_refused_before_training(tmp_path, capsys, no_training):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    code, _, err = run_main(["compare", *TINY, "--out", str(locked / "out")], capsys)
    assert code == 2
    assert err == (
        f"normstats compare: --out: cannot write to {locked / 'out'}: {locked} is not writable\n"
    )


def test_out_checks_create_nothing(tmp_path):
    assert cli.unwritable(tmp_path / "a" / "b") is None
    assert not (tmp_path / "a").exists()


# -- lists: exactly the values given -------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "parsed"), [("3", 3), ("5,6,7", [5, 6, 7]), ("7,", [7]), ("0,2", [0, 2])]
)
def test_seeds_a_count_or_exactly_the_seeds_listed(text, parsed):
    # Before: "5,6,7" parsed as 5, which then ran the seeds 0..4.
    assert cli.parser().parse_args(["compare", "--seeds", text]).seeds == parsed


def test_seed_list_runs_exactly_those_seeds():
    assert runner.seed_list(3) == [0, 1, 2]
    assert runner.seed_list([5, 6, 7]) == [5, 6, 7]
    small = {"backends": ["numpy"], "batch_sizes": [64], "epochs": [1], "strategies": "exact"}
    listed = compare("digits", seeds=[1], **small)
    counted = compare("digits", seeds=2, **small)
    assert {r.seed for r in listed} == {1}
    assert listed == [r for r in counted if r.seed == 1]


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--workers", "2,3", "argument --workers: expected one integer >= 1, got a list '2,3'"),
        (
            "--calibration-batch-size",
            "16,32",
            "argument --calibration-batch-size: expected one integer >= 2, got a list '16,32'",
        ),
        (
            "--test-batch-size",
            "16,32",
            "argument --test-batch-size: expected one integer >= 2, got a list '16,32'",
        ),
        ("--batch-sizes", "16,16", "argument --batch-sizes: expected each value once, got '16,16'"),
        ("--seeds", "5,5", "argument --seeds: expected each value once, got '5,5'"),
        ("--seeds", "0", "argument --seeds: expected integers >= 1, got '0'"),
        ("--lr", "nan", "argument --lr: expected a positive finite number, got 'nan'"),
    ],
)
def test_single_values_and_lists_are_taken_exactly(capsys, option, value, message):
    # Before: --workers 2,3 ran with 2 workers and --calibration-batch-size 16,32 with 16,
    # silently; 16,16 ran one batch size.
    code, out, err = run_main(["compare", *TINY, option, value], capsys)
    assert code == 2
    assert err.splitlines()[-1] == f"normstats compare: error: {message}"
    assert out == ""


def test_a_batch_size_above_the_training_set_is_refused(tmp_path, capsys):
    # Before: trained digits at batch size 2000 as one batch of 1347 at lr 0.1 * 2000 / 64 =
    # 3.125 (an lr for 2000 samples) and reported it as b=2000.
    argv = ["compare", *TINY, "--batch-sizes", "64,2000", "--out", str(tmp_path / "out")]
    code, out, err = run_main(argv, capsys)
    assert code == 2
    assert err == (
        "normstats compare: --batch-sizes: expected at most the training set's 1347 samples "
        "(digits), got [2000]\n"
    )
    assert out == ""
    assert not (tmp_path / "out").exists()


# -- help and version ----------------------------------------------------------------------


def test_help_shows_every_default_and_the_strategy_and_shift_names(capsys):
    code, out, _ = run_main(["compare", "--help"], capsys)
    assert code == 0
    text = " ".join(out.split())
    squashed = "".join(out.split())  # argparse may wrap a long default at a hyphen
    for default in (
        "(default: digits)",
        "(default: both)",
        "(default: mlp)",
        "(default: [2, 4, 8, 16, 32, 64, 128, 256])",
        "(default: 5)",
        "(default: [5])",
        "(default: 0.1)",
        "(default: exact,exact-layerwise,cumulative,ema:0.1,ema:0.01,welford,batch)",
        "(default: none)",
        "(default: results)",
        f"(default: {os.cpu_count() or 1})",
    ):
        assert "".join(default.split()) in squashed
    assert text.count("(default: None)") == 2  # calibration and test batch sizes: training's
    for name in ("exact-layerwise", "cumulative", "ema:0.1:debias", "welford", "batch"):
        assert name in text
    for shift in ("noise:", "contrast:", "offset:", "translate:"):
        assert shift in text


def test_version(capsys):
    # Before: "normstats: error: unrecognized arguments: --version", exit status 2.
    code, out, _ = run_main(["--version"], capsys)
    assert code == 0
    assert out == f"normstats {ns.__version__}\n"


# -- debiased EMA --------------------------------------------------------------------------


def test_debiased_ema_is_the_ema_with_its_initial_values_removed():
    # Before: "--strategies: 'ema:0.1:debias': could not convert string to float", exit 2.
    # EMA from (0, 1) after t updates is (1 - m)^t * (0, 1) + the debiased sum; bias
    # correction divides that sum by 1 - (1 - m)^t.
    data = load("digits")
    run = NumpyRun(data, "mlp", 0, ("ema:0.1", "ema:0.1:debias"))
    run.train_epochs(1, 64, 0.1)
    steps = len(data.X_train) // 64
    plain = run.statistics("ema:0.1", [])
    debiased = run.statistics("ema:0.1:debias", [])
    assert plain is not None
    assert debiased is not None
    left = 0.9**steps
    for (mean, var), (mean_d, var_d) in zip(plain, debiased, strict=True):
        np.testing.assert_allclose(mean_d, mean / (1 - left), rtol=1e-9)
        np.testing.assert_allclose(var_d, (var - left) / (1 - left), rtol=1e-9)


# -- divergence and Ctrl-C -----------------------------------------------------------------


def test_a_diverging_network_leaves_the_others_records_and_its_reason(tmp_path, capsys):
    # At lr 10 the network at batch size 64 (lr 10) blows up in its first epoch while the one
    # at batch size 4 (lr 0.625) finishes. Before: lr 10 wrote both as records (a blown-up
    # network's 31.6%); at lr 1000 and 5 epochs the run stopped on a ValueError, no records.
    out = tmp_path / "out"
    argv = ["compare", *TINY, "--batch-sizes", "4,64", "--seeds", "1", "--lr", "10"]
    code, stdout, err = run_main([*argv, "--out", str(out)], capsys)
    assert code == 1
    assert stdout == ""
    reason = (
        "diverged: mean training loss 5.44e+03 in epoch 1 at lr 10, above 10 x ln(10) = 23; "
        "a smaller --lr may train"
    )
    assert err == (
        f"normstats compare: 1 of 2 networks did not finish ({reason}); wrote the 1 finished "
        f"records and the reason for each missing network to {out / 'results.json'}\n"
    )
    stored = json.loads((out / "results.json").read_text())
    assert [(r["batch_size"], r["seed"]) for r in stored["records"]] == [(4, 0)]
    assert stored["missing"] == [
        {
            "backend": "numpy",
            "batch_size": 64,
            "seed": 0,
            "reason": reason,
            "train_mode": "batchnorm",
        }
    ]


def test_ctrl_c_keeps_the_finished_networks(tmp_path, capsys, monkeypatch):
    finish = runner._Network.run
    calls = []

    def interrupted_second(self: Any) -> Any:
        calls.append(self)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return finish(self)

    monkeypatch.setattr(runner._Network, "run", interrupted_second)
    out = tmp_path / "out"
    code, stdout, err = run_main(["compare", *TINY, "--seeds", "3", "--out", str(out)], capsys)
    assert code == 130
    assert stdout == ""
    assert err == (
        "normstats compare: 2 of 3 networks did not finish (interrupted); wrote the 1 finished "
        f"records and the reason for each missing network to {out / 'results.json'}\n"
    )
    stored = json.loads((out / "results.json").read_text())
    assert [r["seed"] for r in stored["records"]] == [0]
    assert [(m["seed"], m["reason"]) for m in stored["missing"]] == [
        (1, "not run: the comparison was interrupted"),
        (2, "not run: the comparison was interrupted"),
    ]


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a process")
def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_with_worker_processes_exits_with_one_line(tmp_path):
    argv = [SCRIPT, "compare", "--backend", "numpy", "--batch-sizes", "8,16,32,64"]
    argv += ["--epochs", "2", "--seeds", "2", "--workers", "2", "--strategies", "exact"]
    process = subprocess.Popen(
        [*argv, "--out", str(tmp_path / "out")],
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        # a suite started in the background (`make test &`) inherits an ignored SIGINT, and
        # Python then installs no KeyboardInterrupt handler: the command gets the default
        preexec_fn=_default_sigint,
    )
    assert process.stderr is not None
    first = process.stderr.readline()  # the first finished network
    assert re.fullmatch(r"normstats compare: \[1/8\] numpy b=\d+ seed \d: done\n", first)
    process.send_signal(signal.SIGINT)
    _, rest = process.communicate(timeout=120)
    assert process.returncode == 130, rest
    assert "Traceback" not in rest
    last = rest.strip().splitlines()[-1]
    assert re.fullmatch(
        r"normstats compare: \d of 8 networks did not finish \(interrupted\); wrote the \d+ "
        r"finished records and the reason for each missing network to .*results.json",
        last,
    ), rest
    stored = json.loads((tmp_path / "out" / "results.json").read_text())
    finished = {(r["batch_size"], r["seed"]) for r in stored["records"]}
    missing = {(m["batch_size"], m["seed"]) for m in stored["missing"]}
    assert len(finished) >= 1
    assert len(finished) + len(missing) == 8
    assert not finished & missing


# -- progress off a terminal, and the records' new fields ----------------------------------


def test_one_progress_line_per_network_when_not_a_terminal(tmp_path):
    argv = [SCRIPT, "compare", "--backend", "numpy", "--batch-sizes", "32,64", "--epochs", "1"]
    argv += ["--seeds", "2", "--workers", "1", "--strategies", "exact"]
    done = subprocess.run(
        [*argv, "--out", "out"], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == [
        "normstats compare: [1/4] numpy b=32 seed 0: done",
        "normstats compare: [2/4] numpy b=32 seed 1: done",
        "normstats compare: [3/4] numpy b=64 seed 0: done",
        "normstats compare: [4/4] numpy b=64 seed 1: done",
    ]


def test_records_carry_lr_test_size_version_shift_and_test_batch_size(grid):
    for record in grid:
        assert record.lr == pytest.approx(0.1 * record.batch_size / 64, rel=1e-15)
        assert record.test_size == 450
        assert record.version == ns.__version__
        assert record.shift == "none"
        assert record.test_batch_size == record.batch_size


def test_records_as_json_carry_the_new_fields(tmp_path):
    from normstats.adapters.compare import report

    records = compare(
        "digits",
        backends=["numpy"],
        batch_sizes=[32],
        seeds=1,
        epochs=[1],
        strategies="exact,batch",
        shifts="offset:0.5",
        test_batch_size=50,
    )
    report.write(records, tmp_path)
    stored = json.loads((tmp_path / "results.json").read_text())["records"]
    assert [(r["strategy"], r["shift"]) for r in stored] == [
        ("exact", "none"),
        ("batch", "none"),
        ("exact", "offset:0.5"),
        ("batch", "offset:0.5"),
    ]
    for row in stored:
        assert row["lr"] == 0.05
        assert row["test_batch_size"] == 50
        assert row["test_size"] == 450
        assert row["version"] == ns.__version__
    header = Path(tmp_path / "results.csv").read_text().splitlines()[0].split(",")
    assert tuple(header) == RECORD_FIELDS


# -- the table -----------------------------------------------------------------------------


def test_table_fits_100_columns_and_marks_ties_by_paired_differences():
    # Before: 8 batch sizes made 128-column lines, and only the best rounded... mean got a mark.
    from scipy.stats import t

    from normstats.adapters.compare import report

    sizes = [2, 4, 8, 16, 32, 64, 128, 256]
    records = [
        Record(
            "numpy",
            "mlp",
            "digits",
            b,
            seed,
            1,
            "batchnorm",
            name,
            "none",
            acc,
            0.1,
            b,
            "all",
            b,
            450,
            "0",
            [],
        )
        for b in sizes
        for seed in range(3)
        for name, acc in (
            ("exact", 0.9 + 0.01 * seed),
            ("ema:0.1", 0.9 + 0.01 * seed - 0.01 - 0.001 * seed),  # always behind: significant
            ("batch", 0.9 + 0.01 * seed + (0.0, 0.01, -0.02)[seed]),  # behind, not significantly
        )
    ]
    text = report.table(records)
    assert max(len(line) for line in text.splitlines()) <= 100
    accuracy = text.split("minus exact")[0].splitlines()  # the first table
    rows = [line for line in accuracy if line.split()[:1] in (["exact"], ["batch"])]
    rows += [line for line in accuracy if line.startswith("ema:0.1")]
    exact_cells = [c for line in rows if line.startswith("exact") for c in line.split()[1:]]
    assert len(exact_cells) == 8
    assert all(cell.endswith("*") for cell in exact_cells)
    # batch - exact per seed: 0, +0.01, -0.02 -> a mean below 0 with a CI holding 0: "="
    differences = [0.0, 0.01, -0.02]
    half = t.ppf(0.975, 2) * np.std(differences, ddof=1) / np.sqrt(3)
    assert abs(np.mean(differences)) <= half
    batch_cells = [c for line in rows if line.startswith("batch") for c in line.split()[1:]]
    assert len(batch_cells) == 8
    assert all(cell.endswith("=") for cell in batch_cells)
    ema_cells = [c for line in rows if line.startswith("ema:0.1") for c in line.split()[1:]]
    assert not any(cell.endswith(("*", "=")) for cell in ema_cells[:8])
    # the paired table: ema:0.1 - exact = -1.0, -1.1, -1.2 points per seed
    minus = [line for line in text.splitlines() if line.startswith("ema:0.1")][-1]
    half = 100 * t.ppf(0.975, 2) * np.std([0.01, 0.011, 0.012], ddof=1) / np.sqrt(3)
    assert minus.split()[1] == f"-1.1±{half:.1f}"
