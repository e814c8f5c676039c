"""Array plumbing: namespaces, dtypes, axes and the reductions the statistics are built on.

Everything here is namespace-agnostic: it works on NumPy arrays and torch tensors alike and
keeps results in the input's namespace and on its device. torch is never imported here; a
tensor brings its own namespace.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import array_api_compat
import numpy as np

from .typing import Array, Namespace


def describe(value: object) -> str:
    """Name what arrived, for error messages: ``"float32 array of shape (3, 4)"``."""
    shape = getattr(value, "shape", None)
    dtype = getattr(value, "dtype", None)
    if shape is not None and dtype is not None:
        return f"{_dtype_name(dtype)} array of shape {tuple(shape)}"
    return f"{type(value).__name__} {value!r}"


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


_NAMESPACES: dict[type, Namespace] = {np.ndarray: array_api_compat.array_namespace(np.empty(0))}
"""Namespaces by array type, so that the hot path does not look them up again."""


def as_array(x: object, name: str) -> tuple[Namespace, Array]:
    """Return ``(namespace, array)`` for an array-API array or anything NumPy can convert.

    A subclass of ``numpy.ndarray`` (``np.matrix``, ``np.memmap``) is viewed as a plain
    ndarray, so that reductions keep NumPy's array semantics (``np.matrix`` makes ``@`` a
    matrix product and keeps every result 2-d). A masked array (``numpy.ma``) is refused:
    its masked entries would be counted as samples.
    """
    xp = _NAMESPACES.get(type(x))
    if xp is not None:
        return xp, x
    if isinstance(x, np.ndarray):
        if isinstance(x, np.ma.MaskedArray):
            raise TypeError(
                f"{name}: expected a plain array, got a masked array (numpy.ma.MaskedArray, "
                f"{describe(x)}) whose masked entries would count as samples; pass the "
                f"unmasked samples instead, e.g. np.ma.compress_rows(x) or x.compressed()"
            )
        return _NAMESPACES[np.ndarray], x.view(np.ndarray)
    try:
        xp = array_api_compat.array_namespace(x)
    except TypeError:
        pass
    else:
        if array_api_compat.is_numpy_array(x) or array_api_compat.is_torch_array(x):
            _NAMESPACES[type(x)] = xp
        return xp, x
    try:
        converted = np.asarray(x)
    except (TypeError, ValueError) as error:
        raise TypeError(
            f"{name}: expected an array (NumPy array or torch tensor), got {describe(x)}"
        ) from error
    if converted.dtype == object:
        raise TypeError(f"{name}: expected an array of numbers, got {describe(x)}")
    return array_api_compat.array_namespace(converted), converted


def check_floating(xp: Namespace, x: Array, name: str) -> None:
    """Raise ``TypeError`` unless ``x`` has a real floating-point dtype."""
    floating = (
        x.dtype.kind == "f" if type(x) is np.ndarray else xp.isdtype(x.dtype, "real floating")
    )
    if not floating:
        raise TypeError(
            f"{name}: expected a real floating-point dtype (float16, bfloat16, float32 or "
            f"float64), got {_dtype_name(x.dtype)}"
        )


def normalize_axis(axis: object, ndim: int, name: str = "axis") -> tuple[int, ...]:
    """Return ``axis`` as a sorted tuple of non-negative ints, NumPy's convention.

    NumPy integers count as ints (``axis=np.int64(0)``), as they do in NumPy.
    """
    if isinstance(axis, np.integer):
        axis = int(axis)
    if isinstance(axis, bool) or not isinstance(axis, int | tuple):
        raise TypeError(f"{name}: expected an int or a tuple of ints, got {axis!r}")
    return _normalize_axis(axis, ndim, name)


def sample_axes(x: Array, axis: object, name: str = "x") -> tuple[int, ...]:
    """The axes of ``x`` that hold samples, normalized; a 0-d ``x`` has none and is refused."""
    if x.ndim == 0:
        raise ValueError(
            f"{name}: expected an array with at least one axis of samples, got {describe(x)}"
        )
    return normalize_axis(axis, x.ndim)


@functools.lru_cache(maxsize=256)
def _normalize_axis(axis: int | tuple[object, ...], ndim: int, name: str) -> tuple[int, ...]:
    given = axis if isinstance(axis, tuple) else (axis,)
    axes: list[int] = []
    for a in given:
        if isinstance(a, bool) or not isinstance(a, int | np.integer):
            raise TypeError(f"{name}: expected an int or a tuple of ints, got {axis!r}")
        if not -ndim <= a < ndim:
            raise ValueError(
                f"{name}: expected axes in [{-ndim}, {ndim}) for an input with {ndim} "
                f"dimensions, got {axis!r}"
            )
        axes.append(int(a) % ndim)
    normalized = tuple(sorted(axes))
    if len(set(normalized)) != len(normalized):
        raise ValueError(f"{name}: expected distinct axes, got {axis!r}")
    return normalized


@functools.cache
def _float64_works(xp: Namespace, device: Any) -> bool:
    try:
        xp.zeros(1, dtype=xp.float64, device=device)
    except (TypeError, RuntimeError, ValueError):
        return False
    return True


def accumulation_dtype(xp: Namespace, x: Array) -> Any:
    """float64 on every device that has it (float32 where it does not, as Apple's MPS)."""
    if type(x) is np.ndarray:
        return np.float64
    device = getattr(x, "device", None) or array_api_compat.device(x)
    return xp.float64 if _float64_works(xp, device) else xp.float32


def accumulation_copy(xp: Namespace, x: Array) -> Array:
    """A copy of ``x`` in its :func:`accumulation_dtype`, to accumulate sums in place."""
    if type(x) is np.ndarray:  # without the array-API wrapper's checks: once per batch
        return x.astype(np.float64)
    return xp.astype(x, accumulation_dtype(xp, x), copy=True)


def zeros_like(xp: Namespace, x: Array) -> Array:
    """Zeros of ``x``'s shape, dtype, namespace and device (for NumPy without the array-API
    wrapper's checks: once per batch)."""
    if type(x) is np.ndarray:
        return np.zeros(x.shape, x.dtype)
    return xp.zeros_like(x)


@functools.lru_cache(maxsize=256)
def split_shape(shape: tuple[int, ...], axes: tuple[int, ...]) -> tuple[tuple[int, ...], int]:
    """The feature shape (``shape`` without ``axes``) and the sample count (their product)."""
    feature_shape = tuple(size for i, size in enumerate(shape) if i not in axes)
    return feature_shape, math.prod(shape[i] for i in axes)


@functools.lru_cache(maxsize=64)
def _ones(count: int) -> np.ndarray[Any, np.dtype[np.float64]]:
    ones = np.ones(count)
    ones.flags.writeable = False
    return ones


def column_summer(xp: Namespace, d: Array, axes: tuple[int, ...]) -> Callable[[Array], Array]:
    """A function that sums arrays shaped like ``d`` over ``axes``.

    NumPy's ``sum(axis=0)`` walks a C-ordered batch row by row; when the reduced axes lead,
    a product of the batch viewed as (samples, features) with a vector of ones gives the same
    float64 sums about three times as fast. Elsewhere the array's own ``sum`` does.
    """
    k = len(axes)
    if type(d) is np.ndarray and k and axes[-1] == k - 1 and d.flags.c_contiguous:
        samples, features = _ones(math.prod(d.shape[:k])), d.shape[k:]
        n = samples.shape[0]
        matrix_shape = (n, -1) if n else (0, math.prod(features))  # -1 is ambiguous for 0 rows
        return lambda a: (samples @ a.reshape(matrix_shape)).reshape(features)
    if k:  # the array's own sum: on torch the array-API wrapper costs a third as much again
        return lambda a: a.sum(axes)
    return lambda a: xp.sum(a, axis=axes)  # no axes: no reduction (torch would sum them all)


def expand_to(xp: Namespace, a: Array, ndim: int, axes: tuple[int, ...]) -> Array:
    """Insert length-1 axes at ``axes`` so an array of the feature shape broadcasts."""
    shape = list(a.shape)
    for axis in axes:
        shape.insert(axis, 1)
    return xp.reshape(a, tuple(shape)) if len(shape) != a.ndim else a


def clamp_non_negative(xp: Namespace, a: Array) -> Array:
    """``max(a, 0)``: rounding can leave a tiny negative sum of squared deviations."""
    if isinstance(a, np.ndarray):
        return np.maximum(a, 0.0, out=a)
    return xp.clip(a, min=0.0)


def all_finite(xp: Namespace, *arrays: Array) -> bool:
    """Whether every element of every array is finite (checked once per batch: kept lean).

    NumPy's ufuncs are called directly, without the Python wrappers of ``ndarray.all``.
    Elsewhere ``max(|a|)`` is finite exactly when every element is (NaN propagates through
    ``max``): two kernels and one host synchronisation per array, a third of what
    ``isfinite`` then ``all`` costs on torch, where ``isfinite`` is several kernels.
    """
    for a in arrays:
        if type(a) is np.ndarray:
            if not np.logical_and.reduce(np.isfinite(a), axis=None):
                return False
        elif math.prod(a.shape) and not math.isfinite(xp.abs(a).max()):
            return False
    return True


def quiet_overflow(x: object) -> AbstractContextManager[object]:
    """A context in which NumPy does not warn about overflow and NaN: for arithmetic on
    arrays like ``x`` whose result the caller checks for finiteness itself (NaN and Inf then
    raise or are skipped under a ``nan_policy``, which a warning turned into an error would
    pre-empt). Other libraries do not warn: for them it does nothing."""
    if isinstance(x, np.ndarray):
        return np.errstate(over="ignore", invalid="ignore")
    return contextlib.nullcontext()


def arrays_equal(a: Array, b: Array) -> bool:
    """Exact equality of two arrays of any namespace: same shape and same values."""
    if tuple(a.shape) != tuple(b.shape):
        return False
    xp = array_api_compat.array_namespace(a, b)
    return bool(xp.all(a == b))
