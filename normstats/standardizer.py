"""Streaming standardization of model inputs, in scikit-learn's shape."""

from __future__ import annotations

from typing import Any

import numpy as np

from ._arrays import as_array, check_floating, describe
from ._typing import Array
from ._validation import as_real
from .estimators import STRATEGIES, RunningStats, make_stats
from .estimators._pooled import PooledEstimator


class Standardizer:
    r"""Per-feature standardization ``(X - mean_) / scale_`` with any statistics strategy.

    The data preprocessing step that BatchNorm generalizes to every layer. Fed batch by batch
    with :meth:`partial_fit` (or at once with :meth:`fit`), it keeps its statistics in a
    running-statistics strategy:

    - ``"welford"`` (default) and ``"exact"``: the pooled statistics of every sample seen;
      ``mean_`` and ``var_`` (the population variance, ``ddof=0``) then equal scikit-learn's
      ``StandardScaler`` fed the same batches, and stay exact for data far from zero;
    - ``"cumulative"`` and ``"ema"``: ``var_`` is the strategy's own estimate (the average of
      unbiased batch variances), and ``mean_`` its average of batch means.

    ``scale_`` is ``sqrt(var_ + eps)``, with 1 for constant features (as scikit-learn does).
    It follows scikit-learn's estimator API: ``get_params`` / ``set_params`` (so
    ``sklearn.base.clone`` and ``sklearn.pipeline.Pipeline`` accept it), attributes ending in
    ``_`` after fitting, and ``NotFittedError`` (a ``ValueError`` without scikit-learn) when
    transforming before any fit. scikit-learn itself is never imported to do this.

    Parameters
    ----------
    stats : str
        ``"welford"``, ``"exact"``, ``"cumulative"`` or ``"ema"``.
    eps : float
        Added to the variance before the square root.
    **stats_kwargs
        Passed to the strategy, e.g. ``momentum=0.01`` for ``"ema"``.

    Examples
    --------
    >>> import numpy as np
    >>> import normstats as ns
    >>> X = np.array([[1.0, 10.0], [3.0, 30.0], [5.0, 20.0]])
    >>> scaler = ns.Standardizer().fit(X)
    >>> scaler.mean_.tolist(), scaler.var_.tolist()
    ([3.0, 20.0], [2.6666666666666665, 66.66666666666667])
    >>> bool(np.allclose(scaler.inverse_transform(scaler.transform(X)), X))
    True
    """

    def __init__(self, stats: str = "welford", eps: float = 0.0, **stats_kwargs: Any) -> None:
        self.stats = stats
        self.eps = eps
        self.stats_kwargs = stats_kwargs
        self._estimator: RunningStats | None = None
        self._built_with: dict[str, Any] | None = None

    def __repr__(self) -> str:
        params = ", ".join(f"{key}={value!r}" for key, value in self.get_params().items())
        return f"Standardizer({params})"

    # -- scikit-learn's parameter protocol ---------------------------------------------

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """Constructor parameters by name (strategy arguments included)."""
        return {"stats": self.stats, "eps": self.eps, **self.stats_kwargs}

    def set_params(self, **params: Any) -> Standardizer:
        """Set constructor parameters; a fitted state stays until the next fit.

        A later ``partial_fit`` with other strategy parameters starts new statistics.
        """
        for key, value in params.items():
            if key in ("stats", "eps"):
                setattr(self, key, value)
            else:
                self.stats_kwargs = {**self.stats_kwargs, key: value}
        return self

    def __sklearn_is_fitted__(self) -> bool:
        return self._estimator is not None and self._estimator.count > 0

    def __sklearn_tags__(self) -> Any:
        """scikit-learn's estimator tags: an unsupervised transformer (only scikit-learn calls
        this, so it imports scikit-learn)."""
        from sklearn.utils import InputTags, Tags, TargetTags, TransformerTags

        return Tags(
            estimator_type=None,
            target_tags=TargetTags(required=False),
            transformer_tags=TransformerTags(preserves_dtype=["float64", "float32"]),
            input_tags=InputTags(),
        )

    # -- fitting -------------------------------------------------------------------------

    def fit(self, X: Array, y: object = None) -> Standardizer:
        """Forget earlier batches and fit the statistics of ``X`` (n_samples, n_features)."""
        self._estimator = None
        return self.partial_fit(X)

    def partial_fit(self, X: Array, y: object = None) -> Standardizer:
        """Fold the batch ``X`` (n_samples, n_features) into the statistics."""
        X = self._checked(X, "X")
        params = self.get_params()
        reuse = self._estimator is not None and self._built_with == params
        estimator = (
            self._estimator if reuse and self._estimator is not None else self._new_estimator()
        )
        estimator.update(X, axis=0)
        self._estimator, self._built_with = estimator, params
        self._publish(estimator)
        return self

    def fit_transform(self, X: Array, y: object = None) -> Array:
        """``fit(X)`` then ``transform(X)``."""
        return self.fit(X).transform(X)

    # -- transforming ----------------------------------------------------------------------

    def transform(self, X: Array) -> Array:
        """``(X - mean_) / scale_``."""
        self._check_fitted("transform")
        X = self._checked(X, "X")
        return (X - self.mean_) / self.scale_

    def inverse_transform(self, X: Array) -> Array:
        """``X * scale_ + mean_``: back to the original units."""
        self._check_fitted("inverse_transform")
        X = self._checked(X, "X")
        return X * self.scale_ + self.mean_

    # -- internals ---------------------------------------------------------------------------

    def _new_estimator(self) -> RunningStats:
        if self.stats not in STRATEGIES:
            raise ValueError(f"stats: expected one of {sorted(STRATEGIES)}, got {self.stats!r}")
        eps = as_real("eps", self.eps)
        if not eps >= 0:
            raise ValueError(f"eps: expected a non-negative number, got {self.eps!r}")
        return make_stats(self.stats, **self.stats_kwargs)

    def _checked(self, X: Array, name: str) -> Array:
        xp, X = as_array(X, name)
        if X.ndim != 2:
            raise ValueError(
                f"{name}: expected a 2-D array (n_samples, n_features), got {describe(X)}"
            )
        if not xp.isdtype(X.dtype, "real floating"):
            if not xp.isdtype(X.dtype, ("integral", "bool")):
                check_floating(xp, X, name)  # raises with the dtype that arrived
            X = xp.astype(X, xp.float64)
        fitted = getattr(self, "n_features_in_", None)
        if fitted is not None and X.shape[1] != fitted:
            raise ValueError(f"{name}: expected {fitted} features, got {describe(X)}")
        return X

    def _publish(self, estimator: RunningStats) -> None:
        """Compute the fitted attributes scikit-learn users read."""
        if isinstance(estimator, PooledEstimator):
            moments = estimator.moments
            var = moments.var(ddof=0)
        else:
            var = estimator.var
        mean = estimator.mean
        scale = (var + as_real("eps", self.eps)) ** 0.5
        constant = _constant_features(mean, var, estimator.count)
        self.mean_ = mean
        self.var_ = var
        self.scale_ = scale * ~constant + constant
        self.n_samples_seen_ = estimator.count
        self.n_features_in_ = int(getattr(mean, "shape", (1,))[0])

    def _check_fitted(self, method: str) -> None:
        if self.__sklearn_is_fitted__():
            return
        message = (
            f"This Standardizer instance is not fitted yet: call fit() or partial_fit() "
            f"before {method}()."
        )
        try:
            from sklearn.exceptions import NotFittedError
        except ImportError:
            raise ValueError(message) from None
        raise NotFittedError(message)


def _constant_features(mean: Array, var: Array, count: int) -> Array:
    """Features whose variance is within rounding of zero (scikit-learn's bound)."""
    eps = np.finfo(np.float64).eps
    return var <= count * eps * var + (count * mean * eps) ** 2
