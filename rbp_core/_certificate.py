"""Error bounds that hold in floating point, not only in exact arithmetic.

With ``||J||_2 <= mu < 1``, ``||(I - J^T)^{-1}||_2 <= 1 / (1 - mu)``, so any ``z`` satisfies
``||z - z*|| <= ||g - z + J^T z|| / (1 - mu)``. The residual is evaluated afresh (one VJP) and
every rounding between it and the bound is allowed for:

- forming ``r = (g - z) + J^T z`` elementwise rounds each element by at most ``eps`` of the
  operands' size, and a VJP computed to within one rounding per element (an element-wise map)
  adds as much again, so ``delta = 2 eps (||g|| + ||z|| + ||J^T z||)``;
- a computed 2-norm of ``n`` elements (sum of squares, then a square root) is within a relative
  ``(n + 2) eps_s`` of the true norm, ``eps_s`` being the epsilon of the precision the sum
  accumulates in (float32 for half precisions);
- the host arithmetic (float64) adds a few units in the last place, covered by a factor.

What is assumed, and so not covered: the callbacks' own rounding beyond one rounding per
element (a matrix-vector product rounds up to about ``n eps |J^T| |z|``; that error, divided by
``1 - mu``, comes on top), and the truth of ``mu``, which the iterations can only disprove.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from ._floats import eps, size, sum_eps
from ._norms import norm
from ._typing import Array, Namespace

__all__ = ["fixed_point_residual_bound", "norm_slack", "residual_bound", "residual_bound_from_norms"]

_HOST = 1.0 + 16 * 2.0**-53
"""Covers the rounding of the few float64 host operations that combine the norms."""


def norm_slack(xp: Namespace, x: Array) -> float:
    """``1 / (1 - (n + 2) eps_s)``: a computed norm of ``x`` times this bounds its true norm (inf if n is huge)."""
    gamma = (size(x) + 2) * sum_eps(xp, x.dtype)
    return 1.0 / (1.0 - gamma) if gamma < 1.0 else float("inf")


def residual_bound(
    xp: Namespace,
    op: Callable[[Array], Array],
    g: Array,
    z: Array,
    gnorm: float,
    mu: float,
    check_ratio: Callable[[float, float], None],
) -> float:
    """``(||g - z + J^T z|| + delta) / (1 - mu)``, a bound on ``||z - z*||`` that holds in floating point.

    Costs one call of ``op`` (``v -> J^T v``). The pair ``(||J^T z||, ||z||)`` it sees is one more
    lower bound on ``||J||_2``, handed to ``check_ratio``.
    """
    jz = op(z)
    rnorm = norm(xp, (g - z) + jz)
    znorm, jznorm = norm(xp, z), norm(xp, jz)
    check_ratio(jznorm, znorm)
    return residual_bound_from_norms(xp, g, mu, rnorm, gnorm, znorm, jznorm)


def residual_bound_from_norms(
    xp: Namespace, like: Array, mu: float, rnorm: float, gnorm: float, znorm: float, jznorm: float
) -> float:
    """``(||r|| + delta) / (1 - mu)`` from the computed norms of ``r = g - z + J^T z``, ``g``, ``z`` and
    ``J^T z``, for vectors of ``like``'s size and dtype (one sample's, in a batch)."""
    delta = 2.0 * eps(xp, like.dtype) * (gnorm + znorm + jznorm)
    return (rnorm + delta) * norm_slack(xp, like) * _HOST / (1.0 - mu)


def fixed_point_residual_bound(xp: Namespace, like: Array, mu: float, residual: float, scale: float) -> float:
    """``||h - h*|| <= ||F(h) - h|| / (1 - mu)`` for an ``mu``-contraction ``F``, rounding included.

    ``residual`` is the computed norm of the computed ``F(h) - h`` and ``scale`` that of ``F(h)``: the
    computed norm is within the sum's rounding (:func:`norm_slack`) of the computed difference's,
    which is within ``eps (||h|| + ||F(h)||)`` of the true one, and ``||h|| <= ||F(h)|| + ||F(h) - h||``;
    ``F`` as evaluated is taken as exact (one rounding per element of its result is covered).
    """
    if not math.isfinite(residual):
        return math.inf
    slack = norm_slack(xp, like)
    rounding = 2.0 * eps(xp, like.dtype) * (2.0 * scale + residual)
    return (residual + rounding) * slack / (1.0 - mu) * _HOST
