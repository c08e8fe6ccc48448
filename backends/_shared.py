"""What the NumPy and CuPy adapters share: callbacks from a Jacobian, and implicit_gradient's input conversion."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

import rbp_core

__all__ = ["Callbacks", "implicit_gradient", "make_callbacks"]


class Callbacks(NamedTuple):
    """The pair of callbacks built from a Jacobian."""

    vjp: Callable[[Any], Any]
    r""":math:`v \mapsto J^T v`."""
    jvp: Callable[[Any], Any]
    r""":math:`v \mapsto J v`."""


Run = Callable[[Callable[[Any], Any], Any, int, tuple[int, ...]], Any]
"""``run(product, v, n, state_shape)``: apply ``product`` to the flattened ``v``, back in ``v``'s shape and dtype."""


def make_callbacks(
    J: Any,
    shape: tuple[int, ...] | None,
    matvec: Callable[[Any], Any],
    rmatvec: Callable[[Any], Any],
    run: Run,
    check: Callable[[Any, str], None] | None = None,
) -> Callbacks:
    """``vjp = rmatvec`` and ``jvp = matvec`` for states of ``shape`` (default ``(n,)``), after checking ``J``.

    ``J`` must be square and real; ``check(v, name)`` may refuse a vector before its shape is checked.
    """
    n, m = J.shape
    if n != m:
        msg = f"J must be square (the Jacobian of a map from the state to itself), got shape {J.shape}"
        raise ValueError(msg)
    if np.dtype(J.dtype).kind not in "fiu":
        msg = f"J must be real, got dtype {J.dtype}"
        raise TypeError(msg)
    state_shape = (n,) if shape is None else tuple(int(s) for s in shape)
    if math.prod(state_shape) != n:
        msg = f"shape {state_shape} has {math.prod(state_shape)} elements but J is {n} x {n}"
        raise ValueError(msg)

    def bind(product: Callable[[Any], Any], name: str) -> Callable[[Any], Any]:
        def apply(v: Any) -> Any:
            if check is not None:
                check(v, name)
            if v.shape != state_shape:
                msg = f"{name} got a vector of shape {v.shape}; the state shape is {state_shape}"
                raise ValueError(msg)
            return run(product, v, n, state_shape)

        apply.__name__ = name
        return apply

    return Callbacks(vjp=bind(rmatvec, "vjp"), jvp=bind(matvec, "jvp"))


def implicit_gradient(
    f: Callable[[Any], Any],
    h0: Any,
    loss_grad: Any,
    options: dict[str, Any],
    *,
    as_state: Callable[[Any, str], Any],
    native: type,
    context: Callable[[Any], contextlib.AbstractContextManager[Any]] = lambda _: contextlib.nullcontext(),
) -> rbp_core.ImplicitGradient:
    """:func:`rbp_core.implicit_gradient` with ``h0`` and ``loss_grad`` converted by ``as_state``.

    A ``loss_grad`` that is neither callable nor a ``native`` array (a list, a scalar, a host
    array for a device state) takes the state's dtype; a native one must match ``h*`` and is
    checked by the core.
    """
    h0_arr = as_state(h0, "h0")
    with context(h0_arr):
        g = loss_grad
        if not (callable(loss_grad) or isinstance(loss_grad, native)):
            g = as_state(loss_grad, "loss_grad").astype(h0_arr.dtype)
        return rbp_core.implicit_gradient(f, h0_arr, g, **options)
