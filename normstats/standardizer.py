"""Streaming standardization of model inputs, in scikit-learn's shape."""

from __future__ import annotations

import inspect
import math
from typing import Any

import numpy as np

from ._arrays import all_finite, as_array, check_floating, describe
from .estimators import STRATEGIES, RunningStats, make_stats
from .estimators._pooled import PooledEstimator
from .typing import Array, Namespace
from .validation import as_real

FITTED = ("mean_", "var_", "scale_", "n_samples_seen_", "n_features_in_")
"""The attributes that fitting sets."""


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
    The statistics are computed in float64 whatever the input's dtype; ``transform`` and
    ``inverse_transform`` compute in float64 too and return the input's floating dtype
    (float32 stays float32; integer and bool input gives float64). They refuse NaN and Inf,
    which ``fit`` refuses too, so no NaN leaves them unannounced.

    It follows scikit-learn's estimator API: ``get_params`` / ``set_params`` (so
    ``sklearn.base.clone`` and ``sklearn.pipeline.Pipeline`` accept it), attributes ending in
    ``_`` after fitting, and ``NotFittedError`` (a ``ValueError`` without scikit-learn) when
    transforming before any fit. scikit-learn itself is never imported to do this.

    Parameter changes follow scikit-learn's conventions. A name that is neither ``stats``,
    ``eps`` nor an argument of the chosen strategy is refused at once (``TypeError`` from
    the constructor, ``ValueError`` from :meth:`set_params`); values are checked when fitting,
    so that search tools can set any value and get the error from ``fit``. ``set_params``
    never changes the fitted attributes. Between :meth:`partial_fit` calls, a new ``eps``
    keeps the statistics and only changes ``scale_`` from the next call on; a new ``stats``
    or strategy argument cannot carry the statistics over, so ``partial_fit`` raises a
    ``ValueError`` until :meth:`fit` starts afresh (or the old setting is put back). Any
    error leaves the fitted state exactly as it was.

    Parameters
    ----------
    stats : str
        ``"welford"``, ``"exact"``, ``"cumulative"`` or ``"ema"``.
    eps : float
        Added to the variance before the square root: a finite, non-negative number.
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
    >>> scaler.transform(X.astype(np.float32)).dtype
    dtype('float32')
    """

    def __init__(self, stats: str = "welford", eps: float = 0.0, **stats_kwargs: Any) -> None:
        unknown = _unknown_arguments(stats, stats_kwargs)
        if unknown:
            raise TypeError(_unknown_message(unknown[0], stats, "Standardizer()"))
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
        """Set constructor parameters; the fitted attributes stay until the next fit.

        Raises ``ValueError`` naming a parameter that is neither ``stats``, ``eps`` nor an
        argument of the strategy chosen after the call, and then changes nothing.
        """
        stats = params.get("stats", self.stats)
        stats_kwargs = {**self.stats_kwargs}
        stats_kwargs.update({k: v for k, v in params.items() if k not in ("stats", "eps")})
        unknown = _unknown_arguments(stats, stats_kwargs)
        if unknown:
            raise ValueError(_unknown_message(unknown[0], stats, "set_params"))
        self.stats = stats
        self.eps = params.get("eps", self.eps)
        self.stats_kwargs = stats_kwargs
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
        """Forget earlier batches and fit the statistics of ``X`` (n_samples, n_features).

        The feature count may differ from an earlier fit's.
        """
        _, X, _ = self._checked(X, "X", same_features=False)
        eps = self._checked_eps()
        estimator = self._new_estimator()
        estimator.update(X, axis=0)
        self._estimator, self._built_with = estimator, self._strategy_params()
        self._publish(estimator, eps)
        return self

    def partial_fit(self, X: Array, y: object = None) -> Standardizer:
        """Fold the batch ``X`` (n_samples, n_features) into the statistics.

        Raises ``ValueError`` when ``stats`` or a strategy argument changed since the
        statistics were started (they cannot be carried over; :meth:`fit` starts afresh).
        """
        _, X, _ = self._checked(X, "X")
        eps = self._checked_eps()
        params = self._strategy_params()
        estimator = self._estimator
        if estimator is None or estimator.count == 0:
            estimator = self._new_estimator()
        else:
            changed = _changed(self._built_with or {}, params)
            if changed:
                raise ValueError(
                    f"partial_fit: {changed} since the statistics were started; they cannot be "
                    "carried over to another strategy or setting. Call fit() to start afresh, "
                    "or set the old value back."
                )
        try:
            estimator.update(X, axis=0)
        except (TypeError, ValueError) as error:
            raise _renamed(error, "x", "X") from None
        self._estimator, self._built_with = estimator, params
        self._publish(estimator, eps)
        return self

    def fit_transform(self, X: Array, y: object = None) -> Array:
        """``fit(X)`` then ``transform(X)``."""
        return self.fit(X).transform(X)

    # -- transforming ----------------------------------------------------------------------

    def transform(self, X: Array) -> Array:
        """``(X - mean_) / scale_``, computed in float64, in ``X``'s floating dtype."""
        self._check_fitted("transform")
        xp, X, dtype = self._checked(X, "X", finite=True)
        X = xp.astype(X, xp.float64, copy=False)
        return _in_dtype(xp, (X - self.mean_) / self.scale_, dtype)

    def inverse_transform(self, X: Array) -> Array:
        """``X * scale_ + mean_``: back to the original units (computed as ``transform``)."""
        self._check_fitted("inverse_transform")
        xp, X, dtype = self._checked(X, "X", finite=True)
        X = xp.astype(X, xp.float64, copy=False)
        return _in_dtype(xp, X * self.scale_ + self.mean_, dtype)

    # -- internals ---------------------------------------------------------------------------

    def _strategy_params(self) -> dict[str, Any]:
        """What the statistics depend on: the strategy and its arguments (``eps`` does not)."""
        return {"stats": self.stats, **self.stats_kwargs}

    def _new_estimator(self) -> RunningStats:
        if not isinstance(self.stats, str):
            raise TypeError(
                f"stats: expected a strategy name, one of {sorted(STRATEGIES)}, got "
                f"{type(self.stats).__name__} {self.stats!r}"
            )
        if self.stats not in STRATEGIES:
            raise ValueError(f"stats: expected one of {sorted(STRATEGIES)}, got {self.stats!r}")
        unknown = _unknown_arguments(self.stats, self.stats_kwargs)
        if unknown:
            raise ValueError(_unknown_message(unknown[0], self.stats, "fit"))
        return make_stats(self.stats, **self.stats_kwargs)

    def _checked_eps(self) -> float:
        eps = as_real("eps", self.eps)
        if not (math.isfinite(eps) and eps >= 0):
            raise ValueError(f"eps: expected a finite non-negative number, got {self.eps!r}")
        return eps

    def _checked(
        self, X: Array, name: str, *, same_features: bool = True, finite: bool = False
    ) -> tuple[Namespace, Array, Any]:
        """``(namespace, X, output dtype)``: integer and bool ``X`` come back as float64."""
        if isinstance(X, np.matrix | np.ma.MaskedArray):
            # np.matrix makes * a matrix product; a masked array's mask would be ignored.
            kind = "np.matrix" if isinstance(X, np.matrix) else "masked array"
            raise TypeError(
                f"{name}: expected a plain array, got a {kind}; pass np.asarray(X)"
                + ("" if kind == "np.matrix" else " after filling or dropping the masked values")
            )
        xp, X = as_array(X, name)
        if X.ndim != 2:
            raise ValueError(
                f"{name}: expected a 2-D array (n_samples, n_features), got {describe(X)}"
            )
        if not xp.isdtype(X.dtype, "real floating"):
            if not xp.isdtype(X.dtype, ("integral", "bool")):
                check_floating(xp, X, name)  # raises with the dtype that arrived
            X = xp.astype(X, xp.float64)
        fitted = getattr(self, "n_features_in_", None) if same_features else None
        if fitted is not None and X.shape[1] != fitted:
            raise ValueError(f"{name}: expected {fitted} features, got {describe(X)}")
        if finite and not all_finite(xp, X):
            raise ValueError(f"{name}: expected finite values, got {describe(X)} with NaN or Inf")
        return xp, X, X.dtype

    def _publish(self, estimator: RunningStats, eps: float) -> None:
        """Compute the fitted attributes scikit-learn users read (none before a sample)."""
        if estimator.count == 0:  # every batch skipped under nan_policy="skip"
            for name in FITTED:
                self.__dict__.pop(name, None)
            return
        if isinstance(estimator, PooledEstimator):
            moments = estimator.moments
            var = moments.var(ddof=0)
        else:
            var = estimator.var
        mean = estimator.mean
        scale = (var + eps) ** 0.5
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


def _unknown_arguments(stats: object, stats_kwargs: dict[str, Any]) -> list[str]:
    """The strategy arguments that the strategy named ``stats`` does not take.

    Nothing is known to be wrong while ``stats`` names no strategy: fitting reports that.
    """
    if not isinstance(stats, str) or stats not in STRATEGIES:
        return []
    accepted = inspect.signature(STRATEGIES[stats]).parameters
    return [name for name in stats_kwargs if name not in accepted]


def _unknown_message(name: str, stats: str, where: str) -> str:
    accepted = ["stats", "eps", *inspect.signature(STRATEGIES[stats]).parameters]
    others = [n for n, cls in STRATEGIES.items() if name in inspect.signature(cls).parameters]
    hint = (
        f"; {name!r} is a setting of stats={others[0]!r}: to switch strategies, build a new "
        "Standardizer"
        if others
        else ""
    )
    return (
        f"{where}: invalid parameter {name!r} for a Standardizer with stats={stats!r}: "
        f"expected one of {accepted}, got {name!r}{hint}"
    )


def _changed(before: dict[str, Any], now: dict[str, Any]) -> str:
    """Which parameters differ, as ``"momentum changed from 0.1 to 0.2"`` ('' when none);
    NumPy scalars equal the Python numbers they hold."""
    missing = object()
    changes = []
    for key in dict.fromkeys([*before, *now]):
        old, new = before.get(key, missing), now.get(key, missing)
        if old is missing or new is missing or not _equal(old, new):
            shown = ["unset" if v is missing else repr(v) for v in (old, new)]
            changes.append(f"{key} changed from {shown[0]} to {shown[1]}")
    return ", ".join(changes)


def _equal(a: object, b: object) -> bool:
    try:
        return bool(a == b)
    except (TypeError, ValueError):  # arrays of several values
        return a is b


def _in_dtype(xp: Namespace, result: Array, dtype: Any) -> Array:
    """``result`` (float64) cast to ``dtype``; a value that overflows it raises."""
    if not bool(xp.all(xp.abs(result) <= float(xp.finfo(dtype).max))):  # False for NaN too
        name = str(dtype).removeprefix("torch.")
        raise ValueError(f"X: expected values whose result fits in {name}, got ones that overflow")
    return xp.astype(result, dtype, copy=False)


def _constant_features(mean: Array, var: Array, count: int) -> Array:
    """Features whose variance is within rounding of zero (scikit-learn's bound)."""
    eps = np.finfo(np.float64).eps
    return var <= count * eps * var + (count * mean * eps) ** 2


def _renamed(error: Exception, name: str, new_name: str) -> Exception:
    """``error`` with its message's leading parameter ``name`` called ``new_name``.

    The strategy names the batch ``x``; the Standardizer's users pass it as ``X``.
    """
    message = str(error)
    if message.startswith(f"{name}: "):
        message = f"{new_name}: " + message.removeprefix(f"{name}: ")
    return type(error)(message)
