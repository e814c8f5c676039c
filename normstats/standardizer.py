"""Streaming standardization of model inputs, in scikit-learn's shape."""

from __future__ import annotations

import copy
import functools
import inspect
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from . import _sklearn
from ._arrays import as_array, check_floating, describe
from ._feature_statistics import FeatureStatistics
from .deferred import checked, handler_for
from .estimators import (
    STRATEGIES,
    RunningStats,
    Strategy,
    make_stats,
    strategy_class,
)
from .typing import Array, Namespace
from .validation import as_flag, as_real

FITTED = ("mean_", "var_", "scale_", "n_samples_seen_", "n_features_in_", "feature_names_in_")
"""The attributes that fitting sets (``feature_names_in_`` only for a DataFrame)."""
PARAMETERS = ("stats", "eps", "with_mean", "with_std", "copy")
"""The Standardizer's own parameters; the chosen strategy's arguments come after them."""


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
    (float32 stays float32; integer and bool input gives float64).

    A Dask array (with ``normstats.adapters.dask`` imported) is fitted on its cluster, in
    one pass that sends only per-feature statistics to the client, and transformed lazily:
    ``transform`` and ``inverse_transform`` return Dask arrays (docs/dask.md).

    NaN are missing values, as in scikit-learn: left out of the statistics feature by feature
    (each feature's statistics are those of its non-NaN values, and ``n_samples_seen_``
    becomes an array of per-feature counts once they differ), and passed through as NaN by
    ``transform`` and ``inverse_transform``. For ``"cumulative"`` and ``"ema"`` a batch
    counts for a feature only if it has values of it: a feature whose values in a batch are
    all NaN keeps its estimate (the EMA does not decay it), and one with a single value
    there is refused (its batch variance is undefined). A feature without any value has
    NaN statistics. Inf is an error (a batch with Inf is skipped instead under the
    strategy's ``nan_policy="skip"``).

    It follows scikit-learn's estimator API without importing scikit-learn to do so:
    ``get_params`` / ``set_params`` (so ``sklearn.base.clone`` and
    ``sklearn.pipeline.Pipeline`` accept it), attributes ending in ``_`` after fitting,
    ``feature_names_in_`` after fitting a pandas DataFrame, ``get_feature_names_out``,
    ``set_output(transform="pandas")``, and ``NotFittedError`` (a ``ValueError`` without
    scikit-learn) when transforming before any fit. It passes every check of
    ``sklearn.utils.estimator_checks.check_estimator`` for every built-in strategy.

    Parameter changes follow scikit-learn's conventions. A name that is neither one of the
    parameters below nor an argument of the chosen strategy is refused at once
    (``TypeError`` from the constructor, ``ValueError`` from :meth:`set_params`); values are
    checked when fitting, so that search tools can set any value and get the error from
    ``fit``. ``set_params`` never changes the fitted attributes. Between :meth:`partial_fit`
    calls, a new ``eps`` keeps the statistics and only changes ``scale_`` from the next
    call on; a new ``stats`` or strategy argument cannot carry the statistics over, so
    ``partial_fit`` raises a ``ValueError`` until :meth:`fit` starts afresh (or the old
    setting is put back). Any error leaves the fitted state exactly as it was.

    Parameters
    ----------
    stats : str, Strategy subclass or Strategy instance
        ``"welford"``, ``"exact"``, ``"cumulative"`` or ``"ema"``; a strategy of your own as
        ``"module:Class"``, its class (built with the strategy arguments) or an instance
        (each fit starts from a fresh copy of it, with its settings and no state).
    eps : float
        Added to the variance before the square root: a finite, non-negative number.
    with_mean : bool
        Subtract ``mean_`` in ``transform`` (and add it back in ``inverse_transform``);
        False leaves the data's mean in place. The statistics are estimated either way.
    with_std : bool
        Divide by ``scale_`` in ``transform`` (multiply in ``inverse_transform``); False
        divides by nothing.
    copy : bool
        False lets ``transform`` and ``inverse_transform`` write their result into ``X``
        when ``X`` is a writeable NumPy array of the result's dtype, and return ``X``
        (the result is computed first, so an error leaves ``X`` as it was).
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
    >>> scaler.fit([[1.0, np.nan], [3.0, 4.0], [5.0, 6.0]]).n_samples_seen_.tolist()
    [3, 2]
    """

    def __init__(
        self,
        stats: str | type[Strategy] | Strategy = "welford",
        eps: float = 0.0,
        *,
        with_mean: bool = True,
        with_std: bool = True,
        copy: bool = True,
        **stats_kwargs: Any,
    ) -> None:
        unknown = _unknown_arguments(stats, stats_kwargs)
        if unknown:
            raise TypeError(_unknown_message(unknown[0], stats, "Standardizer()"))
        self.stats = stats
        self.eps = eps
        self.with_mean = with_mean
        self.with_std = with_std
        self.copy = copy
        self._stats_kwargs = stats_kwargs
        self._statistics: FeatureStatistics | None = None
        self._built_with: dict[str, Any] | None = None

    def __repr__(self) -> str:
        params = ", ".join(f"{key}={value!r}" for key, value in self.get_params().items())
        return f"Standardizer({params})"

    @property
    def stats_kwargs(self) -> dict[str, Any]:
        """The strategy's arguments (a copy: change them with :meth:`set_params`)."""
        return dict(self._stats_kwargs)

    # -- scikit-learn's parameter protocol ---------------------------------------------

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """Constructor parameters by name (strategy arguments included)."""
        return {name: getattr(self, name) for name in PARAMETERS} | self._stats_kwargs

    def set_params(self, **params: Any) -> Standardizer:
        """Set constructor parameters; the fitted attributes stay until the next fit.

        Raises ``ValueError`` naming a parameter that is neither one of the Standardizer's
        nor an argument of the strategy chosen after the call, and then changes nothing.
        """
        stats = params.get("stats", self.stats)
        stats_kwargs = self._stats_kwargs | {
            key: value for key, value in params.items() if key not in PARAMETERS
        }
        unknown = _unknown_arguments(stats, stats_kwargs)
        if unknown:
            raise ValueError(_unknown_message(unknown[0], stats, "set_params"))
        for name in PARAMETERS:
            setattr(self, name, params.get(name, getattr(self, name)))
        self._stats_kwargs = stats_kwargs
        return self

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "n_features_in_")

    def __sklearn_tags__(self) -> Any:
        """scikit-learn's estimator tags (only scikit-learn calls this)."""
        return _sklearn.transformer_tags()

    def _more_tags(self) -> dict[str, Any]:
        """The same tags for scikit-learn before 1.6."""
        return {"allow_nan": True, "preserves_dtype": [np.float64, np.float32]}

    # -- fitting -------------------------------------------------------------------------

    def fit(self, X: Array, y: object = None) -> Standardizer:
        """Forget earlier batches and fit the statistics of ``X`` (n_samples, n_features).

        The feature count may differ from an earlier fit's.
        """
        xp, X, _, names = self._checked(X, fitting=True, reset=True)
        eps = self._checked_eps()
        self._checked_flags()
        statistics = FeatureStatistics(self._strategy_factory(), X.shape[1])
        self._fold(statistics, xp, X)
        self._statistics, self._built_with = statistics, self._strategy_params()
        self._publish(statistics, eps, names)
        return self

    def partial_fit(self, X: Array, y: object = None) -> Standardizer:
        """Fold the batch ``X`` (n_samples, n_features) into the statistics.

        Raises ``ValueError`` when ``stats`` or a strategy argument changed since the
        statistics were started (they cannot be carried over; :meth:`fit` starts afresh).
        """
        reset = not self.__sklearn_is_fitted__()
        xp, X, _, names = self._checked(X, fitting=True, reset=reset)
        eps = self._checked_eps()
        self._checked_flags()
        params = self._strategy_params()
        statistics = self._statistics
        if reset or statistics is None:
            statistics = FeatureStatistics(self._strategy_factory(), X.shape[1])
        else:
            changed = _changed(self._built_with or {}, params)
            if changed:
                raise ValueError(
                    f"partial_fit: {changed} since the statistics were started; they cannot be "
                    "carried over to another strategy or setting. Call fit() to start afresh, "
                    "or set the old value back."
                )
            names = getattr(self, "feature_names_in_", None)
        self._fold(statistics, xp, X)
        self._statistics, self._built_with = statistics, params
        self._publish(statistics, eps, names)
        return self

    def fit_transform(self, X: Array, y: object = None) -> Array:
        """``fit(X)`` then ``transform(X)``."""
        return self.fit(X).transform(X)

    # -- transforming ----------------------------------------------------------------------

    def transform(self, X: Array, copy: bool | None = None) -> Array:
        """``(X - mean_) / scale_``, computed in float64, in ``X``'s floating dtype.

        NaN stay NaN. ``with_mean=False`` leaves out the subtraction and ``with_std=False``
        the division; ``copy`` (default: the ``copy`` parameter) as in the constructor.
        """
        return self._transformed(X, copy, "transform")

    def inverse_transform(self, X: Array, copy: bool | None = None) -> Array:
        """``X * scale_ + mean_``: back to the original units (computed as ``transform``)."""
        return self._transformed(X, copy, "inverse_transform")

    def get_feature_names_out(
        self, input_features: object = None
    ) -> np.ndarray[Any, np.dtype[np.object_]]:
        """The names of the output features: those of the input (``feature_names_in_``
        after fitting a DataFrame, else ``x0``, ``x1``, ...), one for one."""
        self._check_fitted("get_feature_names_out")
        fitted = getattr(self, "feature_names_in_", None)
        return _sklearn.names_out(fitted, self.n_features_in_, input_features)

    def set_output(self, *, transform: str | None = None) -> Standardizer:
        """Choose what ``transform``, ``inverse_transform`` and ``fit_transform`` return:
        ``"pandas"`` (a DataFrame with the output feature names as columns; pandas must be
        installed), ``"default"`` (arrays, or scikit-learn's global ``transform_output``
        setting) or None (no change)."""
        if transform is not None:
            _sklearn.check_output(transform)
            self._sklearn_output_config = {"transform": transform}
        return self

    # -- internals ---------------------------------------------------------------------------

    def _transformed(self, X: Array, copy: bool | None, method: str) -> Array:
        self._check_fitted(method)
        copy = as_flag("copy", self.copy if copy is None else copy)
        with_mean, with_std = self._checked_flags()
        original = X
        xp, X, dtype, _ = self._checked(X)
        result = xp.astype(X, xp.float64, copy=False)
        if method == "transform":
            result = result - self.mean_ if with_mean else result
            result = result / self.scale_ if with_std else result
        else:
            result = result * self.scale_ if with_std else result
            result = result + self.mean_ if with_mean else result
        result = _in_dtype(xp, result, dtype)
        if not copy and _writes_into(X, result):
            X[...] = result
            result = X
        elif result is X:  # neither centred nor scaled: still a new array
            result = xp.asarray(X, copy=True)
        container = _sklearn.output_container(getattr(self, "_sklearn_output_config", None))
        if container == "default":
            return result
        return _sklearn.wrapped(result, original, self.get_feature_names_out(), container)

    def _strategy_params(self) -> dict[str, Any]:
        """What the statistics depend on: the strategy and its arguments (``eps`` does not)."""
        return {"stats": self.stats, **self._stats_kwargs}

    def _strategy_factory(self) -> Callable[[], RunningStats]:
        """A function that builds the strategy, once its name and arguments are checked."""
        if isinstance(self.stats, Strategy):
            if self._stats_kwargs:
                raise ValueError(
                    f"stats: strategy arguments {sorted(self._stats_kwargs)} apply to a "
                    f"strategy name or class, not to the instance {self.stats!r}"
                )
            return functools.partial(_fresh_copy, self.stats)
        try:
            cls = strategy_class(self.stats)
        except (TypeError, ValueError) as error:
            message = str(error).removeprefix("name: ")
            raise type(error)(f"stats: {message}") from None
        unknown = _unknown_arguments(cls, self._stats_kwargs)
        if unknown:
            raise ValueError(_unknown_message(unknown[0], cls, "fit"))
        return functools.partial(make_stats, cls, **self._stats_kwargs)

    def _checked_eps(self) -> float:
        eps = as_real("eps", self.eps)
        if not (math.isfinite(eps) and eps >= 0):
            raise ValueError(f"eps: expected a finite non-negative number, got {self.eps!r}")
        return eps

    def _checked_flags(self) -> tuple[bool, bool]:
        as_flag("copy", self.copy)
        return as_flag("with_mean", self.with_mean), as_flag("with_std", self.with_std)

    def _checked(
        self, X: Array, *, fitting: bool = False, reset: bool = False
    ) -> tuple[Namespace, Array, Any, Any]:
        """``(namespace, X, output dtype, feature names)``: integer, bool and object ``X``
        come back as float64, the feature names are a DataFrame's string column names."""
        X_in, X = X, _dense(X)
        names = _sklearn.feature_names(X_in)
        xp, X = as_array(X, "X")
        if isinstance(X, np.ndarray) and X.dtype == np.object_:
            X = _numbers(X)
        if X.ndim != 2:
            raise ValueError(
                f"X: expected a 2-D array (n_samples, n_features), got {describe(X)}. Reshape "
                "your data with X.reshape(-1, 1) if it has a single feature or "
                "X.reshape(1, -1) if it is a single sample"
            )
        if xp.isdtype(X.dtype, "complex floating"):
            raise _ComplexDataError(
                f"X: Complex data not supported: expected real numbers, got {describe(X)}"
            )
        if not xp.isdtype(X.dtype, "real floating"):
            if not xp.isdtype(X.dtype, ("integral", "bool")):
                check_floating(xp, X, "X")  # raises with the dtype that arrived
            X = xp.astype(X, xp.float64)
        if math.isnan(X.shape[1]):  # a Dask array whose chunk sizes are not known
            raise ValueError(
                f"X: expected an array whose number of features is known, got {describe(X)}; "
                "for a Dask array, call X.compute_chunk_sizes() first"
            )
        if X.shape[1] == 0:
            raise ValueError(
                f"X: expected at least one feature, got 0 feature(s) (shape={tuple(X.shape)}) "
                "while a minimum of 1 is required."
            )
        if fitting and X.shape[0] == 0:
            raise ValueError(f"X: expected at least one sample, got {describe(X)}")
        if not reset:
            fitted = getattr(self, "feature_names_in_", None)
            _sklearn.check_feature_names(fitted, names, type(self).__name__)
            expected = self.n_features_in_
            if X.shape[1] != expected:
                raise ValueError(
                    f"X has {X.shape[1]} features, but {type(self).__name__} is expecting "
                    f"{expected} features as input: expected an array of shape (n_samples, "
                    f"{expected}), got {describe(X)}"
                )
        if not fitting:  # a Dask array's values are checked when its result is computed
            X = checked(X, _check_no_inf, "X")
        return xp, X, X.dtype, names

    def _fold(self, statistics: FeatureStatistics, xp: Namespace, X: Array) -> None:
        """Fold the batch ``X`` into ``statistics`` (skipped when it holds Inf under
        ``nan_policy="skip"``); an error leaves them as they were.

        A Dask array is reduced on its cluster, in one pass that also finds its Inf.
        """
        deferred = handler_for(X, "X")
        batch = None if deferred is None else deferred.reduce(X, (0,), ignore_nan=True)
        if batch is not None and batch.count == 0:  # its number of rows was unknown
            raise ValueError(f"X: expected at least one sample, got {describe(X)}")
        if bool(xp.any(xp.isinf(X))) if batch is None else batch.inf:
            if statistics.first.nan_policy == "skip":
                return
            raise ValueError(
                f"X: expected finite values or NaN (NaN are left out), got {describe(X)} with Inf"
            )
        try:
            if batch is None:
                statistics.update(xp, X)
            else:
                statistics.update_reduced(batch, X)
        except (TypeError, ValueError) as error:
            raise _renamed(error, "x", "X") from None

    def _publish(self, statistics: FeatureStatistics, eps: float, names: Any) -> None:
        """Compute the fitted attributes scikit-learn users read (none before a value)."""
        mean, var, counts = statistics.summary()
        for name in FITTED:
            self.__dict__.pop(name, None)
        if not np.any(counts):  # nothing seen: every value NaN, or a skipped batch
            return
        scale = (var + eps) ** 0.5
        constant = _constant_features(mean, var, counts)
        self.mean_ = mean
        self.var_ = var
        self.scale_ = scale * ~constant + constant
        self.n_samples_seen_ = int(counts[0]) if np.ptp(counts) == 0 else counts
        self.n_features_in_ = int(counts.shape[0])
        if names is not None:
            self.feature_names_in_ = names

    def _check_fitted(self, method: str) -> None:
        if not self.__sklearn_is_fitted__():
            raise _sklearn.not_fitted_error(
                f"This Standardizer instance is not fitted yet: call fit() or partial_fit() "
                f"before {method}()."
            )


class _ComplexDataError(TypeError, ValueError):
    """Complex ``X``: a ``TypeError`` (a wrong dtype), and the ``ValueError`` scikit-learn
    raises for complex data."""


def _dense(X: object) -> object:
    """``X``, unless it is a SciPy sparse array or matrix (refused: centring makes it dense)."""
    if type(X).__module__.startswith("scipy.sparse"):
        raise TypeError(
            f"X: expected a dense array, got a sparse {type(X).__name__} of shape "
            f"{getattr(X, 'shape', '?')}; sparse input is not supported: pass X.toarray()"
        )
    if isinstance(X, np.matrix | np.ma.MaskedArray):
        # np.matrix makes * a matrix product; a masked array's mask would be ignored.
        kind = "np.matrix" if isinstance(X, np.matrix) else "masked array"
        raise TypeError(
            f"X: expected a plain array, got a {kind}; pass np.asarray(X)"
            + ("" if kind == "np.matrix" else " after filling or dropping the masked values")
        )
    return X


def _numbers(X: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """An object array of numbers as float64 (as scikit-learn reads it)."""
    try:
        return X.astype(np.float64)
    except (TypeError, ValueError) as error:
        raise TypeError(
            f"X: expected an array of numbers, got an object array of shape {X.shape} holding "
            f"another value ({error})"
        ) from None


def _writes_into(X: Array, result: Array) -> bool:
    """Whether ``result`` can be written into ``X`` (a writeable NumPy array of its dtype)."""
    return type(X) is np.ndarray and X.flags.writeable and X.dtype == result.dtype


def _known_class(stats: object) -> type[Strategy] | None:
    """The strategy class ``stats`` means when that is known without importing anything: a
    built-in name or a class (a ``"module:Class"`` path is imported when fitting)."""
    if isinstance(stats, str):
        return STRATEGIES.get(stats)
    if isinstance(stats, type) and issubclass(stats, Strategy):
        return stats
    return None


def _unknown_arguments(stats: object, stats_kwargs: dict[str, Any]) -> list[str]:
    """The strategy arguments that the strategy ``stats`` means does not take.

    Nothing is known to be wrong while ``stats`` names no known strategy: fitting reports that.
    """
    cls = _known_class(stats)
    if cls is None:
        return []
    accepted = inspect.signature(cls).parameters
    return [name for name in stats_kwargs if name not in accepted]


def _fresh_copy(strategy: Strategy) -> Strategy:
    """A copy of ``strategy`` with its settings and no state (the instance is not touched)."""
    fresh = copy.deepcopy(strategy)
    fresh.reset()
    return fresh


def _unknown_message(name: str, stats: object, where: str) -> str:
    cls = _known_class(stats)
    assert cls is not None  # only called for the arguments of a known strategy
    accepted = [*PARAMETERS, *inspect.signature(cls).parameters]
    others = [n for n, cls in STRATEGIES.items() if name in inspect.signature(cls).parameters]
    hint = (
        f"; {name!r} is a setting of stats={others[0]!r}: to switch strategies, build a new "
        "Standardizer"
        if others
        else ""
    )
    return (
        f"{where}: invalid parameter {name!r} for a Standardizer with stats="
        f"{stats if isinstance(stats, str) else cls.__name__!r}: "
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
    """``result`` (float64) cast to ``dtype``; a value that overflows it raises (for a Dask
    array, when the result is computed)."""
    result = checked(result, functools.partial(_check_fits, dtype), "X")
    return xp.astype(result, dtype, copy=False)


def _check_fits(dtype: Any, result: Array) -> None:
    xp = as_array(result, "X")[0]
    if bool(xp.any(xp.abs(result) > float(xp.finfo(dtype).max))):  # NaN pass
        name = str(dtype).removeprefix("torch.")
        raise ValueError(f"X: expected values whose result fits in {name}, got ones that overflow")


def _check_no_inf(X: Array) -> None:
    xp = as_array(X, "X")[0]
    if bool(xp.any(xp.isinf(X))):
        raise ValueError(f"X: expected finite values or NaN, got {describe(X)} with Inf")


def _constant_features(mean: Array, var: Array, count: Array | int) -> Array:
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
