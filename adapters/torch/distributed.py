"""Statistics across processes (``torch.distributed``): one process's numbers from many.

Every merge here is the count-weighted Chan merge of :mod:`normstats.moments`, in rank
order, so all ranks end with identical statistics, equal to those of one process over the
concatenated data. Ranks with no data take part with count 0 (nothing hangs), and feature
shapes that differ across ranks raise an error naming each rank's shape on every rank. The
collectives are the process group's own, so its timeout applies.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from normstats import ExponentialMovingAverage, RunningStats
from normstats.estimators._base import Estimator, State
from normstats.moments import chan_merge

from .state import BATCH_MOMENTS_DTYPE, STATS_DTYPE


def active(group: Any = None) -> bool:
    """Whether ``torch.distributed`` is initialized with more than one rank in ``group``."""
    return (
        dist.is_available()
        and dist.is_initialized()
        and dist.get_world_size(group if group is not None else dist.group.WORLD) > 1
    )


def gather_rows(row: Tensor, group: Any = None) -> Tensor:
    """Every rank's ``row`` (same shape on all ranks), stacked in rank order."""
    world = dist.get_world_size(group)
    rows = [torch.empty_like(row) for _ in range(world)]
    dist.all_gather(rows, row.contiguous(), group=group)
    return torch.stack(rows)


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


def synchronized_batch_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    num_features: int,
    group: Any = None,
) -> tuple[Tensor, int, Tensor, Tensor]:
    """Batch normalization with the statistics of every rank's batch together.

    Every rank first shares its input's rank, channels and sample count, so a mismatch
    raises the same error everywhere instead of hanging a collective. Each rank's (mean, M2)
    then travel through a differentiable all-gather and are merged with Chan's formula in
    rank order, so every rank normalizes with the statistics of the concatenated batch and
    gradients flow through them to every rank's input. Returns ``(y, total count, mean,
    M2)`` of the concatenated batch (the same on every rank).

    The statistics are computed, exchanged and applied in float32 or wider whatever the
    input's dtype (as SyncBatchNorm does): in float16, the M2 of a few thousand values
    overflows. The output has the input's dtype, and gradients flow through the casts.
    """
    shapes = gather_rows(
        torch.tensor([x.dim(), x.shape[1] if x.dim() > 1 else 0, x.numel()], device=x.device),
        group,
    ).tolist()
    if any(shape[:2] != [shapes[0][0], num_features] for shape in shapes) or not (
        2 <= shapes[0][0] <= 5
    ):
        listed = ", ".join(f"rank {r}: {d}D, {c} channels" for r, (d, c, _) in enumerate(shapes))
        raise ValueError(
            f"x: expected 2D to 5D input with {num_features} channels, the same on every rank, "
            f"got {listed}"
        )
    counts = [numel // num_features for _, _, numel in shapes]
    total = sum(counts)
    if total <= 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got {total} over all ranks"
        )
    wide = x.to(torch.promote_types(x.dtype, BATCH_MOMENTS_DTYPE))
    if x.shape[0]:
        var, mean = torch.var_mean(wide, dim=[d for d in range(x.dim()) if d != 1], correction=0)
        local = torch.cat([mean, var * (x.numel() // num_features)])
    else:  # an empty rank still takes part, with count 0
        local = wide.new_zeros(2 * num_features) + wide.sum() * 0
    rows = gather_differentiable(local, group)
    mean, m2, count = rows[0][:num_features], rows[0][num_features:], counts[0]
    for row, n in zip(rows[1:], counts[1:], strict=True):
        if n == 0:
            continue
        if count == 0:
            mean, m2, count = row[:num_features], row[num_features:], n
            continue
        step, m2 = chan_merge(count, m2, n, row[:num_features] - mean, row[num_features:])
        mean, count = mean + step, count + n
    # per-channel scale and shift, so the activations are touched once
    shape = [1, num_features] + [1] * (x.dim() - 2)
    scale = torch.rsqrt(m2 / total + eps)
    if weight is not None:
        scale = scale * weight
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias
    y = torch.addcmul(shift.view(shape), wide, scale.view(shape)).to(x.dtype)
    return y, total, mean, m2


def merge_pooled(
    pooled: State | None, num_features: int, device: Any, group: Any = None, skipped: int = 0
) -> tuple[State | None, int]:
    """Merge a pooled calibration state (count, mean, m2) across ranks, and the numbers of
    batches the ranks left out of their pools; the state is None if empty everywhere.

    A rank that saw no data passes ``None`` and still takes part.
    """
    row = torch.zeros(2 + 2 * num_features, dtype=STATS_DTYPE, device=device)
    row[1] = skipped
    if pooled is not None:
        row[0] = pooled["count"]
        row[2 : 2 + num_features] = pooled["mean_origin"] + pooled["mean_offset"]
        row[2 + num_features :] = pooled["m2"]
    rows = gather_rows(row, group)
    counts = rows[:, 0].tolist()
    total_skipped = int(rows[:, 1].sum())
    merged: State | None = None
    for rank, count in enumerate(counts):
        if count == 0:
            continue
        mean, m2 = rows[rank, 2 : 2 + num_features], rows[rank, 2 + num_features :]
        if merged is None:
            merged = {"count": count, "mean": mean, "m2": m2}
            continue
        step, merged_m2 = chan_merge(
            merged["count"], merged["m2"], count, mean - merged["mean"], m2
        )
        merged = {"count": merged["count"] + count, "mean": merged["mean"] + step, "m2": merged_m2}
    if merged is None:
        return None, total_skipped
    zeros = merged["mean"] * 0.0
    state = {
        "count": merged["count"],
        "num_batches": len([c for c in counts if c]),
        "mean_origin": merged["mean"],
        "mean_offset": zeros,
        "m2": merged["m2"],
    }
    return state, total_skipped


def all_reduce_stats(stats: RunningStats, group: Any = None) -> RunningStats:
    """Merge an estimator's state across the ranks of ``group``, in place, on every rank.

    For :class:`~normstats.Welford`, :class:`~normstats.ExactFullPass` and
    :class:`~normstats.CumulativeAverage`: afterwards every rank holds the statistics of all
    ranks' streams together, exactly those of one estimator fed every stream. An EMA has no
    exact merge and is refused (``TypeError``) before any communication. The state may live
    in NumPy arrays or torch tensors on any device; it comes back where it was. Meant for
    custom loops that merge now and then (the states travel as pickled objects).
    """
    if isinstance(stats, ExponentialMovingAverage) or not isinstance(stats, Estimator):
        raise TypeError(
            f"stats: expected Welford, ExactFullPass or CumulativeAverage (an exact merge), "
            f"got {type(stats).__name__}"
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
    merged = type(stats)(nan_policy=stats.nan_policy)
    for state in states:
        other = type(stats)(nan_policy=stats.nan_policy)
        other.load_state_dict(state)
        merged.merge(other)
    result = merged.state_dict()
    if device is not None:
        result = {
            k: torch.as_tensor(v, device=device) if hasattr(v, "shape") else v
            for k, v in result.items()
        }
    stats.load_state_dict(result)
    return stats


def _feature_shape(stats: Estimator, state: dict[str, Any]) -> tuple[int, ...] | None:
    """The feature shape of a state dict (None before its first batch)."""
    if not state[stats.name + ".count"]:
        return None
    return tuple(getattr(state[stats.name + "." + stats.array_keys[-1]], "shape", ()))


__all__ = [
    "active",
    "all_reduce_stats",
    "gather_differentiable",
    "gather_rows",
    "merge_pooled",
    "synchronized_batch_norm",
]
