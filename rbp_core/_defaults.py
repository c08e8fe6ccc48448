"""Defaults shared by the functions and the method objects."""

from __future__ import annotations

import math
from typing import Any

from ._arrays import check_nonnegative, eps

__all__ = ["DEFAULT_DIVERGENCE_FACTOR", "DEFAULT_MAX_ITER", "NEUMANN_DIVERGENCE_FACTOR", "resolve_tol"]

DEFAULT_MAX_ITER = 1000
"""Iteration budget of the tolerance-driven solvers."""

DEFAULT_DIVERGENCE_FACTOR = 1e4
"""A monitored norm this many times above the smallest one seen means divergence."""

NEUMANN_DIVERGENCE_FACTOR = 10.0
"""The same test for a truncated Neumann series, which has no later iterations to recover in.

Chosen on the Hopfield experiment (docs/method.md): it flags the epoch-144 series whose terms grew
150-fold, with no false alarm on the 1430 solves before it.
"""


def resolve_tol(tol: float | None, xp: Any, dtype: Any) -> float:
    """``tol``, validated; None means ``sqrt(eps)`` of the dtype (1.5e-8 for float64, 3.5e-4 for float32)."""
    if tol is None:
        return math.sqrt(eps(xp, dtype))
    return check_nonnegative(tol, "tol")


def check_divergence_factor(value: float | None) -> float | None:
    """None (no divergence test) or a real number > 1."""
    if value is None:
        return None
    v = check_nonnegative(value, "divergence_factor")
    if v <= 1.0:
        msg = f"divergence_factor must be > 1 or None, got {value!r}"
        raise ValueError(msg)
    return v
