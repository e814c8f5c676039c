"""Worker side of ``test_distributed.py``: what every rank runs in its own process.

Spawned processes import these functions by module path, so they live here rather than in the
test module. :func:`entry` joins a gloo process group on 127.0.0.1, runs one task and puts
``(rank, ok, payload)`` on the queue: the task's results as NumPy arrays and plain Python, or
the formatted traceback. A task is a series of named parts; a part that raises records its
own traceback (``{"error": ...}``) and the next part still runs, so one library bug fails one
test, not the whole spawn. Everything a part returns is NumPy or plain Python (no tensors
cross the queue). The model builders are shared with the parent, which builds the
single-process references from the same weights.
"""

from __future__ import annotations

import datetime
import os
import traceback
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402, N812
from torch import nn  # noqa: E402

import normstats as ns  # noqa: E402
from normstats.adapters.torch import BatchNorm, convert, recalibrate  # noqa: E402
from normstats.adapters.torch.distributed import (  # noqa: E402
    all_reduce_stats,
    synchronized_batch_norm,
)
from normstats.adapters.torch.ring import SLOTS  # noqa: E402

from ...user_strategies import LastK, WithinBatch  # noqa: E402

TIMEOUT = datetime.timedelta(seconds=30)
F64 = torch.float64
IN_CHANNELS, SIDE = 2, 4


# -- models shared with the parent ---------------------------------------------------------


def sync_bn_net() -> nn.Module:
    """Conv, SyncBatchNorm, ReLU, 1x1 conv, SyncBatchNorm (float64): what ``convert`` takes."""
    return nn.Sequential(
        nn.Conv2d(IN_CHANNELS, 3, 3, padding=1),
        nn.SyncBatchNorm(3, momentum=0.2),
        nn.ReLU(),
        nn.Conv2d(3, 4, 1),
        nn.SyncBatchNorm(4),
    ).to(F64)


def plain_bn_net() -> nn.Module:
    """:func:`sync_bn_net` with ``nn.BatchNorm2d``: the single-process reference."""
    return nn.Sequential(
        nn.Conv2d(IN_CHANNELS, 3, 3, padding=1),
        nn.BatchNorm2d(3, momentum=0.2),
        nn.ReLU(),
        nn.Conv2d(3, 4, 1),
        nn.BatchNorm2d(4),
    ).to(F64)


def recalibration_net() -> nn.Module:
    """Two conv BN2d blocks and a dense BN1d (float64), for ``recalibrate``."""
    return nn.Sequential(
        nn.Conv2d(IN_CHANNELS, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * SIDE * SIDE, 6),
        nn.BatchNorm1d(6),
        nn.ReLU(),
        nn.Linear(6, 3),
    ).to(F64)


def small_cnn(norm: Callable[[int], nn.Module]) -> nn.Module:
    """Conv, BatchNorm (``norm``), ReLU, max-pool, linear (float64), for DDP."""
    return nn.Sequential(
        nn.Conv2d(IN_CHANNELS, 4, 3, padding=1),
        norm(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * (SIDE // 2) ** 2, 3),
    ).to(F64)


def numpy_state(module: nn.Module) -> dict[str, np.ndarray[Any, Any]]:
    """A module's state dict as NumPy copies."""
    return {k: v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()}


def load_numpy_state(module: nn.Module, state: dict[str, np.ndarray[Any, Any]]) -> None:
    module.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})


# -- the process ---------------------------------------------------------------------------


def entry(rank: int, world: int, port: int, queue: Any, task: str, args: tuple[Any, ...]) -> None:
    """Join the group, run ``TASKS[task](rank, world, *args)``, report, leave."""
    try:
        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=TIMEOUT,
        )
        result = TASKS[task](rank, world, *args)
    except BaseException:
        queue.put((rank, False, traceback.format_exc()))
    else:
        queue.put((rank, True, result))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _run_parts(parts: dict[str, Callable[[], Any]]) -> dict[str, Any]:
    """Each part's result, or ``{"error": traceback}`` for a part that raised."""
    results: dict[str, Any] = {}
    for name, part in parts.items():
        try:
            results[name] = {"value": part()}
        except Exception:
            results[name] = {"error": traceback.format_exc()}
    return results


def _np(t: Any) -> np.ndarray[Any, Any] | None:
    """A NumPy copy of a tensor, an array or a number (None stays None)."""
    if t is None:
        return None
    if isinstance(t, torch.Tensor):
        return t.detach().cpu().numpy().copy()
    return np.array(t)


def _in_sync(world: int) -> bool:
    """A collective right after a fault: every rank is still at the same point."""
    total = torch.tensor([dist.get_rank() + 1.0])
    dist.all_reduce(total)
    return float(total) == world * (world + 1) / 2


# -- tasks ---------------------------------------------------------------------------------


def sync_layer(
    rank: int,
    steps: list[list[np.ndarray[Any, Any]]],
    loss_weights: list[list[np.ndarray[Any, Any]]],
    weight: np.ndarray[Any, Any],
    bias: np.ndarray[Any, Any],
    eval_input: np.ndarray[Any, Any],
    **kwargs: Any,
) -> dict[str, Any]:
    """Train ``BatchNorm(C, sync=True, **kwargs)`` on this rank's batch of every step.

    Loss of this rank: ``(y * w_r).sum()``; returns every step's output, input gradient and
    parameter gradients, then the statistics and an eval-mode output.
    """
    bn = BatchNorm(weight.shape[0], sync=True, dtype=F64, **kwargs)
    with torch.no_grad():
        bn.weight.copy_(torch.from_numpy(weight))
        bn.bias.copy_(torch.from_numpy(bias))
    bn.train()
    record: dict[str, Any] = {"y": [], "x_grad": [], "weight_grad": [], "bias_grad": []}
    for batch, w in zip(steps, loss_weights, strict=True):
        x = torch.from_numpy(batch[rank]).requires_grad_()
        bn.zero_grad()
        y = bn(x)
        (y * torch.from_numpy(w[rank])).sum().backward()
        record["y"].append(_np(y))
        record["x_grad"].append(_np(x.grad))
        record["weight_grad"].append(_np(bn.weight.grad))
        record["bias_grad"].append(_np(bn.bias.grad))
    record["running_mean"] = _np(bn.running_mean)
    record["running_var"] = _np(bn.running_var)
    record["num_batches_tracked"] = int(bn.num_batches_tracked)
    bn.eval()
    with torch.no_grad():
        record["y_eval"] = _np(bn(torch.from_numpy(eval_input)))
    return record


def sync_ring(
    rank: int,
    steps: list[list[np.ndarray[Any, Any]]],
    local: list[list[np.ndarray[Any, Any]]],
    stats: str,
    **kwargs: Any,
) -> dict[str, Any]:
    """Train ``BatchNorm(C, sync=True, stats=stats)`` on this rank's batch of every step,
    but the last two (more steps than its ring holds), then on its own batches ``local[rank]``
    with ``sync`` off, then on the last two steps.

    Returns the strategy's buffers after the ring folded by itself and after the last
    synchronized step before ``local`` (read without folding), the slots pending then, and
    the statistics, read at the end.
    """
    bn = BatchNorm(steps[0][rank].shape[1], sync=True, stats=stats, dtype=F64, **kwargs)
    state = bn.strategy_state
    assert state is not None
    record: dict[str, Any] = {}
    for k, batch in enumerate(steps[:-2]):
        bn(torch.from_numpy(batch[rank]))
        if k + 1 == SLOTS:
            record["after_fold"] = {n: _np(v) for n, v in state.state_dict().items()}
    record["later"] = {n: _np(v) for n, v in state.state_dict().items()}
    record["pending"] = bn._ring.pending
    bn.sync = False
    for batch in local[rank]:
        bn(torch.from_numpy(batch))
    bn.sync = True
    for batch in steps[-2:]:
        bn(torch.from_numpy(batch[rank]))
    record["running_mean"] = _np(bn.running_mean)
    record["running_var"] = _np(bn.running_var)
    record["tracked"] = int(bn.num_batches_tracked)
    record["skipped"] = int(bn.num_batches_skipped)
    return record


DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def sync_low_precision(
    rank: int,
    batches: list[np.ndarray[Any, Any]],
    loss_weights: list[np.ndarray[Any, Any]],
    weight: np.ndarray[Any, Any],
    bias: np.ndarray[Any, Any],
    dtype: str,
) -> dict[str, Any]:
    """One training step of a ``BatchNorm(sync=True, stats="welford")`` module in ``dtype``
    on this rank's batch: output, gradients (as float64) and the strategy's statistics."""
    bn = BatchNorm(weight.shape[0], stats="welford", sync=True, dtype=DTYPES[dtype])
    with torch.no_grad():
        bn.weight.copy_(torch.from_numpy(weight))
        bn.bias.copy_(torch.from_numpy(bias))
    x = torch.from_numpy(batches[rank]).to(DTYPES[dtype]).requires_grad_()
    y = bn(x)
    (y.double() * torch.from_numpy(loss_weights[rank])).sum().backward()
    mean, var = bn.population_statistics()
    return {
        "dtype": str(y.dtype),
        "y": _np(y.double()),
        "x_grad": _np(x.grad.double()),
        "weight_grad": _np(bn.weight.grad.double()),
        "bias_grad": _np(bn.bias.grad.double()),
        "mean": _np(mean),
        "var": _np(var),
        "skipped": int(bn.num_batches_skipped),
        "tracked": int(bn.num_batches_tracked),
    }


def converted_sync_bn(
    rank: int,
    state: dict[str, np.ndarray[Any, Any]],
    batch: list[np.ndarray[Any, Any]],
    loss_weights: list[np.ndarray[Any, Any]],
) -> dict[str, Any]:
    """``convert`` a model of ``nn.SyncBatchNorm`` layers and train one step on this rank."""
    model = sync_bn_net()
    load_numpy_state(model, state)
    model = convert(model, stats="ema")
    layers = [m for m in model.modules() if isinstance(m, BatchNorm)]
    left = [type(m).__name__ for m in model.modules() if isinstance(m, nn.SyncBatchNorm)]
    model.train()
    x = torch.from_numpy(batch[rank]).requires_grad_()
    y = model(x)
    (y * torch.from_numpy(loss_weights[rank])).sum().backward()
    return {
        "layers": [(m.sync, m.process_group, m.stats_name) for m in layers],
        "left": left,
        "y": _np(y),
        "x_grad": _np(x.grad),
        "param_grads": {n: _np(p.grad) for n, p in model.named_parameters()},
        "state": numpy_state(model),
    }


def _statistics(model: nn.Module) -> list[tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]]:
    return [
        (_np(m.running_mean), _np(m.running_var))
        for m in model.modules()
        if isinstance(m, BatchNorm)
    ]


def recalibrated_shard(
    rank: int, state: dict[str, np.ndarray[Any, Any]], shards: list[list[np.ndarray[Any, Any]]]
) -> dict[str, Any]:
    """``recalibrate`` over this rank's shard: one pass, layerwise, and ``sync=False``."""
    shard = [torch.from_numpy(b) for b in shards[rank]]

    def fresh() -> nn.Module:
        model = recalibration_net()
        load_numpy_state(model, state)
        return convert(model, stats="exact")

    result: dict[str, Any] = {}
    result["one_pass"] = _statistics(recalibrate(fresh(), shard))
    result["layerwise"] = _statistics(recalibrate(fresh(), shard, layerwise=True))
    try:
        result["unsynced"] = _statistics(recalibrate(fresh(), shard, sync=False))
    except ValueError as error:  # a rank without data has nothing of its own
        result["unsynced"] = f"ValueError: {error}"
    result["in_sync"] = _in_sync(len(shards))
    return result


def grouped_recalibration(
    rank: int, state: dict[str, np.ndarray[Any, Any]], shards: list[list[np.ndarray[Any, Any]]]
) -> dict[str, Any]:
    """``recalibrate`` with the layers' ``process_group`` {0, 1} on ranks 0 and 1 and {2}
    on rank 2 (every rank creates both groups, as ``new_group`` asks)."""
    groups = [dist.new_group([0, 1]), dist.new_group([2])]
    shard = [torch.from_numpy(b) for b in shards[rank]]
    result: dict[str, Any] = {}
    for mode in ("one_pass", "layerwise"):
        model = recalibration_net()
        load_numpy_state(model, state)
        model = convert(model, stats="exact", process_group=groups[0 if rank < 2 else 1])
        result[mode] = _statistics(recalibrate(model, shard, layerwise=mode == "layerwise"))
    result["in_sync"] = _in_sync(len(shards))
    return result


class FailingAt(nn.Module):
    """``model``, except that its ``call``-th forward on rank ``rank`` raises."""

    def __init__(self, model: nn.Module, rank: int, call: int) -> None:
        super().__init__()
        self.model, self.rank, self.call, self.calls = model, rank, call, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if dist.get_rank() == self.rank and self.calls == self.call:
            raise RuntimeError(f"forward {self.call} failed on rank {self.rank}")
        out: torch.Tensor = self.model(x)
        return out


def _failed_recalibration(model: nn.Module, data: Any, **kwargs: Any) -> dict[str, Any]:
    """The error ``recalibrate`` raised here, and whether the model is as it was."""
    before = numpy_state(model)
    try:
        recalibrate(model, data, **kwargs)
        outcome = "no error"
    except Exception as error:
        outcome = f"{type(error).__name__}: {error}"
    after = numpy_state(model)
    untouched = before.keys() == after.keys() and all(
        np.array_equal(before[k], after[k]) for k in before
    )
    return {"outcome": outcome, "untouched": untouched}


def _waiting(
    rank: int, world: int, gave_up: Any, data: list[torch.Tensor]
) -> Iterator[torch.Tensor]:
    """``data``, except that rank 1 first waits (hangs) until every other rank gave up."""
    if rank == 1:
        for _ in range(world - 1):
            gave_up.acquire(timeout=60)
    yield from data


def recalibration_faults(
    rank: int,
    world: int,
    state: dict[str, np.ndarray[Any, Any]],
    shards: list[list[np.ndarray[Any, Any]]],
    gave_up: Any,
) -> dict[str, Any]:
    """A rank that fails during ``recalibrate`` (its forward raises, a NaN batch under
    nan_policy="raise"), then one that hangs while the others wait with a timeout (each
    releases ``gave_up``, a semaphore, once it did)."""
    shard = [torch.from_numpy(b) for b in shards[rank]]

    def fresh(**kwargs: Any) -> nn.Module:
        model = recalibration_net()
        load_numpy_state(model, state)
        return convert(model, stats="welford", **kwargs)

    result: dict[str, Any] = {}
    for mode, call in (("one_pass", 2), ("layerwise", 5)):
        model = FailingAt(fresh(), rank=2, call=call)
        layerwise = mode == "layerwise"
        result[mode] = _failed_recalibration(model, shard, layerwise=layerwise, timeout=20.0)
        result[mode]["in_sync"] = _in_sync(world)
    spoiled = [b.clone() for b in shard]
    if rank == 2:
        spoiled[1][0, 0, 0, 0] = float("nan")
    result["nan"] = _failed_recalibration(fresh(nan_policy="raise"), spoiled)
    result["nan"]["in_sync"] = _in_sync(world)
    # last, as the late rank's collectives find no partner: a rank that hangs
    data = _waiting(rank, world, gave_up, shard)
    result["hang"] = _failed_recalibration(fresh(), data, timeout=1.0)
    if rank != 1:
        gave_up.release()
    return result


def dying_rank(rank: int, world: int, batches: list[np.ndarray[Any, Any]]) -> dict[str, Any]:
    """Rank 1's process ends in the middle of its calibration pass; the other's error."""

    def data() -> Iterator[torch.Tensor]:
        for index, batch in enumerate(batches):
            if rank == 1 and index == 1:
                os._exit(3)
            yield torch.from_numpy(batch)

    model = recalibration_net()
    model = convert(model, stats="exact")
    try:
        recalibrate(model, data())
    except Exception as error:
        return {"outcome": f"{type(error).__name__}: {error}"}
    return {"outcome": "no error"}


def ddp_training(
    rank: int,
    world: int,
    state: dict[str, np.ndarray[Any, Any]],
    inputs: list[np.ndarray[Any, Any]],
    targets: list[np.ndarray[Any, Any]],
    lr: float,
) -> dict[str, Any]:
    """SGD under DDP on this rank's half of every global batch; the final state."""
    net = small_cnn(lambda c: BatchNorm(c, sync=True, momentum=0.1, dtype=F64))
    load_numpy_state(net, state)
    model = nn.parallel.DistributedDataParallel(net)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for x_all, t_all in zip(inputs, targets, strict=True):
        n = len(x_all)
        mine = slice(rank * n // world, (rank + 1) * n // world)
        x, t = torch.from_numpy(x_all[mine]), torch.from_numpy(t_all[mine])
        optimizer.zero_grad()
        # DDP averages the ranks' gradients: scale so the average is that of the global mean
        loss = F.cross_entropy(model(x), t, reduction="sum") / n * world
        loss.backward()
        optimizer.step()
    return numpy_state(net)


def channel_faults(rank: int, world: int) -> dict[str, Any]:
    """Ranks whose channels or input ranks differ: the error every rank raises."""
    channels = [3, 4, 3][rank]
    bn = BatchNorm(channels, sync=True, stats="welford")
    x = torch.randn(4, channels, 2, 2)
    result: dict[str, Any] = {}
    try:
        bn(x)
        result["channels"] = "no error"
    except ValueError as error:
        result["channels"] = f"ValueError: {error}"
    result["channels_untouched"] = (
        int(bn.num_batches_tracked),
        _np(bn.running_mean),
        _np(bn.running_var),
    )
    result["channels_in_sync"] = _in_sync(world)
    bn = BatchNorm(3, sync=True)
    x = torch.randn(6, 3) if rank == 0 else torch.randn(4, 3, 2, 2)
    try:
        bn(x)
        result["input_rank"] = "no error"
    except ValueError as error:
        result["input_rank"] = f"ValueError: {error}"
    result["input_rank_in_sync"] = _in_sync(world)
    return result


COLLECTIVE_OPS = {
    "all-gather": ("c10d::_allgather_base_", "c10d::allgather_"),
    "all-reduce": ("c10d::allreduce_",),
}
"""The profiler's names of the collectives a synchronized step may run (both all-gathers:
into one tensor, and into a list)."""
HOST_READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")
"""The tensor methods that read a value on the host (a synchronization on a GPU)."""


def _collectives(step: Callable[[], Any]) -> dict[str, int]:
    """How many of each collective ``step`` runs (torch.profiler's count of their ops)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        step()
    calls = {event.key: event.count for event in profile.key_averages()}
    return {name: sum(calls.get(op, 0) for op in ops) for name, ops in COLLECTIVE_OPS.items()}


def _without_host_reads(step: Callable[[], Any]) -> str:
    """Run ``step`` with every host read of a tensor raising; "none", or what it read."""
    patches = [
        mock.patch.object(torch.Tensor, name, side_effect=AssertionError(f"host read: {name}"))
        for name in HOST_READS
    ]
    for patch in patches:
        patch.start()
    try:
        step()
    except AssertionError as error:
        return str(error)
    finally:
        for patch in patches:
            patch.stop()
    return "none"


def steady_state(rank: int, world: int) -> dict[str, Any]:
    """Collectives of a synchronized layer's first and later training steps, and host reads
    of later steps (a channel count no other part uses, so the first step is its first)."""
    channels = 6
    bn = BatchNorm(channels, sync=True, stats="welford")
    x = torch.randn(rank + 2, channels, 2, 2, requires_grad=True)
    weight = torch.ones(channels, requires_grad=True)
    result: dict[str, Any] = {"first": _collectives(lambda: bn(x).sum().backward())}
    result["later"] = [_collectives(lambda: bn(x).sum().backward()) for _ in range(3)]

    def bare_step() -> None:
        y, *_ = synchronized_batch_norm(x, weight, None, 1e-5, channels, None)
        y.backward(torch.ones_like(y))

    result["host_reads"] = _without_host_reads(bare_step)
    result["tracked"] = int(bn.num_batches_tracked)
    return result


def tiny_totals(
    rank: int, world: int, cases: dict[str, list[np.ndarray[Any, Any]]]
) -> dict[str, Any]:
    """Steps whose ranks hold at most one value per channel (some none): the error every
    rank raises when the total is at most one, else the output and the statistics."""
    result: dict[str, Any] = {}
    for name, batches in cases.items():
        bn = BatchNorm(batches[rank].shape[1], sync=True, stats="welford", dtype=F64)
        try:
            y = bn(torch.from_numpy(batches[rank]))
            outcome: Any = {"y": _np(y), "mean": _np(bn.running_mean), "var": _np(bn.running_var)}
        except ValueError as error:
            outcome = f"ValueError: {error}"
        result[name] = outcome
        result[name + " tracked"] = int(bn.num_batches_tracked)
        result[name + " in_sync"] = _in_sync(world)
    return result


def late_mismatch(rank: int, world: int) -> dict[str, Any]:
    """A synchronized layer's second step, in which rank 1's input has other channels."""
    channels = 5
    bn = BatchNorm(channels, sync=True, stats="welford")
    bn(torch.randn(4, channels, 2, 2))
    x = torch.randn(4, channels + 1 if rank == 1 else channels, 2, 2)
    result: dict[str, Any] = {}
    try:
        result["y"] = _np(bn(x))
        result["outcome"] = "no error"
    except ValueError as error:
        result["outcome"] = f"ValueError: {error}"
    result["tracked"] = int(bn.num_batches_tracked)
    result["skipped"] = int(bn.num_batches_skipped)
    result["in_sync"] = _in_sync(world)
    return result


ESTIMATORS = {"welford": ns.Welford, "exact": ns.ExactFullPass, "cumulative": ns.CumulativeAverage}


def reduced_stats(rank: int, world: int, streams: list[list[np.ndarray[Any, Any]]]) -> Any:
    """``all_reduce_stats`` of every mergeable strategy, NumPy and torch state."""
    result: dict[str, Any] = {}
    for name, cls in ESTIMATORS.items():
        for kind in ("numpy", "torch"):
            stats = cls()
            for batch in streams[rank]:
                stats.update(torch.from_numpy(batch) if kind == "torch" else batch)
            returned = all_reduce_stats(stats)
            result[name, kind] = {
                "same_object": returned is stats,
                "kind": type(stats.mean).__name__,
                "mean": _np(stats.mean),
                "var": _np(stats.var),
                "count": int(stats.count),
                "num_batches": int(stats.num_batches),
            }
    result["in_sync"] = _in_sync(world)
    return result


COLLECTIVES = (
    "all_gather",
    "all_gather_object",
    "all_reduce",
    "broadcast",
    "broadcast_object_list",
)


def _reduced_without_collectives(stats: Any) -> str:
    """``all_reduce_stats(stats)`` with every collective raising: its error, or "no error"."""
    patches = [
        mock.patch.object(dist, name, side_effect=AssertionError(f"{name} was called"))
        for name in COLLECTIVES
    ]
    for patch in patches:
        patch.start()
    try:
        all_reduce_stats(stats)
        return "no error"
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    finally:
        for patch in patches:
            patch.stop()


def stats_faults(rank: int, world: int, streams: list[list[np.ndarray[Any, Any]]]) -> Any:
    """EMA (refused before any collective) and feature shapes that differ across ranks."""
    result: dict[str, Any] = {}
    for debias in (False, True):
        ema = ns.ExponentialMovingAverage(debias=debias)
        for batch in streams[rank]:
            ema.update(batch)
        before = dict(ema.state_dict())
        outcome = _reduced_without_collectives(ema)
        after = ema.state_dict()
        result["ema", debias] = outcome
        result["ema_untouched", debias] = all(
            np.array_equal(np.asarray(before[k]), np.asarray(after[k])) for k in before
        )
    result["ema_in_sync"] = _in_sync(world)
    stats = ns.Welford()
    features = [3, 4, 3][rank]
    if rank != 2:  # rank 2 has no data
        stats.update(np.arange(5.0 * features).reshape(5, features) + rank)
    before_count = int(stats.count)
    try:
        all_reduce_stats(stats)
        result["shapes"] = "no error"
    except ValueError as error:
        result["shapes"] = f"ValueError: {error}"
    result["shapes_untouched"] = int(stats.count) == before_count
    result["shapes_in_sync"] = _in_sync(world)
    return result


def sync_user_strategy(rank: int, steps: list[list[np.ndarray[Any, Any]]]) -> dict[str, Any]:
    """``BatchNorm(sync=True)`` with docs/strategies.md's ``LastK`` (k=2, by import path)
    trained on this rank's batch of every step: its statistics."""
    bn = BatchNorm(steps[0][rank].shape[1], sync=True, stats="tests.user_strategies:LastK", k=2)
    bn.to(F64)
    for row in steps:
        bn(torch.from_numpy(row[rank]))
    return {
        "running_mean": _np(bn.running_mean),
        "running_var": _np(bn.running_var),
        "tracked": int(bn.num_batches_tracked),
    }


def reduced_user_stats(
    rank: int, world: int, streams: list[list[np.ndarray[Any, Any]]]
) -> dict[str, Any]:
    """``all_reduce_stats`` of docs/strategies.md's ``WithinBatch`` (NumPy and torch state),
    and of its ``LastK``, which has no merge: the error, whether any collective ran, and
    whether the estimator is as it was."""
    result: dict[str, Any] = {}
    for kind in ("numpy", "torch"):
        stats = WithinBatch()
        for batch in streams[rank]:
            stats.update(torch.from_numpy(batch) if kind == "torch" else batch)
        returned = all_reduce_stats(stats)
        result[kind] = {
            "same_object": returned is stats,
            "kind": type(stats.mean).__name__,
            "mean": _np(stats.mean),
            "var": _np(stats.var),
            "count": stats.count,
            "num_batches": stats.num_batches,
        }
    window = LastK(k=2)
    for batch in streams[rank]:
        window.update(batch)
    before = window.state_dict()
    result["last_k"] = _reduced_without_collectives(window)
    after = window.state_dict()
    result["last_k_untouched"] = all(np.array_equal(before[k], after[k]) for k in before)
    result["in_sync"] = _in_sync(world)
    return result


def ghost_steady_state(rank: int, world: int) -> dict[str, Any]:
    """Collectives and host reads of a synchronized Ghost BatchNorm layer's later steps (its
    channels are compared across ranks at the first step), and no collective at all while
    it tracks nothing."""
    channels = 5
    bn = BatchNorm(channels, sync=True, stats="welford", virtual_batch_size=2)
    x = torch.randn(rank + 3, channels, 2, 2, requires_grad=True)
    bn(x).sum().backward()
    result: dict[str, Any] = {
        "later": [_collectives(lambda: bn(x).sum().backward()) for _ in range(2)],
        "host_reads": _without_host_reads(lambda: bn(x).sum().backward()),
    }
    bn.track_running_stats = False
    result["untracked"] = _collectives(lambda: bn(x).sum().backward())
    result["tracked"] = int(bn.num_batches_tracked)
    return result


def ghost_fault(rank: int, world: int) -> dict[str, Any]:
    """Rank 0's last virtual batch holds one value per channel: it raises, the others'
    step is skipped (NaN statistics) rather than left waiting, and the ranks stay in step."""
    bn = BatchNorm(C_FAULT, sync=True, stats="welford", virtual_batch_size=2)
    good = torch.randn(4, C_FAULT)
    bn(good)
    result: dict[str, Any] = {}
    try:
        bn(torch.randn(3 if rank == 0 else 4, C_FAULT))
    except ValueError as error:
        result["error"] = str(error)
    bn(good)
    result["tracked"] = int(bn.num_batches_tracked)
    result["skipped"] = int(bn.num_batches_skipped)
    result["in_sync"] = _in_sync(world)
    return result


C_FAULT = 3


def small_batch_task(rank: int, world: int, cases: dict[str, Any]) -> Any:
    """Synchronized renorm and ghost layers (:func:`sync_layer`), their collectives, and a
    ghost layer whose virtual batch is refused on one rank."""
    parts: dict[str, Callable[[], Any]] = {
        name: (lambda case=case: sync_layer(rank, **case)) for name, case in cases.items()
    }
    parts["ghost_steady_state"] = lambda: ghost_steady_state(rank, world)
    parts["ghost_fault"] = lambda: ghost_fault(rank, world)
    return _run_parts(parts)


# -- what one spawn runs -------------------------------------------------------------------


def layers_task(rank: int, world: int, layer_cases: dict[str, Any], others: dict[str, Any]) -> Any:
    """The layer checks of one world size (plus ``convert`` / ``recalibrate`` when given)."""
    parts: dict[str, Callable[[], Any]] = {}
    for name, case in layer_cases.items():
        parts[name] = lambda case=case: sync_layer(rank, **case)
    if "convert" in others:
        parts["convert"] = lambda: converted_sync_bn(rank, **others["convert"])
    if "recalibrate" in others:
        parts["recalibrate"] = lambda: recalibrated_shard(rank, **others["recalibrate"])
    for name, case in others.get("low_precision", {}).items():
        parts[name] = lambda case=case: sync_low_precision(rank, **case)
    for name, case in others.get("ring", {}).items():
        parts[name] = lambda case=case: sync_ring(rank, **case)
    if "grouped" in others:
        parts["grouped"] = lambda: grouped_recalibration(rank, **others["grouped"])
    parts["steady_state"] = lambda: steady_state(rank, world)
    return _run_parts(parts)


def ddp_task(rank: int, world: int, case: dict[str, Any]) -> Any:
    return _run_parts({"ddp": lambda: ddp_training(rank, world, **case)})


def faults_task(
    rank: int,
    world: int,
    streams: list[list[np.ndarray[Any, Any]]],
    totals: dict[str, list[np.ndarray[Any, Any]]],
) -> Any:
    return _run_parts(
        {
            "channels": lambda: channel_faults(rank, world),
            "late_mismatch": lambda: late_mismatch(rank, world),
            "tiny_totals": lambda: tiny_totals(rank, world, totals),
            "all_reduce_stats": lambda: reduced_stats(rank, world, streams),
            "stats_faults": lambda: stats_faults(rank, world, streams),
        }
    )


def recalibration_faults_task(rank: int, world: int, case: dict[str, Any], gave_up: Any) -> Any:
    return _run_parts(
        {"faults": lambda: recalibration_faults(rank, world, gave_up=gave_up, **case)}
    )


def dying_task(rank: int, world: int, batches: list[np.ndarray[Any, Any]]) -> Any:
    return _run_parts({"dying": lambda: dying_rank(rank, world, batches)})


def user_strategies_task(
    rank: int,
    world: int,
    steps: list[list[np.ndarray[Any, Any]]],
    streams: list[list[np.ndarray[Any, Any]]],
) -> Any:
    return _run_parts(
        {
            "sync": lambda: sync_user_strategy(rank, steps),
            "all_reduce_stats": lambda: reduced_user_stats(rank, world, streams),
        }
    )


TASKS: dict[str, Callable[..., Any]] = {
    "layers": layers_task,
    "ddp": ddp_task,
    "faults": faults_task,
    "recalibration_faults": recalibration_faults_task,
    "dying": dying_task,
    "user_strategies": user_strategies_task,
    "small_batch": small_batch_task,
}
