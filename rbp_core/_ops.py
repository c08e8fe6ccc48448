"""Vector operations named by their mathematics, and the registry through which adapters speed them up.

A solver's ``step`` does its element-wise work and its reductions through a
:class:`VectorOps`, never by converting an array to a Python number: squared
norms and inner products come back as 0-d arrays on the arrays' device, and
only the driver brings them to the host, once per iteration (:meth:`VectorOps.to_host`).

:class:`VectorOps` writes each operation on the core Array API. An adapter that
can do better for its library (one fused pass over memory for an update and its
norm) registers a subclass with :func:`register_ops` when it is imported; the
core never imports an adapter. A registered class decides per call whether it
can handle the arrays (dtype, memory layout) and otherwise falls back to the
generic code, so solvers never need to know.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TypeVar

import array_api_compat

from ._norms import norm_from_sq, summable
from ._typing import Array, Namespace

__all__ = ["VectorOps", "ops_for", "register_ops"]

T = TypeVar("T")


class VectorOps:
    """The generic operations on the core Array API: no in-place writes, any library.

    ``alpha`` may be a Python float or a 0-d array (a ratio of squared norms, still on the
    device); a 0-d array of another dtype (half-precision sums of squares come in float32) is
    cast to the vector's dtype, so that no update promotes the state.
    """

    def __init__(self, xp: Namespace) -> None:
        self.xp = xp
        # Libraries whose arrays live in host memory: a 0-d array converts to a float with no
        # transfer, and their scalar arithmetic warns on division by zero, so ratios are taken here.
        self.on_host = array_api_compat.is_numpy_namespace(xp) or array_api_compat.is_array_api_strict_namespace(xp)
        # Libraries whose arrays cannot be written: a solver's own buffers are updated into new arrays.
        self.immutable = array_api_compat.is_jax_namespace(xp)

    def sqnorm(self, x: Array) -> Array:
        r""":math:`\|x\|^2` over all elements, a 0-d array (half precisions summed in float32)."""
        flat = summable(self.xp, x)
        return flat @ flat

    def dot(self, x: Array, y: Array) -> Array:
        """``<x, y>`` over all elements, a 0-d array (half precisions summed in float32, as :meth:`sqnorm`)."""
        return summable(self.xp, x) @ summable(self.xp, y)

    def _scalar(self, alpha: Array | float, x: Array) -> Array | float:
        if isinstance(alpha, float) or alpha.dtype == x.dtype:
            return alpha
        return self.xp.astype(alpha, x.dtype)

    def axpy(self, alpha: Array | float, x: Array, y: Array) -> Array:
        """``y + alpha x``."""
        if isinstance(alpha, float) and alpha in (1.0, -1.0):
            return y + x if alpha == 1.0 else y - x
        return y + self._scalar(alpha, x) * x

    def axpy_sqnorm(self, alpha: Array | float, x: Array, y: Array) -> tuple[Array, Array]:
        r""":math:`(w, \|w\|^2)` with :math:`w = y + \alpha x`."""
        w = self.axpy(alpha, x, y)
        return w, self.sqnorm(w)

    def add_sqnorm(self, x: Array, y: Array) -> tuple[Array, Array]:
        r""":math:`(y + x, \|x\|^2)`: an accumulation and the size of what was added."""
        return y + x, self.sqnorm(x)

    def add_sqdist(self, x: Array, y: Array, c: Array) -> tuple[Array, Array]:
        r""":math:`(w, \|w - c\|^2)` with :math:`w = x + y`: a new iterate and its squared distance from the old."""
        w = x + y
        return w, self.sqnorm(w - c)

    def step_sqnorms(self, new: Array, old: Array) -> Sequence[Array]:
        r""":math:`(\|h_\mathrm{new} - h_\mathrm{old}\|^2, \|h_\mathrm{new}\|^2)`: the size of a step and of where it arrived."""
        return self.sqnorm(new - old), self.sqnorm(new)

    def add_combination(self, x: Array, coefficients: Sequence[float], rows: Array) -> Array:
        """``x + sum_i c_i rows[i]`` for host ``coefficients`` (one per row of the 2-d ``rows``)."""
        c = self.xp.asarray(coefficients, dtype=rows.dtype, device=array_api_compat.device(rows))
        return x + c @ rows

    def put(self, buffer: Array, index: object, value: Array | float | bool) -> Array:
        """``buffer`` with ``buffer[index] = value``: written in place (``buffer`` is a solver's own
        array, never the caller's), or a new array where the library's arrays cannot be written (JAX).

        Solvers write their buffers through this method only, and keep what it returns.
        """
        if self.immutable:
            return buffer.at[index].set(value)
        buffer[index] = value
        return buffer

    def write_difference(self, buffer: Array, index: tuple[int, ...], a: Array, b: Array) -> Array:
        """``buffer`` with ``buffer[index] = a - b`` (``index`` a leading integer index), as :meth:`put`."""
        return self.put(buffer, (*index, ...), a - b)

    def cond(self, pred: object, then: Callable[[T], T], otherwise: Callable[[T], T], operand: T) -> T:
        """``then(operand)`` if ``pred`` else ``otherwise(operand)``: a branch of a solver's step.

        ``pred`` is a Python bool in the host drivers; a traced driver (the JAX adapter's, under
        ``jax.jit``) gives operations whose ``cond`` takes a traced one, and both branches must then
        return values of the same structure.
        """
        return then(operand) if pred else otherwise(operand)

    def exact_norm(self, s: float, x: Array, minus: Array | None = None) -> float:
        """The 2-norm of ``x`` (or ``x - minus``) from its sum of squares ``s``, rescaled where ``s`` is 0, inf or NaN."""
        return norm_from_sq(self.xp, s, x, minus)

    def ratio(self, a: Array, b: Array) -> Array | float:
        """``a / b`` of two 0-d arrays; NaN (never a warning) when ``b`` is 0 or not finite."""
        if self.on_host:
            num, den = float(a), float(b)
            return num / den if den != 0.0 and math.isfinite(den) else math.nan
        return a / b

    def ratio_or_zero(self, a: Array, b: Array) -> Array | float:
        """``a / b`` of two 0-d arrays, 0 where ``b`` is 0 (a step that a zero vector makes unnecessary)."""
        if self.on_host:
            num, den = float(a), float(b)
            return num / den if den != 0.0 else 0.0
        xp = self.xp
        nonzero = b != 0
        return xp.where(nonzero, a / xp.where(nonzero, b, xp.ones_like(b)), xp.zeros_like(a))

    def to_host(self, values: Sequence[Array] | Array) -> tuple[float, ...]:
        """``values`` (0-d arrays, or one 1-d array) as Python floats, in one device-to-host transfer."""
        stacked: Array
        if getattr(values, "ndim", None) == 1:
            stacked = values
        elif self.on_host or len(values) == 1:
            return tuple([float(v) for v in values])
        else:
            stacked = self.xp.stack(tuple(values))
        if self.on_host:
            return tuple([float(stacked[i]) for i in range(stacked.shape[0])])
        tolist = getattr(stacked, "tolist", None)  # torch and CuPy: one copy for all of them
        if tolist is not None:
            return tuple(tolist())
        return tuple([float(stacked[i]) for i in range(stacked.shape[0])])


_REGISTRY: list[tuple[Callable[[Namespace], bool], Callable[[Namespace], VectorOps]]] = []
_CACHE: dict[int, VectorOps] = {}


def register_ops(applies: Callable[[Namespace], bool], factory: Callable[[Namespace], VectorOps]) -> None:
    """Use ``factory(xp)`` for every namespace ``xp`` with ``applies(xp)``; the latest registration wins.

    For adapters, at import time: ``rbp_core.backends.cupy`` registers its fused kernels this way.
    """
    _REGISTRY.append((applies, factory))
    _CACHE.clear()


def ops_for(xp: Namespace) -> VectorOps:
    """The operations for namespace ``xp``: the latest registered ones that apply, else :class:`VectorOps`."""
    ops = _CACHE.get(id(xp))
    if ops is not None and ops.xp is xp:
        return ops
    ops = next((factory(xp) for applies, factory in reversed(_REGISTRY) if applies(xp)), None) or VectorOps(xp)
    _CACHE[id(xp)] = ops
    return ops
