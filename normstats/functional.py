r"""Batch normalization as pure array functions: training forward, inference forward, backward.

For an input :math:`x` with feature axis ``axis`` (1 for NCHW, -1 for channels-last), every
other axis is reduced, so a dense (N, C) batch, a sequence (N, C, L) and an image batch
(N, C, H, W) are one code path: each feature (channel) has its statistics over the
:math:`m = N \cdot L` or :math:`N \cdot H \cdot W` values it takes in the batch.

Training (Ioffe & Szegedy, 2015, Alg. 1) normalizes with the batch mean and the *biased*
batch variance:

.. math::

    \mu_B = \tfrac{1}{m}\sum x_i,\quad
    \sigma_B^2 = \tfrac{1}{m}\sum (x_i - \mu_B)^2,\quad
    \hat x_i = \frac{x_i - \mu_B}{\sqrt{\sigma_B^2 + \epsilon}},\quad
    y_i = \gamma \hat x_i + \beta

and returns the batch :class:`~normstats.Moments`, from which a running-statistics strategy
takes the *unbiased* variance. Inference uses given statistics,
:math:`y = \gamma (x - \mu) / \sqrt{\sigma^2 + \epsilon} + \beta`.

The backward pass is the exact gradient through :math:`\mu_B` and :math:`\sigma_B^2`:

.. math::

    \frac{\partial L}{\partial \beta} = \sum_i g_i,\quad
    \frac{\partial L}{\partial \gamma} = \sum_i g_i \hat x_i,\quad
    \frac{\partial L}{\partial x_i} = \frac{\gamma}{m \sqrt{\sigma_B^2 + \epsilon}}
        \Big(m\, g_i - \frac{\partial L}{\partial \beta}
        - \hat x_i \frac{\partial L}{\partial \gamma}\Big)

with :math:`g = \partial L / \partial y`. Statistics are computed in float64; outputs have the
input's dtype (or float64 where ``gamma`` is float64 and the input narrower, as NumPy's type
promotion gives).

Two training modes for small batches build on the same pieces: Batch Renormalization
(:func:`renorm_forward`, with :func:`renorm_correction` and :func:`renorm_limits`) and
Ghost BatchNorm (:func:`ghost_forward`); :func:`backward` takes the cache of any of the
three training forwards.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import NamedTuple

from ._arrays import (
    as_array,
    check_floating,
    describe,
    expand_to,
    normalize_axis,
    quiet_overflow,
    split_shape,
)
from .moments import Moments, blend, moments_of_batch, reduce_batch
from .typing import Array, Namespace
from .validation import as_count, as_real


class Cache(NamedTuple):
    """What :func:`backward` needs from :func:`train_forward`."""

    x_hat: Array
    """The normalized input."""
    inv_std: Array
    """``1 / sqrt(var_B + eps)`` per feature, broadcastable against the input."""
    gamma: Array | None
    """The scale (broadcastable), or None without affine parameters."""
    axes: tuple[int, ...]
    """The reduced axes."""
    r: Array | None = None
    """Batch Renormalization's scale correction (broadcastable); None for plain batch
    normalization."""
    d: Array | None = None
    """Batch Renormalization's shift correction (broadcastable); None for plain batch
    normalization."""


class GhostCache(NamedTuple):
    """What :func:`backward` needs from :func:`ghost_forward`."""

    caches: tuple[Cache, ...]
    """Each virtual batch's :class:`Cache`, in their order along axis 0."""


def reduced_axes(ndim: int, axis: int) -> tuple[int, ...]:
    """Every axis of an ``ndim``-dimensional input but the feature axis ``axis``."""
    if ndim < 2:
        raise ValueError(
            f"x: expected an input with a batch axis and a feature axis (at least 2 "
            f"dimensions), got {ndim} dimension{'s' if ndim != 1 else ''}"
        )
    (feature,) = normalize_axis(axis, ndim)
    return tuple(i for i in range(ndim) if i != feature)


def train_forward(
    x: Array,
    gamma: Array | None = None,
    beta: Array | None = None,
    *,
    axis: int = 1,
    eps: float = 1e-5,
) -> tuple[Array, Moments, Cache]:
    """Normalize ``x`` with its own batch statistics; return ``(y, batch moments, cache)``.

    ``gamma`` and ``beta`` have one value per feature (None: no scale / no shift). A batch
    with one value per feature raises ``ValueError``: its variance is zero and the output
    would carry no information (PyTorch refuses it too). A batch with NaN or Inf raises
    nothing here: its output and moments are not finite, and the caller applies its
    ``nan_policy`` (an estimator's ``update_moments`` skips or refuses such moments).

    >>> import numpy as np
    >>> from normstats import functional as F
    >>> y, moments, cache = F.train_forward(np.array([[1.0], [3.0]]), axis=1)
    >>> y.ravel().round(4).tolist(), moments.mean.tolist(), moments.var(ddof=1).tolist()
    ([-1.0, 1.0], [2.0], [2.0])
    """
    xp, x, axes = _training_input(x, axis)
    with quiet_overflow(x):  # a NaN/Inf batch gives NaN; the caller decides
        x_hat, moments, inv_std = _standardize(xp, x, axes, eps)
        y = _scale_shift(xp, x_hat, gamma, beta, axes)
    return y, moments, _cache(xp, y, x_hat, inv_std, gamma, axes)


def eval_forward(
    x: Array,
    mean: Array | float,
    var: Array | float,
    gamma: Array | None = None,
    beta: Array | None = None,
    *,
    axis: int = 1,
    eps: float = 1e-5,
) -> Array:
    """Normalize ``x`` with given statistics: ``gamma * (x - mean) / sqrt(var + eps) + beta``.

    >>> import numpy as np
    >>> from normstats import functional as F
    >>> F.eval_forward(np.array([[3.0]]), mean=1.0, var=4.0, eps=0.0).tolist()
    [[1.0]]
    """
    xp, x = as_array(x, "x")
    check_floating(xp, x, "x")
    axes = reduced_axes(x.ndim, axis)
    # (x - mean) * (gamma / sqrt(var + eps)) + beta: subtracting first keeps every digit of
    # data far from zero, and the scale is one per-feature product.
    scale = 1.0 / (var + eps) ** 0.5
    dtype = x.dtype
    if gamma is not None:
        scale = scale * gamma
        dtype = _promoted(xp, x, gamma)
    y = x - _along(xp, mean, x, axes, x.dtype)
    y = y * _along(xp, scale, y, axes, dtype)
    if beta is not None:
        y += _along(xp, beta, y, axes, y.dtype)
    return y


def prior_statistics(
    source_mean: Array | float,
    source_var: Array | float,
    batch_mean: Array,
    batch_var: Array,
    prior: float,
    batch_size: int,
) -> tuple[Array, Array]:
    r"""Source statistics and a test batch's own, weighted by a prior strength ``N`` and the
    batch's size ``n`` (Schneider et al., 2020, "Improving robustness against common
    corruptions by covariate shift adaptation", section 3):

    .. math::

        \bar\mu = \tfrac{N}{N+n}\,\mu_s + \tfrac{n}{N+n}\,\mu_b,\qquad
        \bar\sigma^2 = \tfrac{N}{N+n}\,\sigma_s^2 + \tfrac{n}{N+n}\,\sigma_b^2

    ``source_mean`` and ``source_var`` are the population statistics the layer evaluates
    with (its unbiased running variance); ``batch_mean`` and ``batch_var`` are the batch's
    mean and *biased* variance per feature, the ones batch normalization normalizes a
    training batch with, so that ``prior=0`` is exactly a batch's own normalization and a
    large ``prior`` the source statistics. ``batch_size`` is ``n``, the number of samples in
    the batch (the length of its first axis, not the values per feature of an image
    batch), as in the paper.

    >>> import numpy as np
    >>> mean, var = prior_statistics(0.0, 1.0, np.array([3.0]), np.array([4.0]), 16, 16)
    >>> mean.tolist(), var.tolist()
    ([1.5], [2.5])
    """
    weight = as_count("batch_size", batch_size) / _prior_strength(prior, batch_size)
    return blend(source_mean, batch_mean, weight), blend(source_var, batch_var, weight)


def _prior_strength(prior: object, batch_size: int) -> float:
    """``prior + batch_size``, the prior strength checked to be finite and non-negative."""
    strength = as_real("prior", prior)
    if not (math.isfinite(strength) and strength >= 0):
        raise ValueError(f"prior: expected a finite non-negative number, got {prior!r}")
    if strength + batch_size == 0:
        raise ValueError("batch_size: expected a batch of at least one sample, got 0")
    return strength + batch_size


def renorm_limits(step: int, warmup: int, r_max: float, d_max: float) -> tuple[float, float]:
    r"""Batch Renormalization's clipping limits ``(r_max, d_max)`` at training step ``step``.

    Ioffe (2017, "Batch Renormalization", section 3) starts training as plain batch
    normalization (:math:`r_{max} = 1`, :math:`d_{max} = 0`) and relaxes the limits
    gradually; here they grow linearly to the given values over the first ``warmup`` steps,
    and ``warmup=0`` uses the given values from the first step.

    >>> renorm_limits(0, 100, 3.0, 5.0), renorm_limits(50, 100, 3.0, 5.0)
    ((1.0, 0.0), (2.0, 2.5))
    >>> renorm_limits(100, 100, 3.0, 5.0) == renorm_limits(7, 0, 3.0, 5.0) == (3.0, 5.0)
    True
    """
    step, warmup = as_count("step", step), as_count("renorm_warmup", warmup)
    r_max, d_max = _clipping_limits(r_max, d_max)
    progress = 1.0 if step >= warmup else step / warmup
    return 1.0 + (r_max - 1.0) * progress, d_max * progress


def renorm_correction(
    batch_mean: Array,
    batch_var: Array,
    mean: Array,
    var: Array,
    *,
    r_max: float,
    d_max: float,
    eps: float = 1e-5,
) -> tuple[Array, Array]:
    r"""Batch Renormalization's per-feature correction ``(r, d)`` of a training batch.

    With the batch's mean :math:`\mu_B` and *biased* variance :math:`\sigma_B^2`, and the
    running estimate :math:`\mu`, :math:`\sigma^2` of the layer's strategy (Ioffe, 2017):

    .. math::

        r = \operatorname{clip}\Big(\frac{\sqrt{\sigma_B^2 + \epsilon}}
            {\sqrt{\sigma^2 + \epsilon}}, \frac{1}{r_{max}}, r_{max}\Big),\qquad
        d = \operatorname{clip}\Big(\frac{\mu_B - \mu}{\sqrt{\sigma^2 + \epsilon}},
            -d_{max}, d_{max}\Big)

    The training output is :math:`\gamma (\hat x r + d) + \beta`, with :math:`\hat x`
    normalized by the batch statistics; without clipping it equals the output with the
    running statistics, :math:`\gamma (x - \mu) / \sqrt{\sigma^2 + \epsilon} + \beta`.
    ``r`` and ``d`` are constants of the backward pass. The arrays stay in their namespace
    (NumPy or torch), so both the engine and the torch adapter correct with this one rule.

    >>> import numpy as np
    >>> r, d = renorm_correction(np.array([1.0]), np.array([4.0]), np.array([0.0]),
    ...                          np.array([1.0]), r_max=3.0, d_max=5.0, eps=0.0)
    >>> r.tolist(), d.tolist()
    ([2.0], [1.0])
    """
    xp, batch_mean = as_array(batch_mean, "batch_mean")
    inv_std = 1.0 / xp.sqrt(var + eps)
    r = xp.sqrt(batch_var + eps) * inv_std
    d = (batch_mean - mean) * inv_std
    return _clipped(xp, r, 1.0 / r_max, r_max), _clipped(xp, d, -d_max, d_max)


def _clipped(xp: Namespace, a: Array, low: Array | float, high: Array | float) -> Array:
    """``a`` limited to ``[low, high]`` by elementwise minimum and maximum: array-api-compat's
    ``clip`` of torch tensors (before 1.12) assigns through boolean masks, whose
    data-dependent shapes torch.compile cannot trace."""
    zero = xp.zeros_like(a)  # per feature: the limits as arrays of a's dtype and device
    return xp.minimum(xp.maximum(a, zero + low), zero + high)


def renorm_forward(
    x: Array,
    gamma: Array | None,
    beta: Array | None,
    mean: Array | float | None,
    var: Array | float | None,
    *,
    r_max: float,
    d_max: float,
    axis: int = 1,
    eps: float = 1e-5,
) -> tuple[Array, Moments, Cache]:
    r"""Batch Renormalization's training forward; return ``(y, batch moments, cache)``.

    ``x`` is normalized with its batch mean and *biased* batch variance as in
    :func:`train_forward`, then corrected towards the running estimate ``mean``, ``var``
    (the unbiased variance a strategy reports) with :func:`renorm_correction`'s ``r`` and
    ``d``: :math:`y = \gamma (\hat x r + d) + \beta`. ``mean`` and ``var`` None mean that no
    running estimate exists yet: the step is plain batch normalization (``r = 1``,
    ``d = 0``). ``r_max`` and ``d_max`` are this step's limits (:func:`renorm_limits` gives
    them during a warm-up). The moments returned are the batch's own, to feed the strategy.

    >>> import numpy as np
    >>> x = np.array([[1.0], [3.0]])  # batch mean 2, biased variance 1
    >>> y, _, _ = renorm_forward(x, None, None, np.array([0.0]), np.array([4.0]),
    ...                          r_max=3.0, d_max=5.0, eps=0.0)
    >>> y.ravel().tolist()  # r = 1/2, d = 1: the running statistics' normalization
    [0.5, 1.5]
    """
    r_max, d_max = _clipping_limits(r_max, d_max)
    if mean is None or var is None:
        if mean is not None or var is not None:
            raise ValueError(
                f"mean, var: expected both (a running estimate) or neither (none yet), got "
                f"mean={describe(mean)} and var={describe(var)}"
            )
        return train_forward(x, gamma, beta, axis=axis, eps=eps)
    xp, x, axes = _training_input(x, axis)
    with quiet_overflow(x):
        x_hat, moments, inv_std = _standardize(xp, x, axes, eps)
        _check_per_feature(moments, mean, "mean")
        _check_per_feature(moments, var, "var")
        r, d = renorm_correction(
            moments.mean, moments.var(ddof=0), mean, var, r_max=r_max, d_max=d_max, eps=eps
        )
        r, d = _along(xp, r, x, axes, x.dtype), _along(xp, d, x, axes, x.dtype)
        y = _scale_shift(xp, x_hat * r + d, gamma, beta, axes)
    return y, moments, _cache(xp, y, x_hat, inv_std, gamma, axes)._replace(r=r, d=d)


def ghost_forward(
    x: Array,
    gamma: Array | None = None,
    beta: Array | None = None,
    *,
    virtual_batch_size: int,
    axis: int = 1,
    eps: float = 1e-5,
) -> tuple[Array, Moments, GhostCache]:
    """Ghost batch normalization's training forward; return ``(y, pooled moments, cache)``.

    The batch is split along axis 0 into consecutive virtual batches of
    ``virtual_batch_size`` samples, and each is normalized by :func:`train_forward` with
    its own statistics (Hoffer et al., 2017, "Train longer, generalize better"). When the
    batch size is not a multiple, the last virtual batch holds the remaining samples
    (fewer); a virtual batch with one value per feature raises ``ValueError``, as a
    training batch does. ``virtual_batch_size`` at least the batch size is plain batch
    normalization.

    The moments returned are those of the whole batch: the exact (Chan) merge of the
    virtual batches' moments. A running strategy is fed them once per training step, so
    that its "batch" is still the training step: an EMA's momentum and a cumulative
    average's count of batches mean the same with or without virtual batches, and the
    pooled strategies see every sample once.

    >>> import numpy as np
    >>> x = np.array([[0.0], [2.0], [10.0], [14.0]])
    >>> y, moments, _ = ghost_forward(x, virtual_batch_size=2, eps=0.0)
    >>> y.ravel().tolist(), moments.count, moments.mean.tolist()
    ([-1.0, 1.0, -1.0, 1.0], 4, [6.5])
    """
    xp, x = as_array(x, "x")
    check_floating(xp, x, "x")
    axes = reduced_axes(x.ndim, axis)
    size = as_count("virtual_batch_size", virtual_batch_size)
    if size < 1:
        raise ValueError(
            f"virtual_batch_size: expected a positive integer, got {virtual_batch_size!r}"
        )
    if 0 not in axes:
        raise ValueError(
            f"axis: expected a feature axis other than 0, the batch axis that virtual "
            f"batches split, got {axis!r}"
        )
    n = x.shape[0]
    sizes = [size] * (n // size) + ([n % size] if n % size else [])
    per_sample = math.prod(x.shape[i] for i in axes if i != 0)
    smallest = min(sizes, default=0) * per_sample
    if smallest < 2:
        raise ValueError(
            f"x: expected more than 1 value per feature in every virtual batch, got a batch "
            f"of shape {tuple(x.shape)} in virtual batches of {sizes} samples "
            f"(virtual_batch_size={size}), the last with {smallest} value"
            f"{'s' if smallest != 1 else ''} per feature"
        )
    starts = [0, *itertools.accumulate(sizes)]
    outputs = [
        train_forward(x[start:stop], gamma, beta, axis=axis, eps=eps)
        for start, stop in itertools.pairwise(starts)
    ]
    y = xp.concat([output[0] for output in outputs], axis=0)
    pooled = _pooled(xp, x, axes, [output[1] for output in outputs])
    return y, pooled, GhostCache(tuple(output[2] for output in outputs))


def backward(dy: Array, cache: Cache | GhostCache) -> tuple[Array, Array | None, Array | None]:
    r"""Gradients ``(dx, dgamma, dbeta)`` of a training forward; None for absent parameters.

    ``dgamma`` and ``dbeta`` are returned whenever the forward had ``gamma``; they are the
    per-feature sums ``sum(dy * x_hat)`` and ``sum(dy)``. For Batch Renormalization,
    ``r`` and ``d`` are constants (Ioffe, 2017): the input gradient is batch
    normalization's with the scale :math:`\gamma r`, and
    ``dgamma = sum(dy * (x_hat * r + d))``. For ghost batch normalization each virtual
    batch has its own batch normalization's gradient, and ``dgamma``, ``dbeta`` are summed
    over the virtual batches.
    """
    xp, dy = as_array(dy, "dy")
    if isinstance(cache, GhostCache):
        return _ghost_backward(xp, dy, cache)
    _check_gradient_shape(dy, tuple(cache.x_hat.shape))
    axes, x_hat = cache.axes, cache.x_hat
    count = split_shape(tuple(dy.shape), axes)[1]
    dbeta = xp.sum(dy, axis=axes, keepdims=True)
    dgamma = xp.sum(dy * x_hat, axis=axes, keepdims=True)
    scale = cache.inv_std if cache.gamma is None else cache.gamma * cache.inv_std
    if cache.r is not None:
        scale = scale * cache.r
    # dx = scale * (dy - (dbeta + x_hat * dgamma) / m), in four passes and one new array
    dx = x_hat * (dgamma / count)
    dx += dbeta / count
    dx -= dy
    dx *= -scale
    if cache.gamma is None:
        return dx, None, None
    if cache.r is not None and cache.d is not None:
        dgamma = dgamma * cache.r + dbeta * cache.d
    return dx, xp.reshape(dgamma, (-1,)), xp.reshape(dbeta, (-1,))


def _ghost_backward(
    xp: Namespace, dy: Array, cache: GhostCache
) -> tuple[Array, Array | None, Array | None]:
    shapes = [tuple(chunk.x_hat.shape) for chunk in cache.caches]
    _check_gradient_shape(dy, (sum(shape[0] for shape in shapes), *shapes[0][1:]))
    starts = [0, *itertools.accumulate(shape[0] for shape in shapes)]
    grads = [
        backward(dy[start:stop], chunk)
        for (start, stop), chunk in zip(itertools.pairwise(starts), cache.caches, strict=True)
    ]
    dx = xp.concat([grad[0] for grad in grads], axis=0)
    dgamma, dbeta = grads[0][1], grads[0][2]
    if dgamma is None or dbeta is None:
        return dx, None, None
    for _, more_dgamma, more_dbeta in grads[1:]:
        dgamma = dgamma + more_dgamma
        dbeta = dbeta + more_dbeta
    return dx, dgamma, dbeta


def _check_gradient_shape(dy: Array, expected: tuple[int, ...]) -> None:
    if tuple(dy.shape) != expected:
        raise ValueError(
            f"dy: expected the shape of the forward output {expected}, got {tuple(dy.shape)}"
        )


def _training_input(x: Array, axis: int) -> tuple[Namespace, Array, tuple[int, ...]]:
    """``(namespace, x, reduced axes)`` of a training batch, checked to have more than one
    value per feature."""
    xp, x = as_array(x, "x")
    check_floating(xp, x, "x")
    axes = reduced_axes(x.ndim, axis)
    count = split_shape(tuple(x.shape), axes)[1]
    if count < 2:
        raise ValueError(
            f"x: expected more than 1 value per feature when training, got input of shape "
            f"{tuple(x.shape)} ({count} value{'s' if count != 1 else ''} per feature)"
        )
    return xp, x, axes


def _standardize(
    xp: Namespace, x: Array, axes: tuple[int, ...], eps: float
) -> tuple[Array, Moments, Array]:
    """``(x_hat, batch moments, inv_std)``: ``x`` normalized by its batch mean and biased
    variance, and ``1 / sqrt(var_B + eps)`` per feature (of the feature shape)."""
    batch = reduce_batch(xp, x, axes)
    inv_std = 1.0 / xp.sqrt(batch.m2 / batch.count + eps)
    x_hat = x - _along(xp, batch.mean, x, axes, x.dtype)
    x_hat *= _along(xp, inv_std, x, axes, x.dtype)
    return x_hat, moments_of_batch(xp, batch), inv_std


def _cache(
    xp: Namespace,
    y: Array,
    x_hat: Array,
    inv_std: Array,
    gamma: Array | None,
    axes: tuple[int, ...],
) -> Cache:
    """The :class:`Cache` of a forward with output ``y``, its per-feature values broadcastable
    in ``y``'s dtype."""
    gamma_b = None if gamma is None else _along(xp, gamma, x_hat, axes, y.dtype)
    return Cache(x_hat, _along(xp, inv_std, x_hat, axes, y.dtype), gamma_b, axes)


def _pooled(xp: Namespace, x: Array, axes: tuple[int, ...], parts: list[Moments]) -> Moments:
    """The moments of the whole batch ``x`` from those of its consecutive ``parts``."""
    try:
        return functools.reduce(Moments.merge, parts)
    except ValueError:  # a part with NaN or Inf: the merge refuses; the caller decides
        with quiet_overflow(x):
            return moments_of_batch(xp, reduce_batch(xp, x, axes))


def _check_per_feature(moments: Moments, value: Array | float, name: str) -> None:
    """Refuse running statistics that are neither a number nor of the feature shape."""
    shape = tuple(getattr(value, "shape", ()))
    if shape not in ((), moments.feature_shape):
        raise ValueError(
            f"{name}: expected a number or an array of the feature shape "
            f"{moments.feature_shape}, got {describe(value)}"
        )


def _clipping_limits(r_max: object, d_max: object) -> tuple[float, float]:
    """``(r_max, d_max)`` checked: ``r_max >= 1`` and ``d_max >= 0``, both finite."""
    r, d = as_real("r_max", r_max), as_real("d_max", d_max)
    if not (math.isfinite(r) and r >= 1.0):
        raise ValueError(f"r_max: expected a finite number of at least 1, got {r_max!r}")
    if not (math.isfinite(d) and d >= 0.0):
        raise ValueError(f"d_max: expected a finite non-negative number, got {d_max!r}")
    return r, d


def _along(
    xp: Namespace, values: Array | float, x: Array, axes: tuple[int, ...], dtype: object
) -> Array:
    """Per-feature ``values`` shaped to broadcast against ``x`` (a number stays a number)."""
    if isinstance(values, int | float):
        return values
    return xp.astype(expand_to(xp, values, x.ndim, axes), dtype)


def _scale_shift(
    xp: Namespace, x_hat: Array, gamma: Array | None, beta: Array | None, axes: tuple[int, ...]
) -> Array:
    y = (
        x_hat
        if gamma is None
        else x_hat * _along(xp, gamma, x_hat, axes, _promoted(xp, x_hat, gamma))
    )
    if beta is None:
        return y
    if y is x_hat or xp.result_type(y, beta) != y.dtype:
        return y + _along(xp, beta, y, axes, _promoted(xp, y, beta))
    y += _along(xp, beta, y, axes, y.dtype)
    return y


def _promoted(xp: Namespace, a: Array, b: Array) -> object:
    return xp.result_type(a, b)
