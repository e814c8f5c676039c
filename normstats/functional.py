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
"""

from __future__ import annotations

import math
from typing import NamedTuple

from ._arrays import (
    as_array,
    check_floating,
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
    xp, x = as_array(x, "x")
    check_floating(xp, x, "x")
    axes = reduced_axes(x.ndim, axis)
    count = split_shape(tuple(x.shape), axes)[1]
    if count < 2:
        raise ValueError(
            f"x: expected more than 1 value per feature when training, got input of shape "
            f"{tuple(x.shape)} ({count} value{'s' if count != 1 else ''} per feature)"
        )
    dtype = x.dtype
    with quiet_overflow(x):  # a NaN/Inf batch gives NaN; the caller decides
        batch = reduce_batch(xp, x, axes)
        moments = moments_of_batch(xp, batch)
        inv_std = 1.0 / xp.sqrt(batch.m2 / count + eps)
        x_hat = x - _along(xp, batch.mean, x, axes, dtype)
        x_hat *= _along(xp, inv_std, x, axes, dtype)
        y = _scale_shift(xp, x_hat, gamma, beta, axes)
    gamma_b = None if gamma is None else _along(xp, gamma, x, axes, y.dtype)
    return y, moments, Cache(x_hat, _along(xp, inv_std, x, axes, y.dtype), gamma_b, axes)


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
    r_max, d_max = as_real("r_max", r_max), as_real("d_max", d_max)
    if not (math.isfinite(r_max) and r_max >= 1.0):
        raise ValueError(f"r_max: expected a finite number of at least 1, got {r_max!r}")
    if not (math.isfinite(d_max) and d_max >= 0.0):
        raise ValueError(f"d_max: expected a finite non-negative number, got {d_max!r}")
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
    return xp.clip(r, 1.0 / r_max, r_max), xp.clip(d, -d_max, d_max)


def backward(dy: Array, cache: Cache) -> tuple[Array, Array | None, Array | None]:
    """Gradients ``(dx, dgamma, dbeta)`` of the training forward; None for absent parameters.

    ``dgamma`` and ``dbeta`` are returned whenever the forward had ``gamma``; they are the
    per-feature sums ``sum(dy * x_hat)`` and ``sum(dy)``.
    """
    xp, dy = as_array(dy, "dy")
    if tuple(dy.shape) != tuple(cache.x_hat.shape):
        raise ValueError(
            f"dy: expected the shape of the forward output {tuple(cache.x_hat.shape)}, "
            f"got {tuple(dy.shape)}"
        )
    axes, x_hat = cache.axes, cache.x_hat
    count = split_shape(tuple(dy.shape), axes)[1]
    dbeta = xp.sum(dy, axis=axes, keepdims=True)
    dgamma = xp.sum(dy * x_hat, axis=axes, keepdims=True)
    scale = cache.inv_std if cache.gamma is None else cache.gamma * cache.inv_std
    # dx = scale * (dy - (dbeta + x_hat * dgamma) / m), in four passes and one new array
    dx = x_hat * (dgamma / count)
    dx += dbeta / count
    dx -= dy
    dx *= -scale
    if cache.gamma is None:
        return dx, None, None
    return dx, xp.reshape(dgamma, (-1,)), xp.reshape(dbeta, (-1,))


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
