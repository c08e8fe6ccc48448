"""The solvers' vector updates, each returning the squared norm it needs, in one call.

Every iteration of a solver does a few element-wise updates and one reduction
whose value the stopping test needs on the host. :class:`VectorOps` writes these
on the core Array API (one expression each, as a reader of the algorithm would
write them). A backend may supply a subclass that fuses an update and its
reduction into one pass over memory: :func:`vector_ops` picks CuPy's fused
kernels (``rbp_core.backends.cupy``) automatically for CuPy arrays, which is the
one place the core looks at which library it runs on. The subclass decides per
call whether it can handle the arrays (dtype, memory layout) and otherwise
falls back to the generic code, so callers never need to know.

The squared norms come back as 0-d arrays on the arrays' device (no sync);
:func:`norm_from_sq` turns one into the host float the stopping test needs and
recomputes it with scaling when the fast sum of squares overflowed or
underflowed.
"""

from __future__ import annotations

import importlib
import math
from typing import Any

import array_api_compat

from ._arrays import Array, slow_norm, sqnorm

__all__ = ["VectorOps", "norm_from_sq", "vector_ops"]


class VectorOps:
    """Generic vector updates on the core Array API (no in-place writes, any library)."""

    fused = False

    def __init__(self, xp: Any) -> None:
        self.xp = xp

    def add_sq(self, a: Array, b: Array) -> tuple[Array, Array]:
        """``(a + b, ||b||^2)``: a Neumann step ``z + v`` with the norm of the new term."""
        return a + b, sqnorm(self.xp, b)

    def add_diff_sq(self, a: Array, b: Array, c: Array) -> tuple[Array, Array]:
        """``(y, ||y - c||^2)`` with ``y = a + b``: original RBP's ``J^T z + g`` and its step."""
        y = a + b
        return y, sqnorm(self.xp, y - c)

    def sub_sq(self, a: Array, b: Array) -> tuple[Array, Array]:
        """``(d, ||d||^2)`` with ``d = a - b``: CG's ``p - J^T p`` and ``r - J r``."""
        d = a - b
        return d, sqnorm(self.xp, d)

    def cg_update(
        self, z: Array, p: Array, r: Array, q: Array, gamma: Array, delta: Array
    ) -> tuple[Array, Array, Array]:
        """``(z + alpha p, r - alpha q, ||r - alpha q||^2)`` with ``alpha = gamma / delta``.

        ``delta = 0`` (a breakdown) or a non-finite ``delta`` makes ``alpha`` NaN, so
        the new residual and its norm are NaN; the caller tells the two apart.
        """
        d = float(delta)
        alpha = float(gamma) / d if d != 0.0 and math.isfinite(d) else math.nan
        r_new = r - alpha * q
        return z + alpha * p, r_new, sqnorm(self.xp, r_new)

    def xpby(self, s: Array, p: Array, gamma_new: Array, gamma: Array) -> Array:
        """``s + (gamma_new / gamma) p``: CG's next search direction.

        The ratio of two 0-d arrays is cast to ``s``'s dtype: half-precision sums of squares come
        in float32 (:func:`~rbp_core._arrays.sqnorm`), which would otherwise promote the direction.
        """
        beta = gamma_new / gamma
        if hasattr(beta, "dtype") and beta.dtype != s.dtype:
            beta = self.xp.astype(beta, s.dtype)
        return s + beta * p

    def step_sqs(self, new: Array, old: Array) -> tuple[float, float]:
        """``(||new - old||^2, ||new||^2)`` as host floats: the fixed-point iteration's two norms."""
        return float(sqnorm(self.xp, new - old)), float(sqnorm(self.xp, new))


def norm_from_sq(xp: Any, sq: Array | float, x: Array, minus: Array | None = None) -> float:
    """The 2-norm of ``x`` (of ``x - minus`` if given) as a host float, from its sum of squares ``sq``.

    The arrays are used only when ``sq`` is 0, infinite or NaN: :func:`slow_norm` then
    decides, with scaling, between a true zero, an underflow, an overflow and a
    non-finite array (``x - minus`` is formed only then). This is :func:`norm`
    with the sum of squares already computed, by a fused kernel or alongside an update.
    """
    s = float(sq)
    if 0.0 < s < math.inf:
        return math.sqrt(s)
    return slow_norm(xp, x if minus is None else x - minus, s)


_CACHE: dict[int, VectorOps] = {}


def vector_ops(xp: Any) -> VectorOps:
    """The vector updates for namespace ``xp``: CuPy's fused kernels for CuPy, else the generic ones."""
    ops = _CACHE.get(id(xp))
    if ops is not None and ops.xp is xp:
        return ops
    ops = VectorOps(xp)
    if array_api_compat.is_cupy_namespace(xp):
        # CuPy is imported already (its arrays are here); the adapter holds the kernels.
        ops = importlib.import_module("rbp_core.backends.cupy").fused_vector_ops(xp)
    _CACHE[id(xp)] = ops
    return ops
