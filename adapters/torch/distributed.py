"""Statistics across processes (``torch.distributed``): one process's numbers from many.

Every merge here is the count-weighted Chan merge of :mod:`normstats.moments`, computed the
same way on every rank, so all ranks end with identical statistics, equal to those of one
process over the concatenated data: a synchronized training step merges every rank's row at
once, on the device and differentiably (:func:`merge_rows`); the states of estimators (the
pools of ``recalibrate``, :func:`all_reduce_stats`) merge in rank order with the strategy's
own merge (:func:`merged_in_rank_order`).
Ranks with no data take part with count 0 (nothing hangs), and shapes that differ across
ranks raise an error naming each rank's shape on every rank. A synchronized training step
costs one all-gather (and one all-reduce in its backward) and reads nothing on the host.
The collectives are the process group's own, so its timeout applies; those of
``recalibrate`` can be given a shorter one (:func:`gather_within`).
"""

from __future__ import annotations

import copy
import math
import time
import weakref
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from normstats import ExactFullPass, RunningStats
from normstats.estimators import Strategy

from .state import BATCH_MOMENTS_DTYPE, STATS_DTYPE

E = TypeVar("E", bound=Strategy)


def active(group: Any = None) -> bool:
    """Whether ``torch.distributed`` is initialized with more than one rank in ``group``."""
    return (
        dist.is_available()
        and dist.is_initialized()
        and dist.get_world_size(group if group is not None else dist.group.WORLD) > 1
    )


_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
"""Every rank's tensor concatenated into one (torch 2.13 renamed ``all_gather_into_tensor``)."""


def resolved(group: Any) -> Any:
    """``group``, or the world's group for None (None without ``torch.distributed``)."""
    if group is not None or not dist.is_available():
        return group
    return dist.group.WORLD


def gather_rows(row: Tensor, group: Any = None) -> Tensor:
    """Every rank's ``row`` (same shape on all ranks), stacked in rank order."""
    rows = _concatenated(row, group)
    _all_gather_single(rows, row.contiguous(), group=group)
    return rows.view(-1, *row.shape)


def _concatenated(row: Tensor, group: Any) -> Tensor:
    """Room for every rank's ``row``, one after the other (the layout gloo fills)."""
    return row.new_empty((dist.get_world_size(group) * row.shape[0], *row.shape[1:]))


class _GatherRows(torch.autograd.Function):
    """All-gather whose backward sums every rank's gradient of the gathered rows and hands
    each rank the part for its own row: the gradient of the sum of all ranks' losses."""

    @staticmethod
    def forward(ctx: Any, row: Tensor, group: Any) -> Tensor:
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        return gather_rows(row, group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        total = grad.contiguous().clone()
        dist.all_reduce(total, group=ctx.group)
        return total[ctx.rank], None


def gather_differentiable(row: Tensor, group: Any = None) -> Tensor:
    """Every rank's ``row`` stacked in rank order; gradients flow back to each rank's row."""
    gathered: Tensor = _GatherRows.apply(row, group)  # type: ignore[no-untyped-call]
    return gathered


def merge_rows(counts: Tensor, deltas: Tensor, m2s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r"""Chan's merge of R disjoint samples at once: ``(n, mean - s, M2)`` of their union.

    Row r holds a sample of ``counts[r]`` values per feature, its mean as ``deltas[r]``,
    the difference from a reference ``s`` common to all rows, and its ``m2s[r]``:

    .. math::

        n = \sum_r n_r,\quad \bar x - s = \sum_r \frac{n_r}{n} (\bar x_r - s),\quad
        M_2 = \sum_r M_{2,r} + \sum_r n_r \left((\bar x_r - s) - (\bar x - s)\right)^2

    A reference near the means (one of them) keeps the digits that the means share out of
    the sums, as the pairwise merge of :mod:`normstats.moments` does with its difference of
    means. Rows with count 0 weigh nothing (their deltas must be finite).
    """
    total = counts.sum()
    step = (counts / total) @ deltas
    m2 = m2s.sum(0) + counts @ (deltas - step) ** 2
    return total, step, m2


_AGREED: weakref.WeakKeyDictionary[Any, set[int]] = weakref.WeakKeyDictionary()
"""Per process group, the channel counts whose synchronized layers the ranks have agreed on
(same channels and input rank everywhere): their gathered rows have the same length."""


def synchronized_batch_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    num_features: int,
    group: Any = None,
) -> tuple[Tensor, Any, Tensor, Tensor]:
    """Batch normalization with the statistics of every rank's batch together.

    One all-gather per call carries each rank's (count, mean, M2) row, as SyncBatchNorm's
    carries (mean, invstd, count) (:func:`synchronized_moments`), so every rank normalizes
    with the statistics of the concatenated batch (:func:`normalized`). Gradients flow
    through the gathered rows (the backward all-reduces their gradient) to every rank's
    input, ``weight`` and ``bias``. Returns ``(y, n, mean, M2)`` of the concatenated batch,
    the same on every rank, where the total sample count per channel ``n`` is a 0-d float64
    tensor on the input's device (never read on the host; typed ``Any`` so that it folds
    wherever a count does).
    """
    total, mean, m2 = synchronized_moments(x, num_features, group)
    return normalized(x, mean, m2 / total, weight, bias, eps), total, mean, m2


def synchronized_moments(
    x: Tensor, num_features: int, group: Any = None
) -> tuple[Any, Tensor, Tensor]:
    """``(n, mean, M2)`` per channel of every rank's batch together, differentiably.

    One all-gather carries each rank's (count, mean, M2) row; the rows are merged at once
    with Chan's formula (:func:`merge_rows`), on the device, and the same on every rank.
    Gradients flow through the gathered rows to every rank's input (the backward
    all-reduces their gradient). The total sample count per channel ``n`` is a 0-d float64
    tensor on the input's device.

    A rank cannot see the other ranks' shapes without reading a collective's result on the
    host, which would stall a GPU at every step, and a row length that differs across
    ranks breaks the all-gather (gloo aborts the process). So the first call with a given
    ``num_features`` on a process group first gathers every rank's channels and input rank
    (one more small all-gather, read on the host): if they differ, every rank raises the
    same error, naming each rank's shape. Later calls only check their own input; a rank
    whose input no longer fits still takes part in the all-gather, with a NaN count that
    turns every rank's statistics of that step into NaN, and then raises. The host reads
    the merged count only when this rank's batch holds at most one value per channel: a
    total of at most one (an error, on every rank) implies that of every rank's batch.

    The statistics are computed in float32 or wider whatever the input's dtype (as
    SyncBatchNorm does: in float16, the M2 of a few thousand values overflows), and the
    rows travel and merge in float64, which holds every count exactly.
    """
    group = resolved(group)
    check_shape(x, num_features, group)
    count = x.numel() // num_features
    wide = x.to(torch.promote_types(x.dtype, BATCH_MOMENTS_DTYPE))
    if count:
        var, mean = torch.var_mean(wide, dim=[d for d in range(x.dim()) if d != 1], correction=0)
        moments = [mean, var * count]
    else:  # an empty rank takes part with count 0 (the sum keeps its input in the graph)
        moments = [wide.new_zeros(2 * num_features) + wide.sum() * 0]
    total, mean, m2 = _merged(_row(count, moments, x.device), num_features, group, True)
    if count <= 1 and float(total) <= 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got {float(total):g} "
            "over all ranks"
        )
    return total, mean, m2


def merged_moments(
    count: int, mean: Tensor, m2: Tensor, num_features: int, group: Any = None
) -> tuple[Any, Tensor, Tensor]:
    """``(n, mean, M2)`` of every rank's moments together (``count`` values per channel of
    mean ``mean`` and sum of squared deviations ``m2`` on this rank), without gradient: one
    all-gather, merged as in :func:`synchronized_moments`. The caller checks its input
    first (:func:`check_shape`)."""
    local = _row(count, [mean.detach(), m2.detach()], mean.device)
    return _merged(local, num_features, resolved(group), False)


def _row(count: int, moments: list[Tensor], device: torch.device) -> Tensor:
    """One float64 row (cat promotes): count, mean, M2."""
    return torch.cat([torch.full((1,), count, dtype=STATS_DTYPE, device=device), *moments])


def _merged(
    local: Tensor, num_features: int, group: Any, differentiable: bool
) -> tuple[Any, Tensor, Tensor]:
    rows = gather_differentiable(local, group) if differentiable else gather_rows(local, group)
    counts, means, m2s = (
        rows[:, 0].detach(),
        rows[:, 1 : 1 + num_features],
        rows[:, 1 + num_features :],
    )
    reference = means[counts.argmax()].detach()
    total, step, m2 = merge_rows(counts, means - reference, m2s)
    return total, reference + step, m2


def normalized(
    x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor:
    """``(x - mean) / sqrt(var + eps) * weight + bias`` per channel, computed in float32 or
    wider and returned in ``x``'s dtype; gradients flow to every argument but ``eps``. A
    per-channel scale and shift, so that the activations are touched once."""
    wide = x.to(torch.promote_types(x.dtype, BATCH_MOMENTS_DTYPE))
    shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -mean * scale if bias is None else torch.addcmul(bias, mean, scale, value=-1)
    y = torch.addcmul(shift.to(wide.dtype).view(shape), wide, scale.to(wide.dtype).view(shape))
    return y.to(x.dtype)


def check_shape(x: Tensor, num_features: int, group: Any) -> None:
    """Make sure every rank's input fits ``num_features`` before a collective: the first
    time on ``group``, every rank's shape is compared (:func:`_agree_on_shape`); a rank
    whose input does not fit later takes part with a NaN count and raises."""
    _agree_on_shape(x, num_features, group)
    if not (2 <= x.dim() <= 5 and x.shape[1] == num_features):
        _take_part_without_statistics(x, num_features, group)


def take_part_and_raise(x: Tensor, num_features: int, group: Any, error: ValueError) -> None:
    """Send a row of NaN count (every rank's statistics of this step become NaN), so that no
    rank waits for this one, then raise ``error``, this rank's own."""
    row = torch.zeros(1 + 2 * num_features, dtype=STATS_DTYPE, device=x.device)
    row[0] = math.nan
    gather_rows(row, resolved(group))
    raise error


def _agree_on_shape(x: Tensor, num_features: int, group: Any) -> None:
    """The first time ``group`` synchronizes ``num_features`` channels: every rank's layer
    channels, input rank and input channels, the same everywhere, or an error on every rank."""
    agreed = _AGREED.setdefault(group, set())
    if num_features in agreed:
        return
    channels = x.shape[1] if x.dim() > 1 else 0
    mine = torch.tensor([num_features, x.dim(), channels], device=x.device)
    shapes = gather_rows(mine, group).tolist()
    if any(shape != shapes[0] for shape in shapes) or not (
        2 <= shapes[0][1] <= 5 and shapes[0][2] == shapes[0][0]
    ):
        listed = ", ".join(
            f"rank {rank}: {d}D, {c} channels, num_features {f}"
            for rank, (f, d, c) in zip(dist.get_process_group_ranks(group), shapes, strict=True)
        )
        raise ValueError(
            "x: expected 2D to 5D input with num_features channels, the same on every rank, "
            f"got {listed}"
        )
    agreed.add(num_features)


def _take_part_without_statistics(x: Tensor, num_features: int, group: Any) -> None:
    """Take part with a NaN count (every rank's statistics of this step become NaN), so that
    no rank waits for this one, then raise the error of this rank's input."""
    error = ValueError(
        f"x: expected 2D to 5D input with {num_features} channels (dimension 1), got input of "
        f"shape {tuple(x.shape)}; this rank took part in the synchronization with a NaN "
        "count, so every rank's output of this step is NaN"
    )
    take_part_and_raise(x, num_features, group, error)


class RankFailedError(RuntimeError):
    """Another rank of the process group failed, or a collective with it failed: raised on
    the ranks that were waiting for it, naming it (the failing rank raises its own error)."""


def gather_within(row: Tensor, group: Any, timeout: float | None, what: str) -> Tensor:
    """:func:`gather_rows` that waits at most ``timeout`` seconds for the other ranks
    (``None``: as long as the process group lets it); ``what`` names it in errors.

    A collective that times out raises ``TimeoutError`` and one that fails (a rank died)
    :class:`RankFailedError`. The wait polls the collective's completion, so it is bounded
    on any backend, NCCL included.
    """
    rows = _concatenated(row, group)
    try:
        work = _all_gather_single(rows, row.contiguous(), group=group, async_op=True)
        assert work is not None  # async_op=True returns the work
        if timeout is not None:
            deadline, pause = time.monotonic() + timeout, 1e-4
            while not work.is_completed():
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{what}: not every rank of the process group (ranks "
                        f"{dist.get_process_group_ranks(group)}) arrived within {timeout:g} s; "
                        "expected all of them (one may have died, hung, or be running "
                        "something else)"
                    )
                time.sleep(pause)
                pause = min(2 * pause, 0.01)
        work.wait()
    except RuntimeError as error:  # the backend's: a rank died, or the group's own timeout
        raise RankFailedError(
            f"{what}: the collective with the other ranks failed: {error}"
        ) from error
    return rows.view(-1, *row.shape)


def agree(
    failure: Exception | None, value: int, group: Any, device: Any, timeout: float | None, what: str
) -> list[int]:
    """Every rank's ``value``, once every rank of ``group`` said whether it failed.

    If any rank passes a ``failure``, every rank learns it from the same collective and
    stops: the failing ranks raise their own errors, the others a :class:`RankFailedError`
    naming them with their errors. Nobody is left waiting for a rank that gave up.
    """
    mine = torch.tensor([failure is not None, value], device=device)
    rows = gather_within(mine, group, timeout, what).tolist()
    if not any(failed for failed, _ in rows):
        return [v for _, v in rows]
    errors: list[Any] = [None] * len(rows)
    described = None if failure is None else f"{type(failure).__name__}: {failure}"
    dist.all_gather_object(errors, described, group=group)
    if failure is not None:
        raise failure
    ranks = dist.get_process_group_ranks(group)
    listed = "; ".join(f"rank {ranks[r]}: {e}" for r, e in enumerate(errors) if e is not None)
    raise RankFailedError(f"{what}: another rank failed, so every rank stops ({listed})")


def merge_pooled(
    pool: ExactFullPass,
    num_features: int,
    device: Any,
    group: Any = None,
    skipped: int = 0,
    timeout: float | None = None,
) -> tuple[ExactFullPass, int]:
    """A calibration pool merged across the ranks of ``group`` (a new estimator, the same on
    every rank), and the total of the numbers of batches the ranks left out of their pools.
    ``timeout`` as in :func:`gather_within`.

    Each rank's state travels as one float64 row of its counters and arrays (a rank that saw
    no data, whose pool is empty, still takes part) and the states merge in rank order, as
    :func:`all_reduce_stats` merges them (:func:`merged_in_rank_order`).
    """
    state, prefix = pool.state_dict(), f"{pool.name}."
    keys = [prefix + key for key in pool.array_keys]
    row = torch.zeros(3 + len(keys) * num_features, dtype=STATS_DTYPE, device=device)
    row[0], row[1], row[2] = pool.count, pool.num_batches, skipped
    if pool.count:
        row[3:].view(len(keys), num_features).copy_(
            torch.stack([torch.as_tensor(state[k]) for k in keys])
        )
    rows = gather_within(row, group, timeout, "recalibrate: merging a layer's pools")
    counters = rows[:, :3].tolist()
    states = []
    for (count, num_batches, _), arrays in zip(
        counters, rows[:, 3:].view(-1, len(keys), num_features), strict=True
    ):
        values: list[Any] = list(arrays) if count else [0.0] * len(keys)
        states.append(
            {
                f"{prefix}count": int(count),
                f"{prefix}num_batches": int(num_batches),
                f"{prefix}num_batches_skipped": 0,
                **dict(zip(keys, values, strict=True)),
            }
        )
    return merged_in_rank_order(pool, states), int(sum(left_out for *_, left_out in counters))


def merged_in_rank_order(stats: E, states: Sequence[Mapping[str, Any]]) -> E:
    """A new estimator of ``stats``'s kind and settings that holds every state of
    ``states`` (state dicts, one per rank), merged in rank order with the strategy's own
    exact merge: the same numbers on every rank that merges the same states."""
    merged = _empty_like(stats)
    for state in states:
        other = _empty_like(stats)
        other.load_state_dict(state)
        merged.merge(other)
    return merged


def all_reduce_stats(stats: RunningStats, group: Any = None) -> RunningStats:
    """Merge an estimator's state across the ranks of ``group``, in place, on every rank.

    For :class:`~normstats.Welford`, :class:`~normstats.ExactFullPass` and
    :class:`~normstats.CumulativeAverage`: afterwards every rank holds the statistics of all
    ranks' streams together, exactly those of one estimator fed every stream. An EMA has no
    exact merge and is refused (``TypeError``) before any communication. The state may live
    in NumPy arrays or torch tensors on any device; it comes back where it was. Meant for
    custom loops that merge now and then (the states travel as pickled objects).
    """
    if not (isinstance(stats, Strategy) and stats.mergeable):
        raise TypeError(
            f"stats: expected a strategy with an exact merge (mergeable: Welford, "
            f"ExactFullPass, CumulativeAverage or a user strategy that declares one), got "
            f"{type(stats).__name__}"
        )
    if not active(group):
        return stats
    mine = stats.state_dict()
    device = next((v.device for v in mine.values() if isinstance(v, Tensor)), None)
    portable = {
        k: v.detach().cpu().numpy() if isinstance(v, Tensor) else v for k, v in mine.items()
    }
    states: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(states, portable, group=group)
    shapes = [_feature_shape(stats, state) for state in states]
    if len({shape for shape in shapes if shape is not None}) > 1:
        listed = ", ".join(f"rank {rank}: {shape}" for rank, shape in enumerate(shapes))
        raise ValueError(f"stats: expected the same feature shape on every rank, got {listed}")
    result = merged_in_rank_order(stats, states).state_dict()
    if device is not None:
        result = {
            k: torch.as_tensor(v, device=device) if hasattr(v, "shape") else v
            for k, v in result.items()
        }
    stats.load_state_dict(result)
    return stats


def _empty_like(stats: E) -> E:
    """A strategy of the same class and settings as ``stats``, without state."""
    empty = copy.copy(stats)
    empty.reset()
    return empty


def _feature_shape(stats: Strategy, state: dict[str, Any]) -> tuple[int, ...] | None:
    """The feature shape of a state dict (None before its first batch): the shape of its
    last array without the strategy's leading axes."""
    if not state[stats.name + ".count"]:
        return None
    key = stats.array_keys[-1]
    leading = len(stats.state_shapes(())[key])
    return tuple(getattr(state[stats.name + "." + key], "shape", ()))[leading:]


__all__ = [
    "RankFailedError",
    "active",
    "agree",
    "all_reduce_stats",
    "check_shape",
    "gather_differentiable",
    "gather_rows",
    "gather_within",
    "merge_pooled",
    "merge_rows",
    "merged_in_rank_order",
    "merged_moments",
    "normalized",
    "resolved",
    "synchronized_batch_norm",
    "synchronized_moments",
    "take_part_and_raise",
]
