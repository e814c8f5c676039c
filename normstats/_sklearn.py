"""scikit-learn's transformer conventions, kept with or without scikit-learn installed.

The :class:`~normstats.Standardizer` follows them without inheriting from scikit-learn:
importing ``sklearn.base`` costs seconds (it imports SciPy), which every ``import normstats``
would pay. scikit-learn is imported only where scikit-learn itself is at work: to build its
tags (only scikit-learn asks for them), to raise its ``NotFittedError``, and to read its
global ``transform_output`` configuration (which exists only once scikit-learn is imported).
What scikit-learn's base classes would give is written here on the same terms: feature
names recorded from a DataFrame's columns and checked on later calls (with scikit-learn's
messages, which its estimator checks look for), and ``set_output`` containers.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from typing import Any

import numpy as np

OUTPUTS = ("default", "pandas")
"""The containers ``set_output(transform=...)`` offers (polars is not supported)."""


def not_fitted_error(message: str) -> ValueError:
    """scikit-learn's ``NotFittedError`` (a ``ValueError``) where it is installed, else a
    plain ``ValueError``."""
    try:
        from sklearn.exceptions import NotFittedError
    except ImportError:
        return ValueError(message)
    error: ValueError = NotFittedError(message)
    return error


def transformer_tags() -> Any:
    """scikit-learn's tags of a transformer that needs no target, lets NaN through (they
    are ignored when fitting and kept when transforming) and keeps float64 and float32."""
    from sklearn.utils import InputTags, Tags, TargetTags, TransformerTags

    return Tags(
        estimator_type=None,
        target_tags=TargetTags(required=False),
        transformer_tags=TransformerTags(preserves_dtype=["float64", "float32"]),
        input_tags=InputTags(allow_nan=True),
    )


# -- feature names ----------------------------------------------------------------------------


def feature_names(data: object) -> np.ndarray[Any, np.dtype[np.object_]] | None:
    """The column names of a DataFrame ``data`` when they are all strings, else None.

    Names of mixed types raise a ``TypeError`` (as scikit-learn does): some columns could
    not be told apart from positions.
    """
    columns = getattr(data, "columns", None)
    if columns is None or isinstance(data, np.ndarray):
        return None
    names = np.asarray(columns, dtype=object)
    kinds = sorted({type(name).__name__ for name in names})
    if names.ndim != 1 or not all(isinstance(name, str) for name in names):
        if "str" in kinds:
            raise TypeError(
                f"X: expected column names that are all strings (feature names), got names "
                f"of the types {kinds}; convert them all with X.columns.astype(str)"
            )
        return None
    return names


def check_feature_names(
    fitted: np.ndarray[Any, Any] | None, given: np.ndarray[Any, Any] | None, owner: str
) -> None:
    """Raise ``ValueError`` when ``given`` names other columns than ``fitted`` (in order);
    warn when only one of them has names, as scikit-learn does."""
    if fitted is None and given is None:
        return
    if fitted is None or given is None:
        warnings.warn(
            f"X has feature names, but {owner} was fitted without feature names"
            if fitted is None
            else f"X does not have valid feature names, but {owner} was fitted with feature names",
            UserWarning,
            stacklevel=3,
        )
        return
    if len(fitted) == len(given) and all(fitted == given):
        return
    message = "X: The feature names should match those that were passed during fit.\n"
    unseen = sorted(set(given) - set(fitted))
    missing = sorted(set(fitted) - set(given))
    if unseen:
        message += "Feature names unseen at fit time:\n" + _listed(unseen)
    if missing:
        message += "Feature names seen at fit time, yet now missing:\n" + _listed(missing)
    if not unseen and not missing:
        message += "Feature names must be in the same order as they were in fit.\n"
    raise ValueError(message)


def _listed(names: list[str], most: int = 5) -> str:
    lines = [f"- {name}\n" for name in names[:most]]
    return "".join(lines) + ("- ...\n" if len(names) > most else "")


def names_out(
    fitted: np.ndarray[Any, np.dtype[np.object_]] | None, n_features: int, input_features: object
) -> np.ndarray[Any, np.dtype[np.object_]]:
    """The output feature names of a one-to-one transformer: the input's names."""
    if input_features is None:
        if fitted is not None:
            return np.array(fitted, dtype=object)
        return np.asarray([f"x{i}" for i in range(n_features)], dtype=object)
    given: np.ndarray[Any, np.dtype[np.object_]] = np.asarray(input_features, dtype=object)
    if given.ndim != 1 or len(given) != n_features:
        raise ValueError(
            f"input_features should have length equal to the number of features: expected "
            f"{n_features} names, got {given.tolist()}"
        )
    if fitted is not None and not np.array_equal(given, fitted):
        raise ValueError(
            f"input_features is not equal to feature_names_in_: expected {fitted.tolist()}, "
            f"got {given.tolist()}"
        )
    return given


# -- set_output ---------------------------------------------------------------------------------


def check_output(transform: object) -> None:
    if transform not in OUTPUTS:
        raise ValueError(
            f"transform: expected one of {list(OUTPUTS)} or None, got {transform!r}"
            + ("; polars output is not supported" if transform == "polars" else "")
        )


def output_container(config: dict[str, str] | None) -> str:
    """What ``transform`` returns: the estimator's ``set_output`` choice, else scikit-learn's
    global ``transform_output`` (only set once scikit-learn is imported), else "default"."""
    chosen = (config or {}).get("transform", "default")
    if chosen == "default" and "sklearn" in sys.modules:
        chosen = sys.modules["sklearn"].get_config().get("transform_output", "default")
    return str(chosen)


def wrapped(result: Any, data: object, names: Any, container: str) -> Any:
    """``result`` in the ``container`` that ``set_output`` chose: a pandas DataFrame with
    the output feature names as columns and the index of the input ``data`` if it is a DataFrame."""
    if container == "default":
        return result
    check_output(container)
    pd = importlib.import_module("pandas")
    index = data.index if isinstance(data, pd.DataFrame) else None
    return pd.DataFrame(np.asarray(result), index=index, columns=names, copy=False)
