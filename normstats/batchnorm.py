"""The BatchNorm layer: batch statistics in training, a pluggable strategy at inference."""

from __future__ import annotations

from typing import Any

import numpy as np

from . import functional
from ._arrays import all_finite, as_array, check_floating, describe, normalize_axis
from .estimators import ExactFullPass, RunningStats, Strategy, resolve_stats
from .estimators._strategy import NoBatchError
from .moments import Moments
from .typing import Array
from .validation import as_count, as_flag, as_real


class BatchNorm:
    r"""Batch normalization over axis ``axis`` with a pluggable population-statistics strategy.

    In training, each feature (channel) is normalized with the mean and *biased* variance of
    the current batch over every other axis (:math:`N` for (N, C), :math:`N \cdot L` for
    (N, C, L), :math:`N \cdot H \cdot W` for (N, C, H, W)), and the batch's moments are fed
    to ``stats``, which keeps the population estimate (its variance is the unbiased one). In
    evaluation the layer computes :math:`\gamma (x - \mu) / \sqrt{\sigma^2 + \epsilon} + \beta`
    from ``stats.mean`` and ``stats.var``. ``backward`` is the exact gradient through the
    batch mean and variance (see :mod:`normstats.functional`).

    Two training modes help small batches (docs/small-batch.md); evaluation is the same
    with either. ``renorm=True`` is Batch Renormalization (Ioffe, 2017): each training
    batch is corrected towards the strategy's current estimate, taken before the batch is
    fed (:func:`~normstats.functional.renorm_forward`); before the strategy has tracked a
    batch there is none and the step is plain batch normalization. ``virtual_batch_size``
    is Ghost BatchNorm (Hoffer et al., 2017): virtual batches along axis 0 are normalized
    separately, and the strategy is fed the moments of the whole batch once per step
    (:func:`~normstats.functional.ghost_forward`). The two do not combine.

    Parameters
    ----------
    num_features : int
        Size of the feature axis (C).
    stats : str or RunningStats
        ``"ema"`` (default), ``"cumulative"``, ``"welford"``, ``"exact"`` (filled only by a
        calibration pass, never by training batches), an estimator instance, or ``"batch"``
        to normalize with batch statistics in evaluation too.
    eps : float
        Added to the variance before the square root.
    affine : bool
        Learn a scale ``gamma`` and shift ``beta`` per feature.
    axis : int
        The feature axis: 1 for (N, C, ...), -1 for channels-last.
    renorm : bool
        Train with Batch Renormalization. Needs a strategy with a running estimate during
        training: ``"exact"`` and ``"batch"`` are refused.
    r_max, d_max : float
        Batch Renormalization's clipping limits: ``r`` in ``[1/r_max, r_max]`` (``r_max``
        at least 1) and ``d`` in ``[-d_max, d_max]`` (``d_max`` at least 0).
    renorm_warmup : int
        Training steps over which the limits grow linearly from ``r_max = 1``, ``d_max = 0``
        (plain batch normalization) to the given ones; the step is the number of batches
        the strategy has tracked, so a strategy loaded from a state dict resumes it. 0: the
        given limits from the first step.
    virtual_batch_size : int or None
        Train with Ghost BatchNorm over virtual batches of this many samples (the last one
        holds the remainder when the batch size is not a multiple); None: the whole batch.
    dtype : NumPy dtype
        Of ``gamma`` and ``beta`` (float64 by default).
    **stats_kwargs
        Passed to the strategy, e.g. ``momentum=0.01`` for ``"ema"``.

    Shape
    -----
    Input of 2 to 5 dimensions with ``num_features`` along ``axis``; output the same shape.

    Examples
    --------
    >>> import numpy as np
    >>> import normstats as ns
    >>> bn = ns.BatchNorm(2, stats="welford")
    >>> x = np.random.default_rng(0).normal(5.0, 2.0, size=(64, 2))
    >>> y = bn(x)
    >>> bool(np.allclose(y.mean(axis=0), 0.0) and np.allclose(y.std(axis=0), 1.0, atol=1e-4))
    True
    >>> bn.eval()
    BatchNorm(2, stats=Welford(nan_policy='raise'), eps=1e-05, affine=True, axis=1)
    >>> expected = (x - x.mean(axis=0)) / np.sqrt(x.var(axis=0, ddof=1) + 1e-5)
    >>> bool(np.allclose(bn(x), expected))
    True
    """

    def __init__(
        self,
        num_features: int,
        stats: str | type[Strategy] | RunningStats = "ema",
        eps: float = 1e-5,
        affine: bool = True,
        axis: int = 1,
        *,
        renorm: bool = False,
        r_max: float = 3.0,
        d_max: float = 5.0,
        renorm_warmup: int = 0,
        virtual_batch_size: int | None = None,
        dtype: Any = np.float64,
        **stats_kwargs: Any,
    ) -> None:
        if isinstance(num_features, bool) or not isinstance(num_features, int | np.integer):
            raise TypeError(f"num_features: expected a positive int, got {num_features!r}")
        if num_features < 1:
            raise ValueError(f"num_features: expected a positive int, got {num_features!r}")
        eps = as_real("eps", eps)
        if not eps >= 0:
            raise ValueError(f"eps: expected a non-negative number, got {eps!r}")
        if isinstance(axis, bool) or not isinstance(axis, int):
            raise TypeError(f"axis: expected an int, got {axis!r}")
        renorm = as_flag("renorm", renorm)
        functional.renorm_limits(0, renorm_warmup, r_max, d_max)  # checks the three
        if virtual_batch_size is not None:
            virtual_batch_size = as_count("virtual_batch_size", virtual_batch_size)
            if virtual_batch_size < 1:
                raise ValueError(
                    f"virtual_batch_size: expected a positive integer or None, got "
                    f"{virtual_batch_size!r}"
                )
            if renorm:
                raise ValueError(
                    "renorm, virtual_batch_size: expected one small-batch training mode, got "
                    "both; Batch Renormalization corrects the whole batch's statistics and "
                    "Ghost BatchNorm replaces them by virtual batches', which do not combine"
                )
        resolved = resolve_stats(stats, **stats_kwargs)
        if renorm and (resolved is None or isinstance(resolved, ExactFullPass)):
            why = (
                "it keeps no statistics"
                if resolved is None
                else "only a calibration after training fills it"
            )
            raise ValueError(
                f"renorm: expected a strategy with a running estimate during training "
                f"(Batch Renormalization corrects each training batch towards it), got "
                f"stats={stats!r}, which has none ({why}); choose 'ema', 'cumulative', "
                f"'welford' or a strategy of your own"
            )
        self.num_features = int(num_features)
        self.eps = eps
        self.affine = bool(affine)
        self.axis = axis
        self.stats: RunningStats | None = resolved
        self.renorm = renorm
        self.r_max = float(r_max)
        self.d_max = float(d_max)
        self.renorm_warmup = int(renorm_warmup)
        self.virtual_batch_size: int | None = virtual_batch_size
        self.gamma: Array | None = np.ones(self.num_features, dtype=dtype) if affine else None
        self.beta: Array | None = np.zeros(self.num_features, dtype=dtype) if affine else None
        self.grad_gamma: Array | None = None if self.gamma is None else np.zeros_like(self.gamma)
        self.grad_beta: Array | None = None if self.beta is None else np.zeros_like(self.beta)
        self.training = True
        self._cache: functional.Cache | functional.GhostCache | None = None

    def __repr__(self) -> str:
        stats = "'batch'" if self.stats is None else repr(self.stats)
        modes = ""
        if self.renorm:
            modes += (
                f", renorm=True, r_max={self.r_max}, d_max={self.d_max}, "
                f"renorm_warmup={self.renorm_warmup}"
            )
        if self.virtual_batch_size is not None:
            modes += f", virtual_batch_size={self.virtual_batch_size}"
        return (
            f"BatchNorm({self.num_features}, stats={stats}, eps={self.eps}, "
            f"affine={self.affine}, axis={self.axis}{modes})"
        )

    def train(self, mode: bool = True) -> BatchNorm:
        """Training mode (batch statistics, strategy updated); returns the layer."""
        self.training = bool(mode)
        return self

    def eval(self) -> BatchNorm:
        """Evaluation mode (the strategy's statistics); returns the layer."""
        return self.train(False)

    def __call__(self, x: Array) -> Array:
        return self.forward(x)

    def forward(self, x: Array) -> Array:
        """Normalize ``x``: batch statistics in training (and with ``stats="batch"``)."""
        x = self._checked_input(x)
        self._cache = None  # a refused or evaluation forward leaves nothing to differentiate
        if self.training:
            y, moments, cache = self._train_forward(x)
            self._feed(moments)
            self._cache = cache
            return y
        if self.stats is None:
            return functional.train_forward(x, self.gamma, self.beta, axis=self.axis, eps=self.eps)[
                0
            ]
        mean, var = self.population_statistics()
        return functional.eval_forward(
            x, mean, var, self.gamma, self.beta, axis=self.axis, eps=self.eps
        )

    def _train_forward(
        self, x: Array
    ) -> tuple[Array, Moments, functional.Cache | functional.GhostCache]:
        """The training forward of the layer's mode: plain, renormalized or ghost."""
        if self.virtual_batch_size is not None:
            return functional.ghost_forward(
                x,
                self.gamma,
                self.beta,
                virtual_batch_size=self.virtual_batch_size,
                axis=self.axis,
                eps=self.eps,
            )
        if not self.renorm or self.stats is None:
            return functional.train_forward(x, self.gamma, self.beta, axis=self.axis, eps=self.eps)
        step = self.stats.num_batches
        r_max, d_max = functional.renorm_limits(step, self.renorm_warmup, self.r_max, self.d_max)
        tracked = step > 0  # before the first tracked batch: no estimate, plain BN
        return functional.renorm_forward(
            x,
            self.gamma,
            self.beta,
            self.stats.mean if tracked else None,
            self.stats.var if tracked else None,
            r_max=r_max,
            d_max=d_max,
            axis=self.axis,
            eps=self.eps,
        )

    def backward(self, dy: Array) -> Array:
        """Gradient with respect to the input of the last training ``forward``.

        Stores ``grad_gamma`` and ``grad_beta`` (overwriting them). Raises ``ValueError``
        without a preceding training forward or when ``dy`` has another shape.
        """
        if self._cache is None:
            raise ValueError(
                "dy: expected a preceding forward() in training mode, got none (backward "
                "needs the batch statistics of a training forward)"
            )
        dx, dgamma, dbeta = functional.backward(dy, self._cache)
        if dgamma is not None:
            self.grad_gamma, self.grad_beta = dgamma, dbeta
        return dx

    def parameters(self) -> list[tuple[Array, Array]]:
        """``(value, gradient)`` pairs of the learned parameters (none without ``affine``)."""
        if self.gamma is None or self.beta is None:
            return []
        return [(self.gamma, self.grad_gamma), (self.beta, self.grad_beta)]

    def population_statistics(self) -> tuple[Array | float, Array | float]:
        """``(mean, var)`` used in evaluation; raises if the strategy has none yet."""
        if self.stats is None:
            raise ValueError("stats: a 'batch' layer keeps no population statistics")
        try:
            return self.stats.mean, self.stats.var
        except NoBatchError:
            hint = (
                "an exact full pass is filled by calibration: run "
                "normstats.adapters.numpy.recalibrate(model, batches) first"
                if isinstance(self.stats, ExactFullPass)
                else "train the layer on at least one batch first"
            )
            raise ValueError(f"stats: the layer has no population statistics yet; {hint}") from None

    def _checked_input(self, x: Array) -> Array:
        xp, x = as_array(x, "x")
        check_floating(xp, x, "x")
        if not 2 <= x.ndim <= 5:
            raise ValueError(
                f"x: expected an input of 2 to 5 dimensions (N, C, ...), got {describe(x)}"
            )
        (feature_axis,) = normalize_axis(self.axis, x.ndim)
        if x.shape[feature_axis] != self.num_features:
            raise ValueError(
                f"x: expected {self.num_features} features along axis {self.axis}, got "
                f"{x.shape[feature_axis]} ({describe(x)})"
            )
        return x

    def _feed(self, moments: Moments) -> None:
        """Give the batch moments to the strategy; refuse a non-finite batch unchanged.

        The exact full pass is never fed training batches: only calibration fills it.
        """
        stats = self.stats
        fed = stats if stats is not None and not isinstance(stats, ExactFullPass) else None
        xp, m2 = as_array(moments.m2, "m2")
        if not all_finite(xp, m2):
            if fed is not None and fed.nan_policy == "skip":
                fed.update_moments(moments)  # counted as skipped; nothing is folded in
                return
            raise ValueError("x: expected finite values, got a training batch with NaN or Inf")
        if fed is not None:
            fed.update_moments(moments)
