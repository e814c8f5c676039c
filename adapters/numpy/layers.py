"""A minimal NumPy layer kit: Linear, ReLU and Sequential around the BatchNorm engine.

Every layer has ``forward``/``__call__``, ``backward`` (given the gradient of the loss with
respect to its output, it stores its parameters' gradients and returns the gradient with
respect to its input), ``parameters()`` (``(value, gradient)`` pairs, updated in place by the
optimizer) and ``train()``/``eval()``. ``BatchNorm`` is :class:`normstats.BatchNorm` itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol, TypeVar, runtime_checkable

import numpy as np

from normstats import BatchNorm
from normstats.typing import Array

Parameter = tuple[Array, Array]
"""A parameter's value and the gradient of the loss with respect to it."""


@runtime_checkable
class Layer(Protocol):
    """What the kit's layers (and :class:`normstats.BatchNorm`) provide."""

    training: bool

    def forward(self, x: Array) -> Array: ...

    def backward(self, dy: Array) -> Array: ...

    def parameters(self) -> list[Parameter]: ...

    def train(self, mode: bool = True) -> Any: ...


M = TypeVar("M", bound="Module")


class Module:
    """What every kit layer shares: a training flag, ``train``/``eval`` and ``__call__``.

    A layer gives ``forward``, ``backward`` and, if it learns, ``parameters``.
    """

    training: bool = True

    def __call__(self, x: Array) -> Array:
        return self.forward(x)

    def forward(self, x: Array) -> Array:
        raise NotImplementedError

    def backward(self, dy: Array) -> Array:
        raise NotImplementedError

    def parameters(self) -> list[Parameter]:
        return []

    def train(self: M, mode: bool = True) -> M:
        self.training = bool(mode)
        return self

    def eval(self: M) -> M:
        return self.train(False)


class Linear(Module):
    r"""Affine map :math:`y = x W + b` with He-uniform initialization.

    Parameters
    ----------
    in_features, out_features : int
        Sizes of the input and output.
    rng : numpy.random.Generator or int, optional
        Source of the initial weights (a seed is accepted).
    dtype : NumPy dtype
        Of the weights (float64 by default).

    Shape
    -----
    (N, in_features) -> (N, out_features).

    Examples
    --------
    >>> import numpy as np
    >>> layer = Linear(3, 2, rng=0)
    >>> layer(np.ones((4, 3))).shape
    (4, 2)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        rng: np.random.Generator | int | None = None,
        dtype: Any = np.float64,
    ) -> None:
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name}: expected a positive int, got {value!r}")
            if value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        generator = np.random.default_rng(rng)
        bound = np.sqrt(6.0 / in_features)
        self.weight = generator.uniform(-bound, bound, (in_features, out_features)).astype(dtype)
        self.bias = np.zeros(out_features, dtype=dtype)
        self.grad_weight = np.zeros_like(self.weight)
        self.grad_bias = np.zeros_like(self.bias)
        self._input: Array | None = None

    def __repr__(self) -> str:
        return f"Linear({self.weight.shape[0]}, {self.weight.shape[1]})"

    def forward(self, x: Array) -> Array:
        if x.ndim != 2 or x.shape[1] != self.weight.shape[0]:
            raise ValueError(f"x: expected shape (N, {self.weight.shape[0]}), got {tuple(x.shape)}")
        self._input = x if self.training else None
        return x @ self.weight + self.bias

    def backward(self, dy: Array) -> Array:
        if self._input is None:
            raise ValueError("dy: expected a preceding forward() in training mode, got none")
        self.grad_weight = self._input.T @ dy
        self.grad_bias = dy.sum(axis=0)
        return dy @ self.weight.T

    def parameters(self) -> list[Parameter]:
        return [(self.weight, self.grad_weight), (self.bias, self.grad_bias)]


class ReLU(Module):
    """Rectified linear unit, ``max(x, 0)``."""

    def __init__(self) -> None:
        self._positive: Array | None = None

    def __repr__(self) -> str:
        return "ReLU()"

    def forward(self, x: Array) -> Array:
        positive = x > 0
        self._positive = positive if self.training else None
        return x * positive

    def backward(self, dy: Array) -> Array:
        if self._positive is None:
            raise ValueError("dy: expected a preceding forward() in training mode, got none")
        return dy * self._positive


class Sequential(Module):
    """Layers applied in order; ``backward`` runs them in reverse.

    >>> import numpy as np
    >>> model = Sequential(Linear(4, 8, rng=0), BatchNorm(8), ReLU(), Linear(8, 3, rng=1))
    >>> model(np.random.default_rng(0).normal(size=(16, 4))).shape
    (16, 3)
    >>> len(model.parameters())
    6
    """

    def __init__(self, *layers: Layer) -> None:
        for index, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise TypeError(
                    f"layers[{index}]: expected a layer with forward, backward, parameters and "
                    f"train, got {type(layer).__name__}"
                )
        self.layers: list[Layer] = list(layers)

    def __repr__(self) -> str:
        inner = ",\n".join(f"  {layer!r}" for layer in self.layers)
        return f"Sequential(\n{inner}\n)"

    def __iter__(self) -> Iterator[Layer]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def forward(self, x: Array) -> Array:
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def backward(self, dy: Array) -> Array:
        for layer in reversed(self.layers):
            dy = layer.backward(dy)
        return dy

    def parameters(self) -> list[Parameter]:
        return [parameter for layer in self.layers for parameter in layer.parameters()]

    def train(self, mode: bool = True) -> Sequential:
        self.training = bool(mode)
        for layer in self.layers:
            layer.train(mode)
        return self


def flatten(model: Layer) -> list[Layer]:
    """The leaf layers of ``model`` in the order they run (nested Sequentials unrolled)."""
    if isinstance(model, Sequential):
        return [leaf for layer in model for leaf in flatten(layer)]
    return [model]


__all__ = [
    "BatchNorm",
    "Layer",
    "Linear",
    "Module",
    "Parameter",
    "ReLU",
    "Sequential",
    "flatten",
]
