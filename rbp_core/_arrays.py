"""Array-API helpers: namespace resolution, norms and callback checks.

Everything here works on the core of the Array API standard only (no
``linalg`` extension), so array-api-strict with extensions disabled passes.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import sys
from collections.abc import Callable
from typing import Any

import array_api_compat

__all__ = [
    "Array",
    "CheckedCallback",
    "check_contraction",
    "check_int",
    "check_nonnegative",
    "namespace_of",
    "norm",
]

Array = Any
"""Any array of a library that follows the Array API standard."""


def namespace_of(x: Array, name: str) -> Any:
    """Return the Array-API namespace of ``x``; check it is a real floating array."""
    try:
        xp = array_api_compat.array_namespace(x)
    except TypeError as exc:
        msg = f"{name} must be an array of a library supported by array-api-compat, got {type(x).__name__}"
        raise TypeError(msg) from exc
    if not xp.isdtype(x.dtype, "real floating"):
        msg = f"{name} must have a real floating dtype, got {x.dtype}"
        raise TypeError(msg)
    return xp


_WIDE: dict[tuple[int, Any], bool] = {}


def _flat(xp: Any, x: Array) -> Array:
    """``x`` as a 1-d array whose squares can be summed: half precisions widened to float32.

    float16 squares leave its range below 2.4e-4 and above 256 (bfloat16 keeps float32's range
    but only 8 bits), so their sums of squares are taken in float32, whose range holds every
    square of a float16 value; the decision is cached per dtype, off the hot path's cost.
    """
    flat = x if x.ndim == 1 else xp.reshape(x, (-1,))
    key = (id(xp), flat.dtype)  # keyed by library too: dtypes of two libraries must never be compared
    wide = _WIDE.get(key)
    if wide is None:
        wide = _WIDE[key] = xp.finfo(flat.dtype).bits < 32
    return xp.astype(flat, xp.float32) if wide else flat


def sqnorm(xp: Any, x: Array) -> Array:
    """Sum of squares over all elements, as a 0-d array (no device sync).

    The inner product ``flat @ flat`` of the flattened array (``__matmul__`` of
    two 1-d arrays is a 0-d array in the standard) reads ``x`` once, allocates
    no state-sized temporary as ``sum(x * x)`` does, and runs no Python wrapper
    code. This sits on every iteration's hot path, right after a VJP has evicted
    the caches, where each avoided layer is measurable (benchmarks/bench_core.py).
    Half-precision arrays are summed in float32 (:func:`_flat`).
    """
    flat = _flat(xp, x)
    return flat @ flat


def _quiet(xp: Any) -> contextlib.AbstractContextManager[Any]:
    """Silence NumPy's floating-point warnings while :func:`norm` handles overflow itself.

    NumPy is taken from ``sys.modules``: it is loaded already when its arrays (or
    array-api-strict's, which wrap NumPy's) are here.
    """
    if array_api_compat.is_numpy_namespace(xp) or array_api_compat.is_array_api_strict_namespace(xp):
        return sys.modules["numpy"].errstate(over="ignore", under="ignore", invalid="ignore")  # type: ignore[no-any-return]
    return contextlib.nullcontext()


def norm(xp: Any, x: Array) -> float:
    """2-norm over all elements of ``x`` as a Python float: the one device sync.

    The fast path squares and sums. When that overflows (finite entries whose
    norm exceeds the square root of the dtype's largest value, about 1e154 in
    float64 and 2e19 in float32) or underflows to zero for a non-zero array,
    the norm is recomputed with scaling, so a finite array never reports an
    infinite or zero norm. A non-finite array reports ``nan`` or ``inf``.

    For the one-off norms of a solve's start and end. NumPy's floating-point
    warnings are silenced for the sum of squares, whose overflow is handled
    here; the solvers' per-iteration norms come from :func:`~rbp_core._vector.norm_from_sq`
    instead, which spares the cost of ``numpy.errstate``.
    """
    flat = _flat(xp, x)
    with _quiet(xp):
        s = float(flat @ flat)
    if 0.0 < s < math.inf:
        return math.sqrt(s)
    return slow_norm(xp, x, s)


def slow_norm(xp: Any, x: Array, s: float) -> float:
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


def _scaled_norm(xp: Any, flat: Array) -> float:
    """The norm of a finite 1-d array whose plain sum of squares overflowed or underflowed.

    Narrower dtypes are widened to float64, whose range holds every square of a
    float32 (or float16) value. A float64 array is scaled by a power of two,
    which is exact, so that its largest entry lies in [0.5, 1). Scaling never
    divides by the array's (possibly subnormal) maximum: some backends divide by
    multiplying with the reciprocal, which overflows for a subnormal divisor (as
    PyTorch's CUDA kernels do).
    """
    if xp.finfo(flat.dtype).bits < 64:
        wide = xp.astype(flat, xp.float64)
        return math.sqrt(float(wide @ wide))
    scale = float(xp.max(xp.abs(flat)))
    if scale == 0.0:
        return 0.0
    e = math.frexp(scale)[1]  # scale = m 2^e with 0.5 <= m < 1
    # Two exact steps where 2^-e alone is not a normal float64 (and could be flushed to zero).
    y = flat
    if e < -900:
        y, shift = y * 2.0**600, e + 600
    elif e > 900:
        y, shift = y * 2.0**-600, e - 600
    else:
        shift = e
    y = y * 2.0**-shift  # = flat * 2^-e
    try:
        return math.ldexp(math.sqrt(float(y @ y)), e)
    except OverflowError:  # the norm itself exceeds the largest float64
        return math.inf


class CheckedCallback:
    """Wrap a user callback so that a bad output fails loudly, naming the callback.

    The output must be an array of the same library, shape and dtype as the
    reference array (and on the same device). The full namespace check runs on
    the first call and whenever the output's type changes; later calls compare
    type, shape and dtype attributes, which costs nanoseconds.
    """

    __slots__ = ("_device", "_dtype", "_fn", "_name", "_ok_type", "_shape", "_verb", "_xp", "calls")

    def __init__(self, fn: object, name: str, like: Array, xp: Any, *, verb: str = "returned") -> None:
        if not callable(fn):
            msg = f"{name} must be callable, got {type(fn).__name__}"
            raise TypeError(msg)
        self._fn: Callable[[Array], Array] = fn
        self._name = name
        self._verb = verb
        self._xp = xp
        self._shape = tuple(like.shape)
        self._dtype = like.dtype
        self._device = array_api_compat.device(like)
        self._ok_type: Any = None  # Any, not "type | None": no narrowing of out in __call__
        self.calls = 0

    def __call__(self, v: Array) -> Array:
        self.calls += 1
        out = self._fn(v)
        # One combined test on the hot path; the details only when something is off.
        if type(out) is not self._ok_type or out.shape != self._shape or out.dtype != self._dtype:
            self._check(out)
        return out

    def _check(self, out: Array) -> None:
        if type(out) is not self._ok_type:
            self._check_library(out)
        if out.shape != self._shape:
            msg = (
                f"{self._name} {self._verb} an array of shape {tuple(out.shape)}; "
                f"expected shape {self._shape} (the shape of the state)"
            )
            raise ValueError(msg)
        if out.dtype != self._dtype:
            msg = f"{self._name} {self._verb} dtype {out.dtype}; expected {self._dtype} (the dtype of the state)"
            raise TypeError(msg)

    def _check_library(self, out: Array) -> None:
        try:
            xp = array_api_compat.array_namespace(out)
        except TypeError:
            xp = None
        if xp is not self._xp:
            got = type(out).__module__ + "." + type(out).__name__
            msg = (
                f"{self._name} {self._verb} a {got}; expected an array of the same library as the "
                f"state ({self._xp.__name__}), with shape {self._shape}"
            )
            raise TypeError(msg)
        device = array_api_compat.device(out)
        if device != self._device:
            msg = f"{self._name} {self._verb} an array on device {device}; expected {self._device}"
            raise ValueError(msg)
        self._ok_type = type(out)


def check_int(value: object, name: str, minimum: int) -> int:
    """Validate an integer option (bools are refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        msg = f"{name} must be an integer, got {value!r}"
        raise TypeError(msg)
    if value < minimum:
        msg = f"{name} must be >= {minimum}, got {value!r}"
        raise ValueError(msg)
    return int(value)


def check_nonnegative(value: object, name: str) -> float:
    """Validate a finite, non-negative real option such as a tolerance."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        msg = f"{name} must be a real number, got {value!r}"
        raise TypeError(msg)
    v = float(value)
    if not (math.isfinite(v) and v >= 0.0):
        msg = f"{name} must be finite and >= 0, got {value!r}"
        raise ValueError(msg)
    return v


def check_contraction(value: object) -> float | None:
    """Validate a contraction bound: None, or a real number in [0, 1)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        msg = f"contraction must be None or a real number in [0, 1), got {value!r}"
        raise TypeError(msg)
    v = float(value)
    if not 0.0 <= v < 1.0:
        msg = f"contraction must lie in [0, 1) (a bound on ||J||_2 below 1), got {value!r}"
        raise ValueError(msg)
    return v


def same_kind(xp: Any, x: Array, like: Array, name: str) -> None:
    """Check that ``x`` (e.g. a warm start) matches ``like`` in library, shape, dtype and device."""
    CheckedCallback(lambda v: v, name, like, xp, verb="is")(x)


def eps(xp: Any, dtype: Any) -> float:
    """Machine epsilon of a real floating dtype."""
    return float(xp.finfo(dtype).eps)


def sum_eps(xp: Any, dtype: Any) -> float:
    """Machine epsilon of the precision that sums of squares of ``dtype`` accumulate in (float32 for halves)."""
    return eps(xp, xp.float32 if xp.finfo(dtype).bits < 32 else dtype)


def size(x: Array) -> int:
    """Number of elements (``x.size`` may be None in the standard, for lazy arrays)."""
    return math.prod(x.shape)


def scale_pow2(xp: Any, x: Array, e: int) -> Array:
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


def unit_scale(xp: Any, g: Array, gnorm: float) -> tuple[int, Array, float]:
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


def _top_exponent(xp: Any, dtype: Any) -> int:
    """The exponent of the dtype's largest power of two (15 for float16, 127 for float32, 1023 for float64)."""
    return math.frexp(float(xp.finfo(dtype).max))[1] - 1
