"""Defaults and tolerance resolution shared by the solver objects."""

from __future__ import annotations

import math
from typing import Any

from .._floats import eps
from .._typing import Namespace

__all__ = ["DEFAULT_DIVERGENCE_FACTOR", "DEFAULT_MAX_ITER", "NEUMANN_DIVERGENCE_FACTOR", "resolve_rtol"]

DEFAULT_MAX_ITER = 1000
"""Iteration budget of the tolerance-driven solvers."""

DEFAULT_DIVERGENCE_FACTOR = 1e4
"""A monitored norm this many times above the smallest one seen means divergence."""

NEUMANN_DIVERGENCE_FACTOR = 10.0
"""The same test for a truncated Neumann series, which has no later iterations to recover in.

Chosen on the Hopfield experiment (docs/method.md): it flags the epoch-144 series whose terms grew
214-fold, with no false alarm on the 1430 solves before it.
"""


def resolve_rtol(rtol: float | None, xp: Namespace, dtype: Any) -> float:
    """``rtol`` (validated at construction); None means ``sqrt(eps)`` of the dtype (1.5e-8 in float64, 3.5e-4 in float32)."""
    return math.sqrt(eps(xp, dtype)) if rtol is None else rtol
