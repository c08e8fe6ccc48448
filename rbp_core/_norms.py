"""2-norms that never overflow or underflow for finite arrays, and the fast sums of squares.

Everything here works on the core of the Array API standard only (no ``linalg``
extension), so array-api-strict with extensions disabled passes.
"""

from __future__ import annotations

import contextlib
import math
import sys
from typing import Any

import array_api_compat

from ._floats import size
from ._typing import Array, Namespace

__all__ = ["norm", "norm_from_sq", "slow_norm", "summable", "widens"]

_WIDE: dict[tuple[int, Any], bool] = {}
_LAST: list[Any] = [None, None, False]  # the namespace and dtype last summed, and whether they widen


def summable(xp: Namespace, x: Array) -> Array:
    """``x`` as a 1-d array whose squares and products can be summed: half precisions widened to float32.

    The one rule for every sum of squares and inner product (:func:`norm`, and the vector
    operations' ``sqnorm`` and ``dot``): ``flat @ flat`` of the result is the sum of squares as a
    0-d array, read in one pass with no state-sized temporary.

    float16 squares leave its range below 2.4e-4 and above 256 (bfloat16 keeps float32's range
    but only 8 bits), so their sums of squares are taken in float32, whose range holds every
    square of a float16 value; the decision is cached per dtype, off the hot path's cost.
    """
    flat = x if x.ndim == 1 else xp.reshape(x, (-1,))
    last = _LAST
    dtype = flat.dtype
    if dtype is not last[1] or xp is not last[0]:  # the hot path: a solve keeps one library and dtype
        last[:] = [xp, dtype, widens(xp, dtype)]
    return xp.astype(flat, xp.float32) if last[2] else flat


def widens(xp: Namespace, dtype: Any) -> bool:
    """Whether sums of squares and products of ``dtype`` are taken in float32 (the half precisions)."""
    key = (id(xp), dtype)  # keyed by library too: dtypes of two libraries must never be compared
    wide = _WIDE.get(key)
    if wide is None:
        wide = _WIDE[key] = xp.finfo(dtype).bits < 32
    return wide


def _quiet(xp: Namespace) -> contextlib.AbstractContextManager[Any]:
    """Silence NumPy's floating-point warnings while :func:`norm` handles overflow itself.

    NumPy is taken from ``sys.modules``: it is loaded already when its arrays (or
    array-api-strict's, which wrap NumPy's) are here.
    """
    if array_api_compat.is_numpy_namespace(xp) or array_api_compat.is_array_api_strict_namespace(xp):
        return sys.modules["numpy"].errstate(over="ignore", under="ignore", invalid="ignore")  # type: ignore[no-any-return]
    return contextlib.nullcontext()


def norm(xp: Namespace, x: Array) -> float:
    """2-norm over all elements of ``x`` as a Python float: the one device sync.

    The fast path squares and sums. When that overflows (finite entries whose
    norm exceeds the square root of the dtype's largest value, about 1e154 in
    float64 and 2e19 in float32) or underflows to zero for a non-zero array,
    the norm is recomputed with scaling, so a finite array never reports an
    infinite or zero norm. A non-finite array reports ``nan`` or ``inf``.

    For the one-off norms of a solve's start and end. NumPy's floating-point
    warnings are silenced for the sum of squares, whose overflow is handled
    here; the solvers' per-iteration norms come from :func:`norm_from_sq`
    instead, which spares the cost of ``numpy.errstate``.
    """
    flat = summable(xp, x)
    with _quiet(xp):
        s = float(flat @ flat)
    if 0.0 < s < math.inf:
        return math.sqrt(s)
    return slow_norm(xp, x, s)


def norm_from_sq(xp: Namespace, s: float, x: Array, minus: Array | None = None) -> float:
    """The 2-norm of ``x`` (of ``x - minus`` if given) from its sum of squares ``s``, a host float.

    The arrays are used only when ``s`` is 0, infinite or NaN: :func:`slow_norm` then
    decides, with scaling, between a true zero, an underflow, an overflow and a
    non-finite array (``x - minus`` is formed only then).
    """
    if 0.0 < s < math.inf:
        return math.sqrt(s)
    return slow_norm(xp, x if minus is None else x - minus, s)


def slow_norm(xp: Namespace, x: Array, s: float) -> float:
    """The norm of ``x`` when its plain sum of squares ``s`` is 0, infinite or NaN.

    Decides between a true zero (an empty array included), an underflow, an overflow (both
    rescaled, see :func:`_scaled_norm`) and a non-finite array (``nan`` if ``s`` is NaN, else ``inf``).
    """
    if size(x) == 0:
        return 0.0
    with _quiet(xp):
        if not bool(xp.all(xp.isfinite(x))):
            return math.nan if math.isnan(s) else math.inf
        return _scaled_norm(xp, x if x.ndim == 1 else xp.reshape(x, (-1,)))


def _scaled_norm(xp: Namespace, flat: Array) -> float:
    """The norm of a finite 1-d array whose plain sum of squares overflowed or underflowed.

    Narrower dtypes are widened to the library's widest floating dtype, float64 (or float32 where
    a library has no float64 at hand, as JAX without ``jax_enable_x64``), whose range holds every
    square of a narrower value. An array already in that dtype is scaled by a power of two, which
    is exact, so that its largest entry lies in [0.5, 1). Scaling never divides by the array's
    (possibly subnormal) maximum: some backends divide by multiplying with the reciprocal, which
    overflows for a subnormal divisor (as PyTorch's CUDA kernels do).
    """
    wide = _widest(xp)
    if xp.finfo(flat.dtype).bits < xp.finfo(wide).bits:
        wide_flat = xp.astype(flat, wide)
        return math.sqrt(float(wide_flat @ wide_flat))
    scale = float(xp.max(xp.abs(flat)))
    if scale == 0.0:
        return 0.0
    e = math.frexp(scale)[1]  # scale = m 2^e with 0.5 <= m < 1
    # In two exact steps of at most half the exponent each: 2^-e alone may not be a normal number
    # of the dtype (and could be flushed to zero, or overflow).
    half = e // 2
    y = flat * 2.0**-half * 2.0 ** -(e - half)  # = flat * 2^-e
    try:
        return math.ldexp(math.sqrt(float(y @ y)), e)
    except OverflowError:  # the norm itself exceeds the largest float64
        return math.inf


def _widest(xp: Namespace) -> Any:
    """float64, or float32 for a library that has no float64 at hand (JAX without x64)."""
    info = getattr(xp, "__array_namespace_info__", None)
    if info is not None and "float64" not in info().dtypes(kind="real floating"):
        return xp.float32
    return xp.float64
