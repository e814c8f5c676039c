"""Convolution and global average pooling for the NumPy layer kit (1-D and 2-D signals).

Enough for the convolutional networks of the comparison: stride 1, zero padding, any
kernel size, computed as one matrix product over the unfolded windows (im2col).
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from normstats.typing import Array

from .layers import Module, Parameter


class Conv(Module):
    r"""Cross-correlation of (N, C_in, L) or (N, C_in, H, W) input with learned kernels.

    :math:`y[n, o, p] = b_o + \sum_{c, k} W[o, c, k]\, x[n, c, p + k]` over a zero-padded
    input. He-uniform initialization, as :class:`~normstats.adapters.numpy.Linear`.

    Parameters
    ----------
    in_channels, out_channels : int
        Channels of the input and of the output.
    kernel_size : int
        Width of the kernel along every spatial axis.
    dims : {1, 2}
        Spatial axes of the input (1: sequences, 2: images).
    padding : int
        Zeros added on both sides of every spatial axis.
    rng : numpy.random.Generator or int, optional
        Source of the initial weights.

    Shape
    -----
    (N, C_in, *S) -> (N, C_out, *S_out) with S_out = S + 2 padding - kernel_size + 1.

    Examples
    --------
    >>> import numpy as np
    >>> Conv(1, 4, 3, dims=2, padding=1, rng=0)(np.ones((2, 1, 8, 8))).shape
    (2, 4, 8, 8)
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        dims: int = 2,
        padding: int = 0,
        rng: np.random.Generator | int | None = None,
        dtype: Any = np.float64,
    ) -> None:
        if dims not in (1, 2):
            raise ValueError(f"dims: expected 1 or 2 spatial axes, got {dims!r}")
        for name, value in (
            ("in_channels", in_channels),
            ("out_channels", out_channels),
            ("kernel_size", kernel_size),
        ):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name}: expected a positive int, got {value!r}")
            if value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
            raise ValueError(f"padding: expected a non-negative int, got {padding!r}")
        fan_in = in_channels * kernel_size**dims
        bound = math.sqrt(6.0 / fan_in)
        shape = (out_channels, in_channels, *([kernel_size] * dims))
        self.weight = np.random.default_rng(rng).uniform(-bound, bound, shape).astype(dtype)
        self.bias = np.zeros(out_channels, dtype=dtype)
        self.grad_weight = np.zeros_like(self.weight)
        self.grad_bias = np.zeros_like(self.bias)
        self.dims, self.padding, self.kernel_size = dims, padding, kernel_size
        self._cache: tuple[Array, tuple[int, ...]] | None = None

    def __repr__(self) -> str:
        out, cin = self.weight.shape[:2]
        return f"Conv({cin}, {out}, {self.kernel_size}, dims={self.dims}, padding={self.padding})"

    def forward(self, x: Array) -> Array:
        if x.ndim != 2 + self.dims or x.shape[1] != self.weight.shape[1]:
            raise ValueError(
                f"x: expected shape (N, {self.weight.shape[1]}, ...) with {self.dims} spatial "
                f"axis(es), got {tuple(x.shape)}"
            )
        spatial = tuple(range(2, 2 + self.dims))
        padded = np.pad(x, [(0, 0), (0, 0)] + [(self.padding, self.padding)] * self.dims)
        windows = sliding_window_view(padded, (self.kernel_size,) * self.dims, axis=spatial)
        out_shape = windows.shape[2 : 2 + self.dims]
        # (N, C, *S_out, *K) -> (N * prod(S_out), C * prod(K))
        order = (0, *range(2, 2 + self.dims), 1, *range(2 + self.dims, 2 + 2 * self.dims))
        columns = windows.transpose(order).reshape(x.shape[0] * math.prod(out_shape), -1)
        y = columns @ self.weight.reshape(self.weight.shape[0], -1).T + self.bias
        self._cache = (columns, tuple(padded.shape)) if self.training else None
        y = y.reshape(x.shape[0], *out_shape, -1)
        return np.moveaxis(y, -1, 1)

    def backward(self, dy: Array) -> Array:
        if self._cache is None:
            raise ValueError("dy: expected a preceding forward() in training mode, got none")
        columns, padded_shape = self._cache
        out_channels, in_channels = self.weight.shape[:2]
        rows = np.moveaxis(dy, 1, -1).reshape(-1, out_channels)
        self.grad_weight = (rows.T @ columns).reshape(self.weight.shape)
        self.grad_bias = rows.sum(axis=0)
        kernel = (self.kernel_size,) * self.dims
        out_shape = dy.shape[2:]
        grad_columns = (rows @ self.weight.reshape(out_channels, -1)).reshape(
            dy.shape[0], *out_shape, in_channels, *kernel
        )
        grad_padded = np.zeros(padded_shape, dtype=grad_columns.dtype)
        for offset in itertools.product(range(self.kernel_size), repeat=self.dims):
            window = tuple(slice(o, o + size) for o, size in zip(offset, out_shape, strict=True))
            at_offset = (Ellipsis, *offset)
            piece = grad_columns[at_offset]  # (N, *S_out, C)
            target = (slice(None), slice(None), *window)
            grad_padded[target] += np.moveaxis(piece, -1, 1)
        inner = tuple(slice(self.padding, size - self.padding) for size in padded_shape[2:])
        interior = (slice(None), slice(None), *inner)
        return grad_padded[interior]

    def parameters(self) -> list[Parameter]:
        return [(self.weight, self.grad_weight), (self.bias, self.grad_bias)]


class GlobalAveragePool(Module):
    """Mean over every spatial axis: (N, C, *S) -> (N, C)."""

    def __init__(self) -> None:
        self._shape: tuple[int, ...] | None = None

    def __repr__(self) -> str:
        return "GlobalAveragePool()"

    def forward(self, x: Array) -> Array:
        self._shape = tuple(x.shape)
        return x.reshape(x.shape[0], x.shape[1], -1).mean(axis=2)

    def backward(self, dy: Array) -> Array:
        if self._shape is None:
            raise ValueError("dy: expected a preceding forward(), got none")
        size = math.prod(self._shape[2:])
        expanded = dy.reshape(*dy.shape, *([1] * (len(self._shape) - 2))) / size
        return np.broadcast_to(expanded, self._shape).copy()


__all__ = ["Conv", "GlobalAveragePool"]
