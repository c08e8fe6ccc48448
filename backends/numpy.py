"""NumPy adapter: VJP/JVP callbacks from matrices and operators, and the helper for simulators.

For NumPy simulators with hand-written derivatives and no autodiff:

- :func:`jacobian_callbacks` turns a Jacobian given as a dense array, a
  ``scipy.sparse`` matrix or a ``scipy.sparse.linalg.LinearOperator`` into the
  ``vjp`` and ``jvp`` callbacks the solvers take, for states of any shape;
- :func:`implicit_gradient` runs the forward solve, the backward method and the
  parameter VJP in one call (it is :func:`rbp_core.implicit_gradient` with
  NumPy input conversion);
- importing it registers NumPy's faster reductions for the solvers' norms.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import array_api_compat
import numpy as np
import numpy.typing as npt

import rbp_core
from rbp_core._norms import summable

from ._shared import Callbacks, make_callbacks
from ._shared import implicit_gradient as _implicit_gradient

__all__ = ["Callbacks", "as_state", "implicit_gradient", "jacobian_callbacks"]

NDArray = npt.NDArray[np.floating[Any]]


class _NumpyOps(rbp_core.VectorOps):
    """The core's operations for NumPy arrays, with ``ndarray.dot`` for the sums of squares.

    A 1-d ``x.dot(x)`` runs the same BLAS reduction as ``x @ x`` with about half of its call
    overhead (0.4 against 0.9 microseconds with the conversion to a float, n = 64), which is
    most of what a solver adds per iteration at small n (benchmarks/bench_core.py).
    """

    def sqnorm(self, x: NDArray) -> Any:
        flat = summable(self.xp, x)  # half precisions summed in float32, as the core does
        return flat.dot(flat)


rbp_core.register_ops(array_api_compat.is_numpy_namespace, _NumpyOps)


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
    r"""Build ``vjp`` and ``jvp`` from the Jacobian :math:`J = \partial F / \partial h` of the flattened state.

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
        ``vjp(v)`` :math:`= J^T v` and ``jvp(v)`` :math:`= J v`, each returning an array of
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
    >>> sol = rbp_core.solve_adjoint(cb.vjp, np.ones(2), rbp_core.CGRBP(rtol=1e-12), jvp=cb.jvp)
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
    return make_callbacks(J, shape, matvec, rmatvec, _run)


def _run(product: Callable[[Any], Any], v: NDArray, n: int, state_shape: tuple[int, ...]) -> NDArray:
    out = np.asarray(product(v.reshape(n)))
    return out.reshape(state_shape).astype(v.dtype, copy=False)


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
    **options: Any,
) -> rbp_core.ImplicitGradient:
    """:func:`rbp_core.implicit_gradient` for NumPy: ``h0`` and ``loss_grad`` may be array-likes.

    ``options`` are the keywords of :func:`rbp_core.implicit_gradient` (``vjp_state``,
    ``vjp_params``, ``method``, ``jvp_state``, ``solver``, ``contraction``, ``throw``); the worked
    example in the documentation differentiates a small nonlinear simulator with hand-written
    derivatives. An array-like ``loss_grad`` that is not a NumPy array (a list, a scalar) takes
    the state's dtype; a NumPy array, given or returned by a callable ``loss_grad``, must match
    ``h*`` in shape and dtype, and is refused otherwise with an error that names ``loss_grad``.

    Returns
    -------
    rbp_core.ImplicitGradient
        The fixed point, the gradient and both Solutions.

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
    return _implicit_gradient(f, h0, loss_grad, options, as_state=as_state, native=np.ndarray)
