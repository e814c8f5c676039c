r"""Exact moments of a Dask array, reduced where its chunks are.

Every chunk is reduced by the core's shifted reduction (sums accumulated in float64 whatever
the chunk's dtype, a second pass around the chunk's own mean when its offset would cost
digits), and the per-chunk statistics are merged in a tree (``dask.array.reduction``: chunk,
combine, aggregate) by the core's exact merge, which carries each mean's low-order part. So
the result does not depend on the chunking, and only per-feature statistics travel between
the workers and to the client.

The statistics of a chunk, and of every merge of chunks, are a record per feature
(:data:`RECORD`): counts, mean, its residual, M2 and whether NaN or Inf were met. With
``ignore_nan=True`` each feature's statistics are those of its non-NaN values (a Standardizer
leaves NaN out, as scikit-learn does), so counts may differ between features; the merge takes
per-feature counts.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import dask.array as da
import numpy as np
from dask.base import compute
from dask.delayed import Delayed, delayed

import normstats as ns
from normstats.deferred import ReducedBatch
from normstats.moments import merge_statistics, moments_of_batch, reduce_batch
from normstats.typing import Axis

RECORD = np.dtype(
    [
        ("samples", np.int64),  # values per feature, NaN included
        ("count", np.int64),  # values in the statistics (NaN left out)
        ("mean", np.float64),
        ("mean_residual", np.float64),
        ("m2", np.float64),
        ("nan", np.bool_),  # NaN reached the statistics
        ("inf", np.bool_),  # the values held +-Inf
    ]
)
"""The statistics of one feature over some chunks."""

Record = np.ndarray[Any, np.dtype[np.void]]
Block = np.ndarray[Any, Any]


def moments(x: da.Array, axis: Axis = 0) -> Delayed:
    """The :class:`~normstats.Moments` of the Dask array ``x`` over ``axis``, lazily.

    ``.compute()`` (or ``dask.compute`` together with other results) runs the reduction on
    the current scheduler, a cluster's when a ``distributed.Client`` is active: every chunk
    is reduced where it lives and only per-feature statistics are merged, exactly, in a tree.
    The result equals ``Moments.from_array`` of the whole array in memory to float64
    rounding, however ``x`` is chunked (float32 chunks are accumulated in float64).

    Raises ``TypeError`` for an argument that is not a Dask array of a real floating dtype
    and ``ValueError`` for an invalid ``axis`` (at once), and ``ValueError`` when computed
    for NaN or Inf in ``x`` or values whose squares overflow float64, as ``from_array``.

    Examples
    --------
    >>> import dask.array as da
    >>> import normstats.adapters.dask as nsd
    >>> x = da.arange(12.0, chunks=5).reshape(6, 2)
    >>> m = nsd.moments(x).compute()
    >>> m.count, m.mean.tolist(), m.var(ddof=1).tolist()
    (6, [5.0, 6.0], [14.0, 14.0])
    """
    if not isinstance(x, da.Array):
        raise TypeError(f"x: expected a dask.array.Array, got {type(x).__name__}")
    axes = _axes(x, axis)
    result: Delayed = delayed(_as_moments, pure=True)(
        statistics(x, axes, ignore_nan=False), x.shape, axes
    )
    return result


def _axes(x: da.Array, axis: Axis) -> tuple[int, ...]:
    """``axis`` normalized, checked (with ``x``'s dtype) by the core on an empty stand-in."""
    ns.Moments.from_array(np.empty((0,) * x.ndim, dtype=x.dtype), axis)
    given = axis if isinstance(axis, tuple) else (axis,)
    return tuple(sorted(int(a) % x.ndim for a in given))


def _as_moments(record: Record, shape: tuple[float, ...], axes: tuple[int, ...]) -> ns.Moments:
    reduced = reduced_batch(record, shape, axes)
    if not reduced.finite:
        raise reduced.error("x")
    return reduced.moments()


def statistics(x: da.Array, axes: tuple[int, ...], *, ignore_nan: bool) -> da.Array:
    """The lazy per-feature :data:`RECORD` array of ``x`` reduced over ``axes``."""
    reduced: da.Array = da.reduction(  # type: ignore[no-untyped-call]  # dask leaves it untyped
        x,
        functools.partial(_chunk, ignore_nan=ignore_nan),
        _aggregate,
        combine=_combine,
        axis=axes,
        keepdims=False,
        dtype=RECORD,
        meta=np.empty((0,) * (x.ndim - len(axes)), dtype=RECORD),
        name="normstats-moments",
    )
    return reduced


def reduced_batch(record: Record, shape: tuple[float, ...], axes: tuple[int, ...]) -> ReducedBatch:
    """The core's view of a computed :data:`RECORD` array of a batch of ``shape`` reduced
    over ``axes`` (whose sizes give the count when there is no feature to hold it)."""
    size = math.prod(shape[a] for a in axes)  # NaN where a chunk's size was unknown
    count = int(record["samples"].flat[0]) if record.size else 0 if math.isnan(size) else int(size)
    return ReducedBatch(
        count=count,
        counts=np.array(record["count"]),
        mean=np.array(record["mean"]),
        mean_residual=np.array(record["mean_residual"]),
        m2=np.array(record["m2"]),
        nan=bool(record["nan"].any()),
        inf=bool(record["inf"].any()),
    )


# -- the three steps of the tree reduction (they run on the workers) ----------------------


def _chunk(block: Block, axis: tuple[int, ...], keepdims: bool, ignore_nan: bool) -> Record:
    """The statistics of one chunk, with its reduced axes kept as length 1."""
    with np.errstate(over="ignore", invalid="ignore"):  # non-finite results are flagged
        batch = reduce_batch(np, block, axis)
        moments = moments_of_batch(np, batch)
    record = np.zeros(moments.mean.shape, dtype=RECORD)
    record["samples"] = record["count"] = batch.count
    record["mean"], record["mean_residual"], record["m2"] = (
        moments.mean,
        moments.mean_residual,
        moments.m2,
    )
    if not batch.finite:
        record["inf"] = np.isinf(block).any(axis=axis)
        nan = np.isnan(block).any(axis=axis)
        if ignore_nan:
            _leave_out_nan(record.reshape(-1), block, axis, np.flatnonzero(nan))
        else:
            record["nan"] = nan
    return np.expand_dims(record, axis)


def _leave_out_nan(record: Record, block: Block, axes: tuple[int, ...], features: Block) -> None:
    """Reduce again, feature by feature, the ``features`` (flat indices) that hold NaN, from
    their other values: the statistics of NaN-free features stay as the whole chunk's."""
    front = tuple(range(len(axes)))
    values = np.moveaxis(block, axes, front).reshape(
        math.prod(block.shape[a] for a in axes), record.size
    )
    for j in features:
        column = values[:, j]
        with np.errstate(over="ignore", invalid="ignore"):
            batch = reduce_batch(np, column[~np.isnan(column)], (0,))
            moments = moments_of_batch(np, batch)
        record[j]["count"] = batch.count
        record[j]["mean"] = moments.mean
        record[j]["mean_residual"] = moments.mean_residual
        record[j]["m2"] = moments.m2


def _combine(partials: Record, axis: tuple[int, ...], keepdims: bool) -> Record:
    """Merge the statistics concatenated along the reduced axes into one per feature."""
    front = tuple(range(len(axis)))
    stacked = np.moveaxis(partials, axis, front)
    parts, features = stacked.shape[: len(axis)], stacked.shape[len(axis) :]
    stacked = stacked.reshape(math.prod(parts), *features)  # not -1: sizes may be 0
    merged = functools.reduce(_merge, stacked)
    return np.expand_dims(merged, axis) if keepdims else merged


def _aggregate(partials: Record, axis: tuple[int, ...], keepdims: bool) -> Record:
    return _combine(partials, axis, keepdims)


def _merge(a: Record, b: Record) -> Record:
    """The statistics of two disjoint parts of every feature together (Chan's merge with
    per-feature counts; a part with no values is the identity, exactly)."""
    count_a, count_b = a["count"], b["count"]
    total = count_a + count_b
    with np.errstate(over="ignore", invalid="ignore"):  # non-finite results are flagged
        merged = merge_statistics(
            (np.where(total == 0, 1, count_a), a["mean"], a["mean_residual"], a["m2"]),
            (count_b, b["mean"], b["mean_residual"], b["m2"]),
        )
    out = np.empty_like(a)
    for field, value in zip(("mean", "mean_residual", "m2"), merged, strict=True):
        out[field] = np.where(count_b == 0, a[field], np.where(count_a == 0, b[field], value))
    out["samples"] = a["samples"] + b["samples"]
    out["count"] = total
    out["nan"] = a["nan"] | b["nan"]
    out["inf"] = a["inf"] | b["inf"]
    return out


# -- what the core calls ------------------------------------------------------------------


class DaskArrays:
    """The core's handler of Dask arrays (:class:`normstats.deferred.DeferredArrays`)."""

    def owns(self, x: object) -> bool:
        return isinstance(x, da.Array)

    def reduce(self, x: da.Array, axes: tuple[int, ...], *, ignore_nan: bool) -> ReducedBatch:
        (record,) = compute(statistics(x, axes, ignore_nan=ignore_nan))  # type: ignore[no-untyped-call]
        return reduced_batch(record, x.shape, axes)

    def checked(self, x: da.Array, check: Callable[[Block], None]) -> da.Array:
        blocks: da.Array = x.map_blocks(
            _checked_block,  # type: ignore[arg-type]  # dask types the function as an Array
            check,
            dtype=x.dtype,
            meta=x._meta,
        )
        return blocks


def _checked_block(block: Block, check: Callable[[Block], None]) -> Block:
    check(block)
    return block
