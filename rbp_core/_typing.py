"""Type aliases shared by the core: arrays and namespaces are any Array API library's."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeAlias

__all__ = ["Array", "FixedPointMap", "Namespace", "SampleMap", "VectorMap"]

Array: TypeAlias = Any
"""Any array of a library that follows the Array API standard."""

Namespace: TypeAlias = Any
"""An Array API namespace, as array-api-compat returns it."""

VectorMap: TypeAlias = Callable[[Array], Array]
"""A callback ``v -> J^T v`` or ``v -> J v``: an array like ``v`` in, one like it out."""

FixedPointMap: TypeAlias = Callable[[Array], Array]
"""The map ``h -> F(x, w, h)`` of a fixed-point problem."""

SampleMap: TypeAlias = Callable[[Array, Array], Array]
"""A callback of the active samples, ``(x, indices) -> ...`` (``takes_indices``): their rows in, their images out."""
