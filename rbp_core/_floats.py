"""Facts about floating-point dtypes, and exact scalings by powers of two."""

from __future__ import annotations

import math

from ._typing import Array, Namespace

__all__ = ["eps", "scale_pow2", "size", "sum_eps", "unit_scale"]


def eps(xp: Namespace, dtype: object) -> float:
    """Machine epsilon of a real floating dtype."""
    return float(xp.finfo(dtype).eps)


def sum_eps(xp: Namespace, dtype: object) -> float:
    """Machine epsilon of the precision that sums of squares of ``dtype`` accumulate in (float32 for halves)."""
    return eps(xp, xp.float32 if xp.finfo(dtype).bits < 32 else dtype)


def size(x: Array) -> int:
    """Number of elements (``x.size`` may be None in the standard, for lazy arrays)."""
    return math.prod(x.shape)


def scale_pow2(xp: Namespace, x: Array, e: int) -> Array:
    """``x * 2^e``, exactly unless the result leaves the normal range; ``x`` itself when ``e == 0``.

    The factor is applied in steps that the dtype can represent (float16's largest power of two is
    2^15), each moving every element monotonically towards the result, so that no intermediate
    underflows or overflows where the result does not. A Python float factor keeps ``x``'s dtype.
    """
    if e == 0:
        return x
    top = _top_exponent(xp, x.dtype)
    while e != 0:
        step = max(-top, min(top, e))
        x = x * math.ldexp(1.0, step)
        e -= step
    return x


def unit_scale(xp: Namespace, g: Array, gnorm: float) -> tuple[int, Array, float]:
    """``(e, g / 2^e, ||g|| / 2^e)`` for a linear solve, with ``e = 0`` and ``g`` itself at ordinary scales.

    A solve of ``(I - J^T) z = g`` is linear in ``g``: when ``||g||`` lies beyond a quarter of the
    dtype's exponent range (about 1e77 and 1e-77 in float64, 2e9 and 5e-10 in float32), where its
    vectors' sums of squares, or CG's squared norms, come near overflow or underflow, it is solved
    for ``g / 2^e`` with ``||g / 2^e||`` in [0.5, 1), and the solution is scaled back by ``2^e``:
    exact scalings by powers of two. Non-finite and zero norms are left alone.
    """
    if not 0.0 < gnorm < math.inf:
        return 0, g, gnorm
    e = math.frexp(gnorm)[1]
    if abs(e) <= _top_exponent(xp, g.dtype) // 4:
        return 0, g, gnorm
    return e, scale_pow2(xp, g, -e), math.ldexp(gnorm, -e)


def _top_exponent(xp: Namespace, dtype: object) -> int:
    """The exponent of the dtype's largest power of two (15 for float16, 127 for float32, 1023 for float64)."""
    return math.frexp(float(xp.finfo(dtype).max))[1] - 1
