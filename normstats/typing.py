"""Type aliases shared by the package.

normstats works on any array that follows the Python array API standard through
``array-api-compat`` (NumPy arrays and torch tensors on any device). Neither library's
array type is a common static type, so arrays are typed as :data:`Array` (``Any``) and the
namespace that operates on them as :data:`Namespace`.
"""

from __future__ import annotations

from typing import Any, TypeAlias

Array: TypeAlias = Any
"""An array-API array: a ``numpy.ndarray`` or a ``torch.Tensor``."""

Namespace: TypeAlias = Any
"""The array-API namespace of an :data:`Array` (``array_api_compat.numpy`` or ``.torch``)."""

Axis: TypeAlias = int | tuple[int, ...]
"""One axis or several, NumPy's convention (negative values count from the end)."""

__all__ = ["Array", "Axis", "Namespace"]
