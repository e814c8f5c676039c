"""The distributed part of the PyTorch adapter: real processes, gloo on 127.0.0.1.

Every check runs in ranks spawned here (``torch.multiprocessing``, "spawn"), each joining a
gloo process group on a free local port; the workers live in ``_distributed_workers`` and
send back NumPy arrays. A spawn is slow (every process imports torch), so one spawn per world
runs many checks, and module-scoped fixtures share its results among the tests. Nothing can
hang: the collectives time out after 30 s, the parent waits for the results until a deadline,
then terminates whatever is left, and a rank's traceback becomes the failure message.

The references are independent of normstats and run in this (the parent) process: native
``nn.BatchNorm*d`` in float64 over the concatenated batch, NumPy for pooled statistics, and a
plain torch model trained on the whole batch for DDP. ``recalibrate`` over shards is compared
with ``recalibrate`` over the whole dataset in one process (tested on its own, against hooks
on the torch model, in ``test_recalibrate.py``).
"""

from __future__ import annotations

import copy
import itertools
import queue
import socket
import time
from fractions import Fraction
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn.functional as F  # noqa: E402, N812
from torch import nn  # noqa: E402

import normstats as ns  # noqa: E402
from normstats.adapters.torch import BatchNorm, convert, recalibrate  # noqa: E402
from normstats.adapters.torch.distributed import all_reduce_stats, merge_rows  # noqa: E402
from normstats.adapters.torch.ring import SLOTS  # noqa: E402

from ...helpers import relative_error_to_exact  # noqa: E402
from . import _distributed_workers as workers  # noqa: E402

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with gloo is not available",
)

DEADLINE = 120.0
"""Seconds a spawn may take in all (a normal one takes a few)."""
F64 = torch.float64
TOL = {"rtol": 1e-10, "atol": 1e-12}
C, SIDE = 3, 4
MOMENTUM = 0.3

# per step, each rank's batch size (N): uneven, and with empty ranks for the world of 3
SIZES = {
    2: [[5, 2], [1, 6], [3, 3], [8, 1]],
    3: [[4, 0, 3], [2, 5, 0], [0, 0, 5], [1, 3, 2]],
}
# calibration batches (sizes) and which of them each rank holds: uneven; rank 1 of 3 has none
CALIBRATION_SIZES = [3, 7, 16, 5, 9, 4]
SHARDS = {2: [[0, 1, 2, 3], [4, 5]], 3: [[0, 1, 2], [], [3, 4, 5]]}


# -- spawning ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn(task: str, world: int, *args: Any, dying: frozenset[int] = frozenset()) -> list[Any]:
    """Run ``workers.TASKS[task]`` on ``world`` ranks; every rank's result, in rank order.

    Fails with the ranks' tracebacks (or the exit codes of ranks that said nothing) if any
    rank fails or the deadline passes; no process outlives this call. The ranks in
    ``dying`` are meant to end without a report (their result is None).
    """
    ctx = mp.get_context("spawn")
    results: queue.Queue[Any] = ctx.Queue()
    port = free_port()
    processes = [
        ctx.Process(
            target=workers.entry, args=(rank, world, port, results, task, args), daemon=True
        )
        for rank in range(world)
    ]
    reports: dict[int, tuple[bool, Any]] = {}
    stopped: set[int | None] = set()
    end = time.monotonic() + DEADLINE
    try:
        for process in processes:
            process.start()
        while len(reports) < world and time.monotonic() < end:
            try:
                rank, ok, payload = results.get(timeout=0.5)
            except queue.Empty:
                if not any(p.is_alive() for p in processes) and results.empty():
                    break  # every process is gone and nothing is left to read
                continue
            reports[rank] = (ok, payload)
    finally:
        started = [p for p in processes if p.pid is not None]
        for process in started:
            process.join(timeout=max(0.1, min(10.0, end - time.monotonic())))
        for process in started:
            if process.is_alive():
                stopped.add(process.pid)
                process.terminate()
                process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join(timeout=5)
        results.close()
        results.join_thread()
    failures = []
    for rank, process in enumerate(processes):
        if rank in dying and rank not in reports:
            reports[rank] = (True, None)
        if rank not in reports:
            why = "terminated at the deadline" if process.pid in stopped else "died"
            failures.append(f"rank {rank}: no report ({why}, exit code {process.exitcode})")
        elif not reports[rank][0]:
            failures.append(f"rank {rank}:\n{reports[rank][1]}")
    if failures:
        pytest.fail(f"{task} on {world} ranks failed:\n" + "\n".join(failures), pytrace=False)
    return [reports[rank][1] for rank in range(world)]


def part(results: list[dict[str, Any]], name: str) -> list[Any]:
    """Part ``name`` of every rank's results; fails with the traceback of a rank it failed on."""
    errors = [
        f"rank {rank}:\n{r[name]['error']}" for rank, r in enumerate(results) if "error" in r[name]
    ]
    if errors:
        pytest.fail(f"part {name!r} raised:\n" + "\n".join(errors), pytrace=False)
    return [r[name]["value"] for r in results]


# -- data ----------------------------------------------------------------------------------


def layer_case(world: int, stats: str, seed: int) -> dict[str, Any]:
    """Per step and rank: a (N, C, 4, 4) float64 batch (uneven, some empty) and loss weights."""
    rng = np.random.default_rng(seed)
    offset = np.array([3.0, -2.0, 0.5]).reshape(1, C, 1, 1)
    scale = np.array([2.0, 0.5, 1.0]).reshape(1, C, 1, 1)
    steps = [
        [rng.normal(size=(n, C, SIDE, SIDE)) * scale + offset for n in row] for row in SIZES[world]
    ]
    loss_weights = [[rng.normal(size=b.shape) for b in row] for row in steps]
    case: dict[str, Any] = {
        "steps": steps,
        "loss_weights": loss_weights,
        "weight": rng.uniform(0.5, 1.5, size=C),
        "bias": rng.normal(size=C),
        "eval_input": rng.normal(size=(4, C, SIDE, SIDE)) * scale + offset,
        "stats": stats,
    }
    if stats == "ema":
        case["momentum"] = MOMENTUM
    return case


def calibration_batches() -> list[np.ndarray[Any, Any]]:
    rng = np.random.default_rng(7)
    return [rng.normal(1.0, 2.0, size=(n, 2, SIDE, SIDE)) for n in CALIBRATION_SIZES]


def initial_state(build: Any, seed: int) -> dict[str, np.ndarray[Any, Any]]:
    torch.manual_seed(seed)
    return workers.numpy_state(build())


def convert_case() -> dict[str, Any]:
    rng = np.random.default_rng(11)
    batch = [rng.normal(size=(n, 2, SIDE, SIDE)) for n in (5, 2)]
    return {
        "state": initial_state(workers.plain_bn_net, 3),
        "batch": batch,
        "loss_weights": [rng.normal(size=(len(b), 4, SIDE, SIDE)) for b in batch],
    }


def recalibration_case(world: int) -> dict[str, Any]:
    batches = calibration_batches()
    return {
        "state": initial_state(workers.recalibration_net, 5),
        "shards": [[batches[i] for i in shard] for shard in SHARDS[world]],
    }


def welford_streams() -> list[list[np.ndarray[Any, Any]]]:
    """Three ranks' streams of (n, 3) batches; rank 1 has none."""
    rng = np.random.default_rng(13)
    return [
        [rng.normal(5.0, 2.0, size=(n, 3)) for n in (4, 7, 2)],
        [],
        [rng.normal(-1.0, 0.5, size=(n, 3)) for n in (9, 3)],
    ]


LAYER_CASES = {
    world: {
        f"layer_{stats}": layer_case(world, stats, seed=world * 10 + i)
        for i, stats in enumerate(("ema", "welford"))
    }
    for world in (2, 3)
}


LOW_PRECISION_SHAPE = (4, C, 96, 96)
"""Each of the 2 ranks' batch: 36864 values per channel, whose M2 (about 1.5e5 here) float16
cannot hold."""


def low_precision_case(dtype: str) -> dict[str, Any]:
    rng = np.random.default_rng(29)
    offset = np.array([3.0, -2.0, 0.5]).reshape(1, C, 1, 1)
    batches = [rng.normal(size=LOW_PRECISION_SHAPE) * 2.0 + offset for _ in range(2)]
    return {
        # the values the module sees, so the reference is fed exactly them
        "batches": [
            torch.from_numpy(b).to(workers.DTYPES[dtype]).double().numpy() for b in batches
        ],
        "loss_weights": [rng.normal(size=LOW_PRECISION_SHAPE) for _ in range(2)],
        "weight": torch.tensor([0.5, 1.0, 1.5]).to(workers.DTYPES[dtype]).double().numpy(),
        "bias": torch.tensor([0.25, -1.0, 0.0]).to(workers.DTYPES[dtype]).double().numpy(),
        "dtype": dtype,
    }


LOW_PRECISION_CASES = {f"low_precision_{d}": low_precision_case(d) for d in workers.DTYPES}


RING_STEPS = 70
"""Synchronized steps of the ring checks: more than the ring holds (it folds by itself once)."""
NAN_STEP = 10
"""The step whose batch holds a NaN on rank 0 (skipped on every rank)."""


def ring_case(stats: str, seed: int) -> dict[str, Any]:
    """Per step, each of 2 ranks' (N, C, 2, 2) float64 batch (N of 2 to 4, and 0 to 3), and
    each rank's three batches of its own."""
    rng = np.random.default_rng(seed)
    offset = np.array([4.0, -1.0, 0.25]).reshape(1, C, 1, 1)
    sizes = np.stack([rng.integers(2, 5, RING_STEPS), rng.integers(0, 4, RING_STEPS)], axis=1)
    steps = [[rng.normal(size=(n, C, 2, 2)) * 1.5 + offset for n in row] for row in sizes]
    steps[NAN_STEP][0][0, 1, 0, 0] = np.nan
    local = [[rng.normal(size=(n, C, 2, 2)) - offset for n in (3, 5, 2)] for _ in range(2)]
    case: dict[str, Any] = {"steps": steps, "local": local, "stats": stats}
    if stats == "ema":
        case["momentum"] = MOMENTUM
    return case


RING_CASES = {f"ring_{s}": ring_case(s, seed=40 + i) for i, s in enumerate(("welford", "ema"))}


def tiny_totals_case(sizes: list[int]) -> list[np.ndarray[Any, Any]]:
    rng = np.random.default_rng(31 + sum(sizes))
    return [rng.normal(2.0, 3.0, size=(n, C)) for n in sizes]


TINY_TOTALS = {
    "one": tiny_totals_case([1, 0, 0]),
    "none": tiny_totals_case([0, 0, 0]),
    "two": tiny_totals_case([1, 0, 1]),
}
"""Each of 3 ranks' (N, C) batch: at most one value per channel each, and in all one, none
or two."""


# -- the spawns (one per world and purpose) ------------------------------------------------


@pytest.fixture(scope="module")
def layers_on_2() -> list[dict[str, Any]]:
    others = {
        "convert": convert_case(),
        "recalibrate": recalibration_case(2),
        "low_precision": LOW_PRECISION_CASES,
        "ring": RING_CASES,
    }
    return spawn("layers", 2, LAYER_CASES[2], others)


@pytest.fixture(scope="module")
def layers_on_3() -> list[dict[str, Any]]:
    case = recalibration_case(3)
    return spawn("layers", 3, LAYER_CASES[3], {"recalibrate": case, "grouped": case})


@pytest.fixture(scope="module")
def faults_on_3() -> list[dict[str, Any]]:
    return spawn("faults", 3, welford_streams(), TINY_TOTALS)


@pytest.fixture(params=[2, 3], ids=lambda w: f"world{w}")
def layers(request: pytest.FixtureRequest) -> tuple[int, list[dict[str, Any]]]:
    name = "layers_on_2" if request.param == 2 else "layers_on_3"
    return request.param, request.getfixturevalue(name)


# -- 1. BatchNorm(sync=True) equals one process over the concatenated batch -------------------


def torch_reference(case: dict[str, Any]) -> dict[str, Any]:
    """Native nn.BatchNorm2d (float64, training) on every step's concatenated batch."""
    bn = nn.BatchNorm2d(C, momentum=case.get("momentum", 0.1), dtype=F64)
    with torch.no_grad():
        bn.weight.copy_(torch.from_numpy(case["weight"]))
        bn.bias.copy_(torch.from_numpy(case["bias"]))
    out: dict[str, Any] = {"y": [], "x_grad": [], "weight_grad": [], "bias_grad": []}
    for row, weights in zip(case["steps"], case["loss_weights"], strict=True):
        x = torch.from_numpy(np.concatenate(row)).requires_grad_()
        bn.zero_grad()
        y = bn(x)
        (y * torch.from_numpy(np.concatenate(weights))).sum().backward()
        out["y"].append(y.detach().numpy())
        out["x_grad"].append(x.grad.numpy())
        out["weight_grad"].append(bn.weight.grad.numpy().copy())
        out["bias_grad"].append(bn.bias.grad.numpy().copy())
    out["running_mean"] = bn.running_mean.numpy()
    out["running_var"] = bn.running_var.numpy()
    out["num_batches_tracked"] = int(bn.num_batches_tracked)
    bn.eval()
    with torch.no_grad():
        out["y_eval"] = bn(torch.from_numpy(case["eval_input"])).numpy()
    return out


def rank_slices(sizes: list[int]) -> list[slice]:
    ends = np.cumsum([0, *sizes])
    return [slice(int(a), int(b)) for a, b in itertools.pairwise(ends)]


@pytest.mark.parametrize("stats", ["ema", "welford"])
def test_sync_outputs_and_input_gradients_are_those_of_one_process(layers, stats):
    world, results = layers
    case = LAYER_CASES[world][f"layer_{stats}"]
    ranks = part(results, f"layer_{stats}")
    reference = torch_reference(case)
    for step, sizes in enumerate(SIZES[world]):
        for rank, cut in enumerate(rank_slices(sizes)):
            assert ranks[rank]["y"][step].shape == (sizes[rank], C, SIDE, SIDE)
            np.testing.assert_allclose(
                ranks[rank]["y"][step],
                reference["y"][step][cut],
                **TOL,
                err_msg=f"output, step {step}, rank {rank}",
            )
            np.testing.assert_allclose(
                ranks[rank]["x_grad"][step],
                reference["x_grad"][step][cut],
                **TOL,
                err_msg=f"input gradient, step {step}, rank {rank}",
            )


@pytest.mark.parametrize("stats", ["ema", "welford"])
def test_sync_parameter_gradients_summed_over_ranks_are_those_of_one_process(layers, stats):
    world, results = layers
    ranks = part(results, f"layer_{stats}")
    reference = torch_reference(LAYER_CASES[world][f"layer_{stats}"])
    for step in range(len(SIZES[world])):
        for name in ("weight_grad", "bias_grad"):
            total = sum(r[name][step] for r in ranks)
            np.testing.assert_allclose(
                total, reference[name][step], **TOL, err_msg=f"{name}, step {step}"
            )


def test_sync_ema_running_statistics_are_torch_batchnorm_on_the_whole_batch(layers):
    world, results = layers
    ranks = part(results, "layer_ema")
    reference = torch_reference(LAYER_CASES[world]["layer_ema"])
    for rank, r in enumerate(ranks):
        for key in ("running_mean", "running_var"):
            np.testing.assert_array_equal(r[key], ranks[0][key], err_msg=f"{key}, rank {rank}")
            np.testing.assert_allclose(r[key], reference[key], **TOL, err_msg=f"{key}, rank {rank}")
        assert r["num_batches_tracked"] == reference["num_batches_tracked"] == len(SIZES[world])
        np.testing.assert_allclose(r["y_eval"], reference["y_eval"], **TOL)


def test_sync_welford_running_statistics_are_pooled_over_all_data_seen(layers):
    world, results = layers
    case = LAYER_CASES[world]["layer_welford"]
    ranks = part(results, "layer_welford")
    everything = np.concatenate([b for row in case["steps"] for b in row])
    per_channel = everything.transpose(1, 0, 2, 3).reshape(C, -1)
    mean, var = per_channel.mean(axis=1), per_channel.var(axis=1, ddof=1)
    for rank, r in enumerate(ranks):
        np.testing.assert_array_equal(r["running_mean"], ranks[0]["running_mean"])
        np.testing.assert_array_equal(r["running_var"], ranks[0]["running_var"])
        np.testing.assert_allclose(r["running_mean"], mean, **TOL, err_msg=f"mean, rank {rank}")
        np.testing.assert_allclose(r["running_var"], var, **TOL, err_msg=f"var, rank {rank}")
        assert r["num_batches_tracked"] == len(SIZES[world])


LOW_PRECISION_TOL = {
    "float16": {"rtol": 2e-3, "atol": 4e-3},
    "bfloat16": {"rtol": 1.6e-2, "atol": 3e-2},
    "float32": {"rtol": 1e-5, "atol": 1e-5},
}
"""Outputs and gradients: a few units of the dtype's precision (float16 eps 9.8e-4,
bfloat16 7.8e-3) at values of a few units."""


@pytest.mark.parametrize("dtype", list(workers.DTYPES))
def test_sync_in_low_precision_computes_the_statistics_in_float32(layers_on_2, dtype):
    """float16 used to overflow (M2 = var * count in float16): all-zero output, batch skipped."""
    case = LOW_PRECISION_CASES[f"low_precision_{dtype}"]
    ranks = part(layers_on_2, f"low_precision_{dtype}")
    bn = nn.BatchNorm2d(C, dtype=F64)
    with torch.no_grad():
        bn.weight.copy_(torch.from_numpy(case["weight"]))
        bn.bias.copy_(torch.from_numpy(case["bias"]))
    x = torch.from_numpy(np.concatenate(case["batches"])).requires_grad_()
    y = bn(x)
    (y * torch.from_numpy(np.concatenate(case["loss_weights"]))).sum().backward()
    everything = np.concatenate(case["batches"]).transpose(1, 0, 2, 3).reshape(C, -1)
    mean, var = everything.mean(axis=1), everything.var(axis=1, ddof=1)
    tolerance = LOW_PRECISION_TOL[dtype]
    for rank, (r, cut) in enumerate(zip(ranks, rank_slices([4, 4]), strict=True)):
        assert r["dtype"] == f"torch.{dtype}"
        assert (r["skipped"], r["tracked"]) == (0, 1), f"rank {rank}"
        np.testing.assert_allclose(r["y"], y.detach().numpy()[cut], **tolerance)
        np.testing.assert_allclose(r["x_grad"], x.grad.numpy()[cut], **tolerance)
        # statistics at float32 precision whatever the dtype
        np.testing.assert_allclose(r["mean"], mean, rtol=1e-6, err_msg=f"rank {rank}")
        np.testing.assert_allclose(r["var"], var, rtol=1e-5, err_msg=f"rank {rank}")
        np.testing.assert_array_equal(r["var"], ranks[0]["var"])
    for name, grad in (("weight_grad", bn.weight.grad), ("bias_grad", bn.bias.grad)):
        total = sum(r[name] for r in ranks)
        np.testing.assert_allclose(total, grad.numpy(), rtol=1e-2, atol=1.0, err_msg=name)


def test_sync_step_is_one_all_gather_without_host_reads_after_the_first(layers):
    """It used to be two all-gathers every step (shapes, then moments) and a host read."""
    world, results = layers
    for rank, r in enumerate(part(results, "steady_state")):
        # the first step with these channels also compares every rank's shape
        assert r["first"] == {"all-gather": 2, "all-reduce": 1}, f"rank {rank}"
        assert r["later"] == [{"all-gather": 1, "all-reduce": 1}] * 3, f"rank {rank}"
        assert r["host_reads"] == "none", f"rank {rank} of {world}"
        assert r["tracked"] == 4


@pytest.mark.parametrize("stats", ["welford", "ema"])
def test_sync_steps_wait_in_the_ring_and_fold_as_one_process_would(layers_on_2, stats):
    """A synchronized step used to fold its merged moments into the strategy at once (some
    thirty tensor operations every step); it now leaves them in the ring, which folds every
    SLOTS steps and when sync is switched off, to the statistics of folding step by step."""
    case = RING_CASES[f"ring_{stats}"]
    merged = [np.concatenate(row) for k, row in enumerate(case["steps"]) if k != NAN_STEP]
    for rank, r in enumerate(part(layers_on_2, f"ring_{stats}")):
        # between two folds of the ring the strategy is left as it is
        assert r["pending"] == RING_STEPS - 2 - SLOTS, f"rank {rank}"
        for name, value in r["after_fold"].items():
            np.testing.assert_array_equal(r["later"][name], value, err_msg=f"{name}, rank {rank}")
        seen = merged[:-2] + case["local"][rank] + merged[-2:]
        if stats == "welford":
            per_channel = np.concatenate(seen).transpose(1, 0, 2, 3).reshape(C, -1)
            mean, var = per_channel.mean(axis=1), per_channel.var(axis=1, ddof=1)
        else:
            reference = nn.BatchNorm2d(C, momentum=MOMENTUM, dtype=F64)
            for x in seen:
                reference(torch.from_numpy(x))
            mean, var = reference.running_mean.numpy(), reference.running_var.numpy()
        np.testing.assert_allclose(r["running_mean"], mean, **TOL, err_msg=f"rank {rank}")
        np.testing.assert_allclose(r["running_var"], var, **TOL, err_msg=f"rank {rank}")
        assert (r["tracked"], r["skipped"]) == (len(seen), 1), f"rank {rank}"


def test_sync_total_of_at_most_one_value_raises_on_every_rank(faults_on_3):
    for rank, r in enumerate(part(faults_on_3, "tiny_totals")):
        for name, total in (("one", 1), ("none", 0)):
            assert r[name] == (
                "ValueError: Expected more than 1 value per channel when training, got "
                f"{total} over all ranks"
            ), f"rank {rank}: {r[name]}"
            assert r[name + " tracked"] == 0
            assert r[name + " in_sync"]


def test_sync_total_of_two_single_values_normalizes_them_together(faults_on_3):
    ranks = part(faults_on_3, "tiny_totals")
    batches = TINY_TOTALS["two"]
    bn = nn.BatchNorm1d(C, dtype=F64)
    expected = bn(torch.from_numpy(np.concatenate(batches))).detach().numpy()
    everything = np.concatenate(batches)
    for rank, (r, cut) in enumerate(zip(ranks, rank_slices([1, 0, 1]), strict=True)):
        np.testing.assert_allclose(r["two"]["y"], expected[cut], **TOL, err_msg=f"rank {rank}")
        np.testing.assert_allclose(r["two"]["mean"], everything.mean(axis=0), **TOL)
        np.testing.assert_allclose(r["two"]["var"], everything.var(axis=0, ddof=1), **TOL)
        assert r["two tracked"] == 1
        assert r["two in_sync"]


def test_sync_input_that_stops_fitting_raises_there_and_spoils_the_others_step(faults_on_3):
    """After the first step the shapes are not compared again; a rank whose input no longer
    fits still takes part (no rank waits for it) with a NaN count, then raises."""
    ranks = part(faults_on_3, "late_mismatch")
    message = ranks[1]["outcome"]
    assert message.startswith("ValueError: x: expected 2D to 5D input with 5 channels"), message
    assert "(4, 6, 2, 2)" in message
    assert "NaN" in message
    assert (ranks[1]["tracked"], ranks[1]["skipped"]) == (1, 0)
    for rank in (0, 2):
        r = ranks[rank]
        assert r["outcome"] == "no error"
        assert np.isnan(r["y"]).all(), f"rank {rank}"
        assert (r["tracked"], r["skipped"]) == (1, 1), f"rank {rank}"
    assert all(r["in_sync"] for r in ranks)


def exact_union(
    counts: list[int], means: np.ndarray[Any, Any], m2s: np.ndarray[Any, Any]
) -> tuple[list[Fraction], list[Fraction]]:
    """Mean and M2 of the union of samples with these counts, means and M2s, exactly."""
    n = sum(counts)
    union_means, union_m2s = [], []
    for j in range(means.shape[1]):
        mean = sum((c * Fraction(float(m)) for c, m in zip(counts, means[:, j], strict=True)))
        mean /= n
        spread = sum(
            (c * (Fraction(float(m)) - mean) ** 2 for c, m in zip(counts, means[:, j], strict=True))
        )
        union_means.append(mean)
        union_m2s.append(sum(Fraction(float(m2)) for m2 in m2s[:, j]) + spread)
    return union_means, union_m2s


def test_merge_rows_is_the_exact_union_of_the_rows():
    """All rows at once, around a reference (one row's mean), with an empty row: to float64
    rounding of the union's mean and M2 (exact rationals), means far from zero too."""
    rng = np.random.default_rng(37)
    counts = [5, 1, 0, 12, 7]
    means = 1e8 + rng.normal(size=(5, 3)) * [1.0, 0.01, 100.0]
    means[2] = 0.0  # an empty row's mean is 0
    m2s = rng.uniform(0.0, 10.0, size=(5, 3)) * np.array(counts)[:, None]
    rows = torch.tensor(means)
    reference = rows[int(np.argmax(counts))]
    total, step, m2 = merge_rows(
        torch.tensor(counts, dtype=F64), rows - reference, torch.tensor(m2s)
    )
    exact_mean, exact_m2 = exact_union(counts, means, m2s)
    assert total.item() == 25
    # the reference's digits are exact: the mean is rounded once, to half an ulp (2**-53);
    # without a reference this mean is 1.3e-16 off
    assert relative_error_to_exact(reference + step, exact_mean) < 1.2e-16
    assert relative_error_to_exact(m2, exact_m2) < 1e-14


# -- 2. recalibrate over shards is recalibrate over the whole dataset ------------------------


def single_process_statistics(batches: list[np.ndarray[Any, Any]], **kwargs: Any) -> list[Any]:
    model = workers.recalibration_net()
    workers.load_numpy_state(model, recalibration_case(2)["state"])
    model = recalibrate(
        convert(model, stats="exact"), [torch.from_numpy(b) for b in batches], **kwargs
    )
    return [
        (m.running_mean.numpy().copy(), m.running_var.numpy().copy())
        for m in model.modules()
        if isinstance(m, BatchNorm)
    ]


def assert_same_statistics(actual: list[Any], expected: list[Any], label: str) -> None:
    assert len(actual) == len(expected) == 3, label
    for i, ((mean, var), (ref_mean, ref_var)) in enumerate(zip(actual, expected, strict=True)):
        np.testing.assert_allclose(mean, ref_mean, **TOL, err_msg=f"{label}: mean of layer {i}")
        np.testing.assert_allclose(var, ref_var, **TOL, err_msg=f"{label}: var of layer {i}")


@pytest.mark.parametrize("mode", ["one_pass", "layerwise"])
def test_recalibrate_over_shards_gives_every_rank_the_whole_dataset_statistics(layers, mode):
    world, results = layers
    ranks = part(results, "recalibrate")
    reference = single_process_statistics(calibration_batches(), layerwise=mode == "layerwise")
    for rank, r in enumerate(ranks):
        assert_same_statistics(r[mode], reference, f"{mode}, rank {rank} of {world}")
        assert r["in_sync"]


def test_recalibrate_without_sync_gives_each_rank_its_own_shard(layers):
    world, results = layers
    ranks = part(results, "recalibrate")
    batches = calibration_batches()
    whole = single_process_statistics(batches)
    for rank, (r, shard) in enumerate(zip(ranks, SHARDS[world], strict=True)):
        if not shard:  # nothing of its own: refused, as in one process with no data
            assert isinstance(r["unsynced"], str), r["unsynced"]
            assert r["unsynced"].startswith("ValueError"), r["unsynced"]
            continue
        own = single_process_statistics([batches[i] for i in shard])
        assert_same_statistics(r["unsynced"], own, f"sync=False, rank {rank} of {world}")
        assert not np.allclose(r["unsynced"][0][0], whole[0][0], rtol=1e-6)


@pytest.mark.parametrize("mode", ["one_pass", "layerwise"])
def test_recalibrate_merges_over_each_layers_process_group(layers_on_3, mode):
    """Groups {0, 1} and {2}: each gets the statistics of its own ranks' shards (the whole
    world's used to reach every rank, whatever the layers' process_group)."""
    ranks = part(layers_on_3, "grouped")
    batches = calibration_batches()
    layerwise = mode == "layerwise"
    whole = single_process_statistics(batches, layerwise=layerwise)
    shards = SHARDS[3]
    for members in ([0, 1], [2]):
        group_batches = [batches[i] for rank in members for i in shards[rank]]
        expected = single_process_statistics(group_batches, layerwise=layerwise)
        for rank in members:
            label = f"{mode}, rank {rank} in group {members}"
            assert_same_statistics(ranks[rank][mode], expected, label)
            assert not np.allclose(ranks[rank][mode][0][0], whole[0][0], rtol=1e-6), label
    assert all(r["in_sync"] for r in ranks)


@pytest.fixture(scope="module")
def recalibration_faults() -> list[dict[str, Any]]:
    gave_up = mp.get_context("spawn").Semaphore(0)
    return part(spawn("recalibration_faults", 3, recalibration_case(3), gave_up), "faults")


@pytest.mark.parametrize(("mode", "call"), [("one_pass", 2), ("layerwise", 5)])
def test_recalibrate_rank_whose_forward_fails_stops_every_rank(recalibration_faults, mode, call):
    """Rank 2's forward raises; the others used to wait for it in the merge until the
    process group's timeout."""
    error = f"RuntimeError: forward {call} failed on rank 2"
    for rank, r in enumerate(recalibration_faults):
        outcome = r[mode]["outcome"]
        if rank == 2:
            assert outcome == error
        else:
            assert outcome.startswith("RankFailedError: recalibrate: "), f"rank {rank}: {outcome}"
            assert f"rank 2: {error}" in outcome, outcome
        assert r[mode]["untouched"], f"rank {rank}: the model changed"
        assert r[mode]["in_sync"]


def test_recalibrate_nan_batch_under_raise_on_one_rank_stops_every_rank(recalibration_faults):
    expected = "ValueError: data: expected finite values, got NaN or Inf in batch 1 at the input"
    for rank, r in enumerate(recalibration_faults):
        outcome = r["nan"]["outcome"]
        if rank == 2:
            assert outcome.startswith(expected), outcome
        else:
            assert outcome.startswith("RankFailedError"), f"rank {rank}: {outcome}"
            assert f"rank 2: {expected}" in outcome, outcome
        assert r["nan"]["untouched"], f"rank {rank}: the model changed"
        assert r["nan"]["in_sync"]


def test_recalibrate_rank_that_hangs_times_the_others_out(recalibration_faults):
    """Rank 1 arrives only once the others have given up (it waits for them to say so)."""
    for rank, r in enumerate(recalibration_faults):
        outcome = r["hang"]["outcome"]
        assert r["hang"]["untouched"], f"rank {rank}: the model changed"
        if rank == 1:  # too late: its partners are gone, one way or the other
            assert outcome.startswith(("TimeoutError", "RankFailedError")), outcome
            continue
        assert outcome.startswith("TimeoutError: recalibrate: "), f"rank {rank}: {outcome}"
        assert "within 1 s" in outcome, outcome


def test_recalibrate_rank_that_dies_fails_the_others():
    """Rank 1's process ends during its pass: rank 0 fails instead of waiting."""
    results = spawn("dying", 2, calibration_batches()[:3], dying=frozenset({1}))
    assert results[1] is None
    outcome = part(results[:1], "dying")[0]["outcome"]
    assert outcome.startswith("RankFailedError: recalibrate: "), outcome
    assert "the collective with the other ranks failed" in outcome, outcome


@pytest.mark.parametrize(
    ("timeout", "error"),
    [(0, ValueError), (-1.0, ValueError), (float("inf"), ValueError), ("5", TypeError)],
)
def test_recalibrate_refuses_a_timeout_that_is_not_a_positive_number(timeout, error):
    model = convert(workers.recalibration_net(), stats="exact")
    before = workers.numpy_state(model)
    with pytest.raises(error, match="timeout"):
        recalibrate(model, [torch.zeros(4, 2, SIDE, SIDE, dtype=F64)], timeout=timeout)
    after = workers.numpy_state(model)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_recalibrate_takes_a_numpy_timeout():
    assert not dist.is_initialized()
    batches = calibration_batches()
    with_timeout = single_process_statistics(batches, timeout=np.float32(2.5))
    assert_same_statistics(with_timeout, single_process_statistics(batches), "numpy timeout")


# -- 3. convert: nn.SyncBatchNorm becomes a synchronized BatchNorm -----------------------------


def test_converted_sync_batchnorm_synchronizes_across_ranks(layers_on_2):
    ranks = part(layers_on_2, "convert")
    case = convert_case()
    reference = workers.plain_bn_net()
    workers.load_numpy_state(reference, case["state"])
    reference.train()
    x = torch.from_numpy(np.concatenate(case["batch"])).requires_grad_()
    y = reference(x)
    (y * torch.from_numpy(np.concatenate(case["loss_weights"]))).sum().backward()
    for rank, (r, cut) in enumerate(zip(ranks, rank_slices([5, 2]), strict=True)):
        assert r["left"] == [], f"rank {rank}: SyncBatchNorm left after convert"
        assert r["layers"] == [(True, None, "ema")] * 2, f"rank {rank}: {r['layers']}"
        np.testing.assert_allclose(r["y"], y.detach().numpy()[cut], **TOL)
        np.testing.assert_allclose(r["x_grad"], x.grad.numpy()[cut], **TOL)
        for key, value in reference.state_dict().items():
            if key.endswith(("running_mean", "running_var")):
                np.testing.assert_allclose(r["state"][key], value.numpy(), **TOL, err_msg=key)
    for name, parameter in reference.named_parameters():
        total = sum(r["param_grads"][name] for r in ranks)
        np.testing.assert_allclose(total, parameter.grad.numpy(), **TOL, err_msg=name)


# -- 4. DDP with synchronized BatchNorm trains as one process on the whole batch -------------


DDP_STEPS, DDP_BATCH, DDP_LR = 4, 8, 0.1


def ddp_case() -> dict[str, Any]:
    rng = np.random.default_rng(17)
    return {
        "state": initial_state(lambda: workers.small_cnn(lambda c: nn.BatchNorm2d(c)), 19),
        "inputs": [rng.normal(size=(DDP_BATCH, 2, SIDE, SIDE)) for _ in range(DDP_STEPS)],
        "targets": [rng.integers(0, 3, size=DDP_BATCH) for _ in range(DDP_STEPS)],
        "lr": DDP_LR,
    }


def test_ddp_with_sync_batchnorm_trains_as_one_process_on_the_whole_batch():
    case = ddp_case()
    ranks = part(spawn("ddp", 2, case), "ddp")
    reference = workers.small_cnn(lambda c: nn.BatchNorm2d(c, momentum=0.1))
    workers.load_numpy_state(reference, case["state"])
    optimizer = torch.optim.SGD(reference.parameters(), lr=DDP_LR, momentum=0.9)
    for x, t in zip(case["inputs"], case["targets"], strict=True):
        optimizer.zero_grad()
        F.cross_entropy(reference(torch.from_numpy(x)), torch.from_numpy(t)).backward()
        optimizer.step()
    expected = reference.state_dict()
    initial = case["state"]
    for rank, r in enumerate(ranks):
        for key, value in expected.items():
            np.testing.assert_allclose(
                r[key], value.numpy(), rtol=1e-10, atol=1e-10, err_msg=f"{key}, rank {rank}"
            )
        # the training moved the weights (the comparison is not between two initial states)
        assert not np.allclose(r["0.weight"], initial["0.weight"])


# -- 5. faults: every rank raises the same error, nothing hangs ---------------------------------


def test_channels_differing_across_ranks_raise_on_every_rank_naming_them(faults_on_3):
    ranks = part(faults_on_3, "channels")
    assert len({r["channels"] for r in ranks}) == 1, "the ranks' messages differ"
    for rank, r in enumerate(ranks):
        message = r["channels"]
        assert message.startswith("ValueError"), f"rank {rank}: {message}"
        assert "rank 0: 4D, 3 channels, num_features 3" in message, message
        assert "rank 1: 4D, 4 channels, num_features 4" in message, message
        count, mean, var = r["channels_untouched"]
        assert count == 0
        np.testing.assert_array_equal(mean, np.zeros_like(mean))
        np.testing.assert_array_equal(var, np.ones_like(var))
        assert r["channels_in_sync"]


def test_input_ranks_differing_across_ranks_raise_on_every_rank_naming_them(faults_on_3):
    ranks = part(faults_on_3, "channels")
    assert len({r["input_rank"] for r in ranks}) == 1, "the ranks' messages differ"
    for rank, r in enumerate(ranks):
        message = r["input_rank"]
        assert message.startswith("ValueError"), f"rank {rank}: {message}"
        assert "rank 0: 2D" in message, message
        assert "rank 1: 4D" in message, message
        assert r["input_rank_in_sync"]


def one_estimator(cls: type, streams: list[list[np.ndarray[Any, Any]]]) -> Any:
    stats = cls()
    for stream in streams:
        for batch in stream:
            stats.update(batch)
    return stats


@pytest.mark.parametrize("kind", ["numpy", "torch"])
@pytest.mark.parametrize("name", sorted(workers.ESTIMATORS))
def test_all_reduce_stats_is_one_estimator_fed_every_stream(faults_on_3, name, kind):
    streams = welford_streams()
    reference = one_estimator(workers.ESTIMATORS[name], streams)
    ranks = part(faults_on_3, "all_reduce_stats")
    for rank, r in enumerate(ranks):
        got = r[name, kind]
        assert got["same_object"]
        assert got["count"] == reference.count
        assert got["num_batches"] == reference.num_batches
        np.testing.assert_allclose(got["mean"], reference.mean, **TOL, err_msg=f"rank {rank}")
        np.testing.assert_allclose(got["var"], reference.var, **TOL, err_msg=f"rank {rank}")
        np.testing.assert_array_equal(got["mean"], ranks[0][name, kind]["mean"])
        if streams[rank]:  # the state comes back where it was
            assert got["kind"] == ("Tensor" if kind == "torch" else "ndarray"), got["kind"]
        assert r["in_sync"]


def test_all_reduce_stats_refuses_ema_on_every_rank_before_communicating(faults_on_3):
    for rank, r in enumerate(part(faults_on_3, "stats_faults")):
        for debias in (False, True):
            outcome = r["ema", debias]
            assert outcome.startswith("TypeError"), f"rank {rank}, debias={debias}: {outcome}"
            assert "ExponentialMovingAverage" in outcome, outcome
            assert r["ema_untouched", debias]
        assert r["ema_in_sync"]


def test_all_reduce_stats_feature_shapes_differing_raise_on_every_rank(faults_on_3):
    for rank, r in enumerate(part(faults_on_3, "stats_faults")):
        message = r["shapes"]
        assert message.startswith("ValueError"), f"rank {rank}: {message}"
        assert "rank 0: (3,)" in message, message
        assert "rank 1: (4,)" in message, message
        assert r["shapes_untouched"]
        assert r["shapes_in_sync"]


# -- 6. without a process group, sync=True is world size 1 ------------------------------------


def test_sync_without_process_group_behaves_as_unsynchronized():
    assert not dist.is_initialized()
    rng = np.random.default_rng(23)
    for stats in ("ema", "welford", "cumulative"):
        synced = BatchNorm(C, stats=stats, sync=True, dtype=F64)
        local = BatchNorm(C, stats=stats, sync=False, dtype=F64)
        for n in (4, 1, 6):
            data = torch.from_numpy(rng.normal(2.0, 3.0, size=(n, C, SIDE, SIDE)))
            x_sync, x_local = data.clone().requires_grad_(), data.clone().requires_grad_()
            y_sync, y_local = synced(x_sync), local(x_local)
            weights = torch.from_numpy(rng.normal(size=tuple(data.shape)))
            (y_sync * weights).sum().backward()
            (y_local * weights).sum().backward()
            torch.testing.assert_close(y_sync, y_local, rtol=0, atol=0)
            torch.testing.assert_close(x_sync.grad, x_local.grad, rtol=0, atol=0)
        for (key, a), (_, b) in zip(
            synced.state_dict().items(), local.state_dict().items(), strict=True
        ):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{stats}: {key}")
        torch.testing.assert_close(synced.weight.grad, local.weight.grad, rtol=0, atol=0)
        synced.eval()
        local.eval()
        probe = torch.from_numpy(rng.normal(size=(3, C, SIDE, SIDE)))
        torch.testing.assert_close(synced(probe), local(probe), rtol=0, atol=0)


def test_all_reduce_stats_without_process_group_leaves_the_estimator_alone():
    assert not dist.is_initialized()
    stats = ns.Welford()
    stats.update(np.arange(12.0).reshape(4, 3))
    before = copy.deepcopy(stats.state_dict())
    assert all_reduce_stats(stats) is stats
    for key, value in stats.state_dict().items():
        np.testing.assert_array_equal(value, before[key])
    with pytest.raises(TypeError, match="ExponentialMovingAverage"):
        all_reduce_stats(ns.ExponentialMovingAverage())


# -- 7. share_memory: the strategy's buffers too (for torch.multiprocessing) --------------------


@pytest.mark.parametrize("stats", ["ema", "welford", "cumulative", "exact"])
def test_share_memory_reaches_the_strategy_buffers_which_stay_float64(stats):
    """``share_memory()`` used to leave the strategy's float64 buffers in private memory."""
    bn = BatchNorm(C, stats=stats)
    bn(torch.randn(6, C, SIDE, SIDE))
    strategy = {name: b.clone() for name, b in bn.strategy_state.named_buffers()}
    assert bn.share_memory() is bn
    for name, buffer in bn.named_buffers():
        assert buffer.is_shared(), name
    for name, buffer in bn.strategy_state.named_buffers():
        assert buffer.dtype == F64, name
        torch.testing.assert_close(buffer, strategy[name], rtol=0, atol=0)
    bn(torch.randn(5, C, SIDE, SIDE))  # a step writes into the shared buffers in place
    assert all(b.is_shared() for b in bn.buffers())
    bn.half()
    assert bn.running_mean.dtype == torch.float16
    assert all(b.dtype == F64 for b in bn.strategy_state.buffers())


# -- 5. small-batch modes under sync: Batch Renormalization and Ghost BatchNorm -----------------


SMALL_BATCH_SIZES = [[5, 2], [3, 0], [4, 4], [1, 6], [6, 3]]
"""Per step, each of 2 ranks' batch size: uneven, one rank empty once."""
RENORM = {"renorm": True, "r_max": 1.5, "d_max": 0.5, "renorm_warmup": 2}
GHOST = {"virtual_batch_size": 2}


def small_batch_case(seed: int, **settings: Any) -> dict[str, Any]:
    """Per step and rank a (N, C, 4, 4) float64 batch near mean 0 and variance 1 whose
    statistics drift (so that renorm clips some channels), loss weights, and parameters."""
    rng = np.random.default_rng(seed)
    steps = [
        [rng.normal(size=(n, C, SIDE, SIDE)) * (1.0 + 0.3 * k) + 0.2 * k - 0.3 for n in row]
        for k, row in enumerate(SMALL_BATCH_SIZES)
    ]
    return {
        "steps": steps,
        "loss_weights": [[rng.normal(size=b.shape) for b in row] for row in steps],
        "weight": rng.uniform(0.5, 1.5, size=C),
        "bias": rng.normal(size=C),
        "eval_input": rng.normal(size=(4, C, SIDE, SIDE)),
        "stats": "ema",
        "momentum": MOMENTUM,
        **settings,
    }


SMALL_BATCH_CASES = {
    "renorm": small_batch_case(51, **RENORM),
    "ghost": small_batch_case(52, **GHOST),
}


@pytest.fixture(scope="module")
def small_batch_on_2() -> list[dict[str, Any]]:
    return spawn("small_batch", 2, SMALL_BATCH_CASES)


def parameters_of(case: dict[str, Any]) -> list[Any]:
    return [torch.from_numpy(case[k]).clone().requires_grad_() for k in ("weight", "bias")]


def test_sync_renorm_corrects_with_the_global_batch_statistics(small_batch_on_2):
    """Outputs and input gradients are Batch Renormalization's definition over the
    concatenated batch (r and d from its statistics and an EMA of the concatenated batches),
    and parameter gradients summed over ranks are those of one process."""
    from normstats.functional import renorm_limits

    from .test_small_batch import renorm_reference

    case = SMALL_BATCH_CASES["renorm"]
    ranks = part(small_batch_on_2, "renorm")
    estimator = ns.EMA(momentum=MOMENTUM)
    clipped = []
    for step, (row, weights) in enumerate(zip(case["steps"], case["loss_weights"], strict=True)):
        parameters = parameters_of(case)
        x = torch.from_numpy(np.concatenate(row)).requires_grad_()
        estimate = None if step == 0 else (estimator.mean, estimator.var)
        limits = renorm_limits(step, RENORM["renorm_warmup"], RENORM["r_max"], RENORM["d_max"])
        y, clip = renorm_reference(x, *parameters, estimate, limits)
        (y * torch.from_numpy(np.concatenate(weights))).sum().backward()
        clipped.append(clip)
        for rank, cut in enumerate(rank_slices(SMALL_BATCH_SIZES[step])):
            r = ranks[rank]
            np.testing.assert_allclose(r["y"][step], y.detach().numpy()[cut], **TOL)
            np.testing.assert_allclose(r["x_grad"][step], x.grad.numpy()[cut], **TOL)
        for name, parameter in zip(("weight_grad", "bias_grad"), parameters, strict=True):
            total = sum(r[name][step] for r in ranks)
            np.testing.assert_allclose(total, parameter.grad.numpy(), **TOL, err_msg=name)
        estimator.update(x.detach().numpy(), axis=(0, 2, 3))
    seen = torch.stack(clipped[1:])
    assert seen.any()
    assert not seen.all()
    for r in ranks:
        np.testing.assert_allclose(r["running_mean"], estimator.mean, **TOL)
        np.testing.assert_allclose(r["running_var"], estimator.var, **TOL)
        assert r["num_batches_tracked"] == len(SMALL_BATCH_SIZES)


def test_sync_ghost_normalizes_each_ranks_virtual_batches_and_feeds_the_whole_batch(
    small_batch_on_2,
):
    """Each rank's output and gradients are those of its own virtual batches normalized
    separately (nothing crosses ranks); the running statistics, the same on every rank, are
    torch's EMA over the concatenated batches, one update per step."""
    from .test_small_batch import ghost_reference

    case = SMALL_BATCH_CASES["ghost"]
    ranks = part(small_batch_on_2, "ghost")
    twin = nn.BatchNorm2d(C, momentum=MOMENTUM, dtype=F64)
    with torch.no_grad():
        twin.weight.copy_(torch.from_numpy(case["weight"]))
        twin.bias.copy_(torch.from_numpy(case["bias"]))
    for step, (row, weights) in enumerate(zip(case["steps"], case["loss_weights"], strict=True)):
        for rank, (batch, w) in enumerate(zip(row, weights, strict=True)):
            parameters = parameters_of(case)
            x = torch.from_numpy(batch).requires_grad_()
            y = ghost_reference(x, GHOST["virtual_batch_size"], *parameters) if len(batch) else x
            (y * torch.from_numpy(w)).sum().backward()
            r = ranks[rank]
            np.testing.assert_allclose(r["y"][step], y.detach().numpy(), **TOL)
            if len(batch):
                np.testing.assert_allclose(r["x_grad"][step], x.grad.numpy(), **TOL)
                np.testing.assert_allclose(
                    r["weight_grad"][step], parameters[0].grad.numpy(), **TOL
                )
                np.testing.assert_allclose(r["bias_grad"][step], parameters[1].grad.numpy(), **TOL)
        twin(torch.from_numpy(np.concatenate(row)))
    twin.eval()
    with torch.no_grad():
        y_eval = twin(torch.from_numpy(case["eval_input"])).numpy()
    for r in ranks:
        np.testing.assert_allclose(r["running_mean"], twin.running_mean.numpy(), **TOL)
        np.testing.assert_allclose(r["running_var"], twin.running_var.numpy(), **TOL)
        assert r["num_batches_tracked"] == len(SMALL_BATCH_SIZES)
        np.testing.assert_allclose(r["y_eval"], y_eval, **TOL)


def test_sync_ghost_step_is_one_all_gather_without_host_reads(small_batch_on_2):
    for rank, r in enumerate(part(small_batch_on_2, "ghost_steady_state")):
        # the normalization is local: no all-reduce in the backward pass
        assert r["later"] == [{"all-gather": 1, "all-reduce": 0}] * 2, f"rank {rank}"
        assert r["host_reads"] == "none", f"rank {rank}"
        assert r["untracked"] == {"all-gather": 0, "all-reduce": 0}, f"rank {rank}"
        assert r["tracked"] == 4


def test_sync_ghost_refused_virtual_batch_raises_there_and_skips_the_others_step(
    small_batch_on_2,
):
    first, second = part(small_batch_on_2, "ghost_fault")
    assert "virtual_batch_size=2" in first["error"]
    assert "error" not in second
    assert (first["tracked"], first["skipped"]) == (2, 0)
    assert (second["tracked"], second["skipped"]) == (2, 1)
    assert first["in_sync"]
    assert second["in_sync"]
