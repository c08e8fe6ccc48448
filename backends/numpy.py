"""NumPy adapter: VJP/JVP callbacks from matrices and operators, and the helper for simulators.

For NumPy simulators with hand-written derivatives and no autodiff:

- :func:`jacobian_callbacks` turns a Jacobian given as a dense array, a
  ``scipy.sparse`` matrix or a ``scipy.sparse.linalg.LinearOperator`` into the
  ``vjp`` and ``jvp`` callbacks the solvers take, for states of any shape;
- :func:`implicit_gradient` runs the forward solve, the backward method and the
  parameter VJP in one call (it is :func:`rbp_core.implicit_gradient` with
  NumPy input conversion).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

import rbp_core
from rbp_core import BackwardMethod, FixedPointIteration, ImplicitGradient

__all__ = ["Callbacks", "as_state", "implicit_gradient", "jacobian_callbacks"]

NDArray = npt.NDArray[np.floating[Any]]


class Callbacks(NamedTuple):
    """The pair of callbacks built from a Jacobian."""

    vjp: Callable[[NDArray], NDArray]
    """``v -> J^T v``."""
    jvp: Callable[[NDArray], NDArray]
    """``v -> J v``."""


def _is_linear_operator(J: object) -> bool:
    try:
        from scipy.sparse.linalg import LinearOperator  # noqa: PLC0415 - scipy is optional
    except ImportError:  # pragma: no cover - scipy is optional
        return False
    return isinstance(J, LinearOperator)


def _is_sparse(J: object) -> bool:
    try:
        from scipy.sparse import issparse  # noqa: PLC0415 - scipy is optional
    except ImportError:  # pragma: no cover - scipy is optional
        return False
    return bool(issparse(J))


def jacobian_callbacks(J: Any, shape: tuple[int, ...] | None = None) -> Callbacks:
    """Build ``vjp`` and ``jvp`` from the Jacobian ``J = dF/dh`` of the flattened state.

    Parameters
    ----------
    J : ndarray, scipy.sparse matrix or array, or scipy.sparse.linalg.LinearOperator
        Square, ``(n, n)``, real.
    shape : tuple of int, optional
        The state's shape (any shape with ``n`` elements, C order); default
        ``(n,)``.

    Returns
    -------
    Callbacks
        ``vjp(v) = J^T v`` and ``jvp(v) = J v``, each returning an array of
        ``v``'s shape and dtype (a float64 ``J`` applied to a float32 state
        gives float32).

    Examples
    --------
    >>> import numpy as np
    >>> import rbp_core
    >>> from rbp_core.backends.numpy import jacobian_callbacks
    >>> J = np.array([[0.5, 0.2], [0.0, 0.3]])
    >>> cb = jacobian_callbacks(J)
    >>> cb.vjp(np.array([1.0, 0.0])), cb.jvp(np.array([1.0, 0.0]))
    (array([0.5, 0.2]), array([0.5, 0. ]))
    >>> sol = rbp_core.cg_rbp(cb.vjp, cb.jvp, np.ones(2), tol=1e-12)
    """
    if _is_linear_operator(J):
        matvec, rmatvec = J.matvec, J.rmatvec
    elif _is_sparse(J) or isinstance(J, np.ndarray):
        if J.ndim != 2:
            msg = f"J must be a 2-d Jacobian, got an array of shape {J.shape}"
            raise ValueError(msg)
        JT = J.T
        matvec, rmatvec = J.__matmul__, JT.__matmul__
    else:
        msg = (
            "J must be a numpy.ndarray, a scipy.sparse matrix or array, or a "
            f"scipy.sparse.linalg.LinearOperator, got {type(J).__name__}"
        )
        raise TypeError(msg)
    n, m = J.shape
    if n != m:
        msg = f"J must be square (the Jacobian of a map from the state to itself), got shape {J.shape}"
        raise ValueError(msg)
    if not (np.issubdtype(J.dtype, np.floating) or np.issubdtype(J.dtype, np.integer)):
        msg = f"J must be real, got dtype {J.dtype}"
        raise TypeError(msg)
    state_shape = (n,) if shape is None else tuple(int(s) for s in shape)
    if math.prod(state_shape) != n:
        msg = f"shape {state_shape} has {math.prod(state_shape)} elements but J is {n} x {n}"
        raise ValueError(msg)

    def _apply(op: Callable[[Any], Any], name: str) -> Callable[[NDArray], NDArray]:
        def apply(v: NDArray) -> NDArray:
            if v.shape != state_shape:
                msg = f"{name} got a vector of shape {v.shape}; the state shape is {state_shape}"
                raise ValueError(msg)
            out = np.asarray(op(v.reshape(n)))
            return out.reshape(state_shape).astype(v.dtype, copy=False)

        apply.__name__ = name
        return apply

    return Callbacks(vjp=_apply(rmatvec, "vjp"), jvp=_apply(matvec, "jvp"))


def as_state(x: npt.ArrayLike, name: str = "state") -> NDArray:
    """Convert ``x`` to a floating NumPy array; integers and bools become float64.

    Examples
    --------
    >>> from rbp_core.backends.numpy import as_state
    >>> as_state([0, 1]).dtype
    dtype('float64')
    """
    a = np.asarray(x)
    if np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_:
        return a.astype(np.float64)
    if not np.issubdtype(a.dtype, np.floating):
        msg = f"{name} must be real, got dtype {a.dtype}"
        raise TypeError(msg)
    return a


def implicit_gradient(
    f: Callable[[NDArray], NDArray],
    h0: npt.ArrayLike,
    loss_grad: npt.ArrayLike | Callable[[NDArray], NDArray],
    *,
    vjp_state: Callable[[NDArray, NDArray], NDArray],
    vjp_params: Callable[[NDArray, NDArray], Any],
    method: BackwardMethod,
    jvp_state: Callable[[NDArray, NDArray], NDArray] | None = None,
    forward: FixedPointIteration | None = None,
    contraction: float | None = None,
    throw: bool = True,
) -> ImplicitGradient:
    """:func:`rbp_core.implicit_gradient` for NumPy: ``h0`` and ``loss_grad`` may be array-likes.

    See :func:`rbp_core.implicit_gradient` for the parameters; the worked
    example in the documentation differentiates a small nonlinear simulator
    with hand-written derivatives. An array-like ``loss_grad`` that is not a
    NumPy array (a list, a scalar) takes the state's dtype; a NumPy array, given
    or returned by a callable ``loss_grad``, must match ``h*`` in shape and
    dtype, and is refused otherwise with an error that names ``loss_grad``.

    Examples
    --------
    >>> import numpy as np
    >>> import rbp_core
    >>> from rbp_core.backends.numpy import implicit_gradient
    >>> a = 0.5                                   # F(h) = a * sin(h) + 1
    >>> res = implicit_gradient(
    ...     lambda h: a * np.sin(h) + 1, [0.0], [1.0],
    ...     vjp_state=lambda h, v: a * np.cos(h) * v,
    ...     vjp_params=lambda h, z: float(np.sum(np.sin(h) * z)),
    ...     method=rbp_core.Neumann(steps=40),
    ... )
    >>> h = res.value[0]; exact = np.sin(h) / (1 - a * np.cos(h))   # dh*/da
    >>> bool(abs(res.gradient - exact) < 1e-10)
    True
    """
    h0_arr = as_state(h0, "h0")
    g: NDArray | Callable[[NDArray], NDArray]
    if callable(loss_grad) or isinstance(loss_grad, np.ndarray):
        g = loss_grad
    else:  # a list or a scalar has no dtype of its own: it takes the state's
        g = as_state(loss_grad, "loss_grad").astype(h0_arr.dtype)
    return rbp_core.implicit_gradient(
        f,
        h0_arr,
        g,
        vjp_state=vjp_state,
        vjp_params=vjp_params,
        method=method,
        jvp_state=jvp_state,
        forward=forward,
        contraction=contraction,
        throw=throw,
    )
