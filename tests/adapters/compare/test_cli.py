"""``normstats compare`` (the console script, ``python -m normstats``, ``cli.main``).

A small run leaves results.json / results.csv with the function's records and two PNG plots,
and prints a strategy x batch size table marking the best of each column; ``--quiet`` prints
the table only; bad inputs exit non-zero with one line on stderr naming the option or path,
never a traceback.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from normstats.adapters.compare import cli, compare

from .conftest import RECORD_FIELDS, blobs

PYTHON = sys.executable
SCRIPT = str(Path(sys.executable).parent / "normstats")
STRATEGIES = ("exact", "exact-layerwise", "cumulative", "ema:0.1", "ema:0.01", "welford", "batch")
PNG = b"\x89PNG\r\n\x1a\n"

RUN = ["--backend", "numpy", "--batch-sizes", "16,64", "--seeds", "2", "--epochs", "1"]
"""A small run: 1 backend x 2 batch sizes x 2 seeds x 1 length x 7 strategies = 28 records."""
RUN_KWARGS = {"backends": ["numpy"], "batch_sizes": [16, 64], "seeds": 2, "epochs": [1]}


def command(*args: str, cwd: Path, module: bool = False) -> subprocess.CompletedProcess[str]:
    launcher = [PYTHON, "-m", "normstats"] if module else [SCRIPT]
    return subprocess.run(
        [*launcher, *args], capture_output=True, text=True, cwd=cwd, timeout=300, check=False
    )


@pytest.fixture(scope="module")
def loud(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """``python -m normstats compare`` on the small run, without --quiet."""
    cwd = tmp_path_factory.mktemp("loud")
    done = command("compare", *RUN, "--workers", "1", "--out", "out", cwd=cwd, module=True)
    assert done.returncode == 0, done.stderr
    return cwd / "out", done


@pytest.fixture(scope="module")
def quiet(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """The console script on the same run, with --quiet and two worker processes."""
    cwd = tmp_path_factory.mktemp("quiet")
    done = command("compare", *RUN, "--workers", "2", "--quiet", "--out", "q", cwd=cwd)
    assert done.returncode == 0, done.stderr
    return cwd / "q", done


@pytest.fixture(scope="module")
def records() -> list[dict[str, Any]]:
    """What the function returns for the small run."""
    return [r.as_dict() for r in compare("digits", **RUN_KWARGS, workers=1)]


# -- help ----------------------------------------------------------------------------------


@pytest.mark.parametrize("module", [False, True], ids=["script", "python-m"])
def test_help_lists_the_compare_command(tmp_path, module):
    done = command("--help", cwd=tmp_path, module=module)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: normstats")
    assert re.search(r"^\s+compare\s+\S", done.stdout, re.MULTILINE), done.stdout
    assert done.stderr == ""


def test_compare_help_lists_its_options(capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["compare", "--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    for option in (
        "--dataset",
        "--backend",
        "--model",
        "--batch-sizes",
        "--seeds",
        "--epochs",
        "--lr",
        "--strategies",
        "--calibration-batch-size",
        "--out",
        "--workers",
        "--quiet",
    ):
        assert option in text


# -- what a run leaves ---------------------------------------------------------------------


def test_results_json_holds_the_functions_records(loud, records):
    out, _ = loud
    stored = json.loads((out / "results.json").read_text())
    assert list(stored) == ["records", "missing"]
    assert stored["missing"] == []
    assert len(stored["records"]) == len(records) == 28
    for row in stored["records"]:
        assert tuple(row) == RECORD_FIELDS
    assert stored["records"] == records


def test_results_csv_has_the_same_rows(loud):
    out, _ = loud
    stored = json.loads((out / "results.json").read_text())["records"]
    with open(out / "results.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames or ()) == RECORD_FIELDS
        rows = list(reader)
    assert len(rows) == len(stored)
    for row, record in zip(rows, stored, strict=True):
        for field in ("backend", "model", "dataset", "strategy"):
            assert row[field] == record[field]
        for field in ("batch_size", "seed", "epochs", "calibration_batch_size"):
            assert int(row[field]) == record[field]
        assert float(row["accuracy"]) == record["accuracy"]
        assert json.loads(row["stats_distance"]) == record["stats_distance"]
        assert row["stats_distance_note"] == record["stats_distance_note"]


@pytest.mark.parametrize("name", ["accuracy.png", "distance.png"])
def test_plots_are_pngs(loud, quiet, name):
    for out, _ in (loud, quiet):
        data = (out / name).read_bytes()
        assert len(data) > len(PNG)
        assert data.startswith(PNG)


def test_two_workers_write_the_same_results(loud, quiet):
    assert (loud[0] / "results.json").read_text() == (quiet[0] / "results.json").read_text()
    assert (loud[0] / "results.csv").read_text() == (quiet[0] / "results.csv").read_text()


def parse_table(text: str) -> dict[str, Any]:
    """The one table of a one-backend, one-length run: columns and cells per strategy."""
    lines = text.splitlines()
    headers = [i for i, line in enumerate(lines) if line.startswith("strategy")]
    assert len(headers) == 1, text
    start = headers[0]
    assert "test accuracy" in lines[start - 1]
    columns = lines[start].split()[1:]
    rows = {}
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        name, rest = line.split(maxsplit=1)
        rows[name] = re.findall(r"(\d+\.\d)±(\d+\.\d)\s*(\*?)", rest)
    return {"columns": columns, "rows": rows, "end": start + 1 + len(rows)}


def test_table_one_line_per_strategy_one_column_per_batch_size(loud, records):
    _, done = loud
    table = parse_table(done.stdout)
    assert table["columns"] == ["b=16", "b=64"]
    assert list(table["rows"]) == list(STRATEGIES)
    for cells in table["rows"].values():
        assert len(cells) == 2
    for column, batch_size in enumerate((16, 64)):
        means = {}
        for strategy in STRATEGIES:
            found = [
                r["accuracy"]
                for r in records
                if r["strategy"] == strategy and r["batch_size"] == batch_size
            ]
            means[strategy] = float(np.mean(found))
            mean, _, _ = table["rows"][strategy][column]
            assert float(mean) == pytest.approx(100 * means[strategy], abs=0.051)
        best = max(means.values())
        starred = {s for s in STRATEGIES if table["rows"][s][column][2] == "*"}
        assert starred == {s for s in STRATEGIES if means[s] == best}


def test_without_quiet_says_what_it_wrote(loud):
    _, done = loud
    wrote = [line for line in done.stdout.splitlines() if line.startswith("wrote ")]
    assert len(wrote) == 1
    for name in ("results.json", "results.csv", "accuracy.png", "distance.png"):
        assert str(Path("out") / name) in wrote[0]


def test_quiet_prints_the_table_only(loud, quiet):
    _, done = quiet
    assert done.stderr == ""  # no progress bar, no warnings
    assert "wrote" not in done.stdout
    assert "time (" not in done.stdout
    loud_table = loud[1].stdout[: loud[1].stdout.index("wrote ")]
    assert done.stdout.strip() == loud_table.strip()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("flags", [[], ["--quiet"]], ids=["loud", "quiet"])
def test_progress_bar_on_a_terminal_unless_quiet(tmp_path, monkeypatch, capsys, flags):
    terminal = _Terminal()
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr(sys, "stderr", terminal)
    argv = ["compare", "--backend", "numpy", "--batch-sizes", "64", "--seeds", "1"]
    argv += ["--epochs", "1", "--strategies", "exact,batch", "--workers", "1"]
    assert cli.main([*argv, "--out", str(tmp_path / "out"), *flags]) == 0
    stdout = capsys.readouterr().out
    if flags:
        assert terminal.getvalue() == ""
        assert "wrote" not in stdout
    else:
        assert "networks" in terminal.getvalue()
        assert "100%" in terminal.getvalue()
        assert "wrote" in stdout
    assert parse_table(stdout)["columns"] == ["b=64"]


# -- bad inputs ----------------------------------------------------------------------------


def _bad_npz(path: Path) -> None:
    path.write_bytes(bytes(range(256)) * 8)


def _npy(path: Path) -> None:
    with open(path, "wb") as handle:
        np.save(handle, np.zeros((10, 3)))


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _no_y(path: Path) -> None:
    x, _ = blobs()
    np.savez(path, X=x)


def _float_labels(path: Path) -> None:
    x, y = blobs()
    np.savez(path, X=x, y=y + 0.5)


def _nan_features(path: Path) -> None:
    x, y = blobs()
    x[5, 2] = np.nan
    np.savez(path, X=x, y=y)


def _scalar_features(path: Path) -> None:
    _, y = blobs()
    np.savez(path, X=np.array(1.0), y=y)


BAD = {
    "missing-dataset": (None, [], "PATH"),
    "garbage-npz": (_bad_npz, [], "PATH"),
    "npy-file": (_npy, [], "PATH"),
    "empty-file": (_empty, [], "PATH"),
    "npz-without-y": (_no_y, [], "PATH"),
    "float-labels": (_float_labels, [], "PATH"),
    "nan-features": (_nan_features, [], "PATH"),
    "0-d-features": (_scalar_features, [], "PATH"),
    "unknown-strategy": (None, ["--strategies", "exact,median"], "--strategies"),
    "bad-ema": (None, ["--strategies", "ema:7"], "--strategies"),
    "unknown-backend": (None, ["--backend", "jax"], "--backend"),
    "unknown-model": (None, ["--model", "resnet"], "--model"),
    "batch-size-0": (None, ["--batch-sizes", "0"], "--batch-sizes"),
    "batch-sizes-text": (None, ["--batch-sizes", "16,big"], "--batch-sizes"),
    "seeds-0": (None, ["--seeds", "0"], "--seeds"),
    "epochs-negative": (None, ["--epochs", "2,-1"], "--epochs"),
    "calibration-0": (None, ["--calibration-batch-size", "0"], "--calibration-batch-size"),
}
ARGPARSE = {"unknown-backend", "unknown-model", "batch-size-0", "batch-sizes-text", "seeds-0"}
ARGPARSE |= {"epochs-negative", "calibration-0"}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_exits_with_one_line_naming_the_option_or_path(tmp_path, case):
    make, flags, needle = BAD[case]
    dataset = tmp_path / "data.npz"
    if make is not None:
        make(dataset)
    if needle == "PATH":
        flags, needle = ["--dataset", str(dataset)], str(dataset)
    done = command(
        "compare",
        "--batch-sizes",
        "16",
        "--seeds",
        "1",
        "--epochs",
        "1",
        "--workers",
        "1",
        *flags,
        "--out",
        str(tmp_path / "out"),
        cwd=tmp_path,
    )
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines, "nothing on stderr"
    assert needle in lines[-1], done.stderr
    assert lines[-1].startswith("normstats compare: ")
    if case not in ARGPARSE:  # argparse puts its usage above its one-line error
        assert len(lines) == 1, done.stderr
    assert done.stdout == ""
    assert not (tmp_path / "out").exists()


# -- missing values: strict JSON, null with a reason -----------------------------------------


def _refuse_constant(name: str) -> None:
    raise AssertionError(f"results.json holds the non-standard constant {name}")


def test_constant_inputs_give_strict_json_with_null_and_the_reason(tmp_path):
    # Every input feature constant: every BatchNorm channel has exact variance 0, so the
    # distance relative to the exact statistics is undefined. Before the fix results.json
    # held a bare NaN for each (24 on this run; with both backends also Infinity), which
    # strict JSON parsers refuse.
    _, y = blobs()
    np.savez(tmp_path / "constant.npz", X=np.full((len(y), 4), 5.0), y=y)
    done = command(
        "compare",
        "--dataset",
        "constant.npz",
        *RUN[:4],
        "--seeds",
        "1",
        "--epochs",
        "1",
        "--workers",
        "1",
        "--quiet",
        "--out",
        "out",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    text = (tmp_path / "out" / "results.json").read_text()
    assert "NaN" not in text
    assert "Infinity" not in text
    records = json.loads(text, parse_constant=_refuse_constant)["records"]
    assert [r["strategy"] for r in records[:7]] == list(STRATEGIES)
    nulls = 0
    for record in records:
        distances, note = record["stats_distance"], record["stats_distance_note"]
        if record["strategy"] == "batch":
            assert distances == []
            assert note == ""
            continue
        assert len(distances) == 2
        if record["strategy"] == "exact":  # the reference itself: 0 even where sigma is 0
            assert distances == [0.0, 0.0]
            assert note == ""
        for layer, distance in enumerate(distances):
            if distance is None:
                nulls += 1
                assert f"stats_distance[{layer}] is null: the exact variance is 0" in note
            else:
                assert math.isfinite(distance)
                assert distance >= 0
    assert nulls > 0  # the EMAs start from variance 1, so they differ from the exact 0
    with open(tmp_path / "out" / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert "NaN" not in (tmp_path / "out" / "results.csv").read_text()
    for row, record in zip(rows, records, strict=True):
        # The list cell is the same strict JSON, null included; the note is plain text.
        cell = json.loads(row["stats_distance"], parse_constant=_refuse_constant)
        assert cell == record["stats_distance"]
        assert row["stats_distance_note"] == record["stats_distance_note"]
