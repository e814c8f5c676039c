"""Covariate shifts of the test split: what happens when test data are not drawn like training.

A shift is applied to the test inputs only, after they were standardized with the training
split's statistics, so a severity is in units of each feature's training standard deviation:

- ``noise:s`` — additive Gaussian noise, ``x + s * z`` with ``z ~ N(0, 1)`` drawn per value
  from ``numpy.random.default_rng(seed)`` (the network's seed: the same test set for every
  strategy evaluated on one network);
- ``contrast:s`` — ``x * (1 - s)``, for ``0 <= s <= 1`` (1 leaves every feature at its
  training mean);
- ``offset:s`` — ``x + s``;
- ``translate:k`` — each sample moved ``k`` positions along its last axis (to the right in
  an image, later in a signal; ``k < 0`` the other way), the vacated positions filled with
  0, the training mean. It needs samples with a spatial axis (digits' 8x8 images, MNIST-1D's
  signals, an ``.npz`` whose ``X`` has more than two dimensions).

``none`` leaves the test set as it is; a comparison always evaluates it, as the reference.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

NONE = "none"
KINDS = ("noise", "contrast", "offset", "translate")


class ShiftError(ValueError):
    """A shift that cannot be parsed or applied; the message names ``--shift``."""


def parse(names: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Validate ``NAME:SEVERITY`` shifts (a comma-separated string or a sequence); ``none``
    comes first whether it was given or not, then the others in their order, repeats refused."""
    items = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
    for name in items:
        if name != NONE:
            severity(name)
    repeated = sorted({n for n in items if items.count(n) > 1})
    if repeated:
        raise ShiftError(f"--shift: expected each shift once, got {', '.join(repeated)} twice")
    return (NONE, *(n for n in items if n != NONE))


def severity(name: str) -> float:
    """The severity of ``NAME:SEVERITY``, checked against what the shift accepts."""
    kind, _, value = name.partition(":")
    if kind not in KINDS or not value:
        raise ShiftError(
            f"--shift: expected none or NAME:SEVERITY with NAME one of {', '.join(KINDS)} "
            f"(as noise:0.5), got {name!r}"
        )
    try:
        amount = float(value)
    except ValueError:
        raise ShiftError(f"--shift: {name!r}: expected a number after {kind}:") from None
    if not math.isfinite(amount):
        raise ShiftError(f"--shift: {name!r}: expected a finite severity, got {value}")
    if kind == "noise" and amount < 0:
        raise ShiftError(f"--shift: {name!r}: expected a noise sigma >= 0, got {value}")
    if kind == "contrast" and not 0 <= amount <= 1:
        raise ShiftError(f"--shift: {name!r}: expected a contrast severity in [0, 1], got {value}")
    if kind == "translate" and amount != int(amount):
        raise ShiftError(f"--shift: {name!r}: expected a whole number of positions, got {value}")
    return amount


def check(
    names: tuple[str, ...], image_shape: tuple[int, ...], spatial: bool, dataset: str
) -> None:
    """Refuse a translation the data cannot take (flat features, or as long as the axis)."""
    for name in names:
        if not name.startswith("translate:"):
            continue
        if not spatial:
            raise ShiftError(
                f"--shift: {name!r}: translate needs samples with a spatial axis (images or "
                f"signals), got flat features in {dataset} (an .npz whose X is 2-D)"
            )
        length = image_shape[-1]
        if abs(severity(name)) >= length:
            raise ShiftError(
                f"--shift: {name!r}: expected fewer positions than the sample's last axis "
                f"({length}), got {int(severity(name))}"
            )


def apply(
    name: str, X: np.ndarray[Any, Any], image_shape: tuple[int, ...], seed: int
) -> np.ndarray[Any, Any]:
    """The test inputs ``X`` (one flat row per sample) under shift ``name``; a new array."""
    if name == NONE:
        return X
    amount = severity(name)
    kind = name.partition(":")[0]
    if kind == "noise":
        noise: np.ndarray[Any, Any] = np.random.default_rng(seed).standard_normal(X.shape)
        return X + amount * noise
    if kind == "contrast":
        return X * (1 - amount)
    if kind == "offset":
        return X + amount
    k = int(amount)
    samples = X.reshape(len(X), *image_shape)
    moved: np.ndarray[Any, Any] = np.zeros_like(samples)
    if k >= 0:
        moved[..., k:] = samples[..., : samples.shape[-1] - k]
    else:
        moved[..., :k] = samples[..., -k:]
    flat: np.ndarray[Any, Any] = moved.reshape(X.shape)
    return flat
