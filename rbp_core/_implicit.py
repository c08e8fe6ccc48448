"""The framework-neutral entry points: the implicit backward pass, and forward plus backward."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from ._arrays import Array, namespace_of, same_kind
from ._methods import BackwardMethod, FixedPointIteration
from ._solution import Solution

__all__ = ["ImplicitGradient", "implicit_backward", "implicit_gradient"]


def check_instance(obj: object, name: str) -> None:
    """Refuse a class where an instance is wanted (``rbp_core.OriginalRBP`` for ``rbp_core.OriginalRBP()``).

    A method class has the protocol's attributes too, so the protocol check alone lets it through
    and it fails later, deep inside a backward pass.
    """
    if isinstance(obj, type):
        module = obj.__module__
        public = "rbp_core" if module.startswith("rbp_core._") else module
        msg = f"{name} must be an instance, not the class {obj.__name__}: pass {public}.{obj.__name__}() (with its settings)"
        raise TypeError(msg)


def check_method(method: object) -> BackwardMethod:
    """``method``, checked to be an instance of a backward method."""
    check_instance(method, "method")
    if not isinstance(method, BackwardMethod):
        msg = (
            "method must be a backward method such as rbp_core.Neumann(steps=20), "
            f"rbp_core.OriginalRBP() or rbp_core.CGRBP(), got {method!r}"
        )
        raise TypeError(msg)
    return method


def implicit_backward(
    vjp_state: Callable[[Array], Array],
    vjp_params: Callable[[Array], Any],
    g: Array,
    method: BackwardMethod,
    *,
    jvp_state: Callable[[Array], Array] | None = None,
    z0: Array | None = None,
    contraction: float | None = None,
    throw: bool = True,
) -> tuple[Any, Solution]:
    r"""The implicit backward pass that any framework's custom-gradient hook can call.

    Solves :math:`(I - J^T) z = g` with ``method`` and returns
    ``vjp_params(z)``, the cotangents of the parameters,
    :math:`z^T \partial F / \partial w`, with the backward Solution.

    Parameters
    ----------
    vjp_state : callable
        ``v -> J^T v`` with ``J = dF/dh`` at the fixed point.
    vjp_params : callable
        ``z -> (dF/dw)^T z``; may return anything (an array, a tuple of arrays,
        a dict): it is passed through.
    g : array
        ``dL/dh*``.
    method : BackwardMethod
        :class:`~rbp_core.Neumann`, :class:`~rbp_core.OriginalRBP`,
        :class:`~rbp_core.CGRBP`, or any object with the same protocol.
    jvp_state : callable, optional
        ``v -> J v``; required by methods with ``needs_jvp``.
    z0 : array, optional
        Warm start for methods with ``supports_warm_start``.
    contraction : float, optional
        A bound ``mu < 1`` on ``||J||_2``, for the error bound.
    throw : bool
        Raise :class:`~rbp_core.ConvergenceError` when the solve fails
        (default); otherwise return it, and the user must read the status.

    Returns
    -------
    tuple
        ``(vjp_params(z), solution)``.

    Examples
    --------
    >>> import numpy as np
    >>> import rbp_core
    >>> J = np.array([[0.5, 0.0], [0.1, 0.2]]); B = np.eye(2)  # dF/dw
    >>> grad, sol = rbp_core.implicit_backward(
    ...     lambda v: J.T @ v, lambda z: B.T @ z, np.ones(2), rbp_core.Neumann(steps=50)
    ... )
    >>> sol.num_vjp
    50
    """
    method = check_method(method)
    solution = method.solve(vjp_state, g, jvp=jvp_state, z0=z0, contraction=contraction, throw=throw)
    return vjp_params(solution.value), solution


@dataclass(frozen=True, eq=False)
class ImplicitGradient:
    """What :func:`implicit_gradient` returns.

    Attributes
    ----------
    value : array
        The fixed point ``h*``.
    gradient : object
        ``(dF/dw)^T z``, whatever ``vjp_params`` returns.
    forward : Solution
        The forward solve.
    backward : Solution
        The backward solve.
    """

    value: Array
    gradient: Any
    forward: Solution
    backward: Solution


def implicit_gradient(
    f: Callable[[Array], Array],
    h0: Array,
    loss_grad: Array | Callable[[Array], Array],
    *,
    vjp_state: Callable[[Array, Array], Array],
    vjp_params: Callable[[Array, Array], Any],
    method: BackwardMethod,
    jvp_state: Callable[[Array, Array], Array] | None = None,
    forward: FixedPointIteration | None = None,
    contraction: float | None = None,
    throw: bool = True,
) -> ImplicitGradient:
    r"""Fixed point, backward solve and parameter VJP in one call, from callbacks.

    For simulators with hand-written derivatives: finds ``h* = F(h*)`` from
    ``h0``, evaluates ``g = loss_grad(h*)``, solves :math:`(I - J^T) z = g`
    with ``method`` and returns :math:`(\partial F/\partial w)^T z`, the
    gradient of the loss with respect to the parameters ``w``.

    Parameters
    ----------
    f : callable
        ``h -> F(x, w, h)``.
    h0 : array
        Starting point of the forward iteration.
    loss_grad : array or callable
        ``dL/dh*``, or ``h* -> dL/dh*``: an array of the library, shape,
        dtype and device of ``h*`` (checked; nothing is broadcast or promoted).
    vjp_state : callable
        ``(h, v) -> (dF/dh at h)^T v``.
    vjp_params : callable
        ``(h, z) -> (dF/dw at h)^T z``; any return type.
    method : BackwardMethod
        The backward method.
    jvp_state : callable, optional
        ``(h, v) -> (dF/dh at h) v``, for methods with ``needs_jvp``.
    forward : FixedPointIteration, optional
        Settings of the forward solve (defaults of :func:`~rbp_core.fixed_point`).
    contraction : float, optional
        A Lipschitz bound ``mu < 1`` of ``F`` in ``h``; it bounds ``||J||_2``
        too, so it certifies both solves.
    throw : bool
        Raise :class:`~rbp_core.ConvergenceError` when either solve fails.

    Returns
    -------
    ImplicitGradient

    Examples
    --------
    >>> import numpy as np
    >>> import rbp_core
    >>> W = np.array([[0.3, -0.2], [0.1, 0.4]]); x = np.array([1.0, -1.0])
    >>> f = lambda h: np.tanh(W @ h + x)          # F(x, W, h)
    >>> def vjp_state(h, v):                      # (dF/dh)^T v
    ...     return W.T @ ((1 - f(h) ** 2) * v)
    >>> def vjp_params(h, z):                     # (dF/dW)^T z
    ...     return np.outer((1 - f(h) ** 2) * z, h)
    >>> res = rbp_core.implicit_gradient(
    ...     f, np.zeros(2), lambda h: h, vjp_state=vjp_state, vjp_params=vjp_params,
    ...     method=rbp_core.OriginalRBP(tol=1e-10),
    ... )
    >>> res.gradient.shape, res.backward.converged
    ((2, 2), True)
    """
    method = check_method(method)
    if method.needs_jvp and jvp_state is None:
        msg = f"{type(method).__name__} needs jvp_state, the callback (h, v) -> (dF/dh at h) v"
        raise ValueError(msg)
    forward = FixedPointIteration() if forward is None else forward
    check_instance(forward, "forward")
    if not isinstance(cast("object", forward), FixedPointIteration):
        msg = f"forward must be a rbp_core.FixedPointIteration, got {forward!r}"
        raise TypeError(msg)
    fwd = forward.solve(f, h0, contraction=contraction, throw=throw)
    h = fwd.value
    g = loss_grad(h) if callable(loss_grad) else loss_grad
    # Like h* in library, shape, dtype and device: a broadcastable or promotable g would give the
    # gradient of another problem (or an error that blames the state).
    same_kind(namespace_of(h, "h0"), g, h, "loss_grad(h*)" if callable(loss_grad) else "loss_grad")
    jvp = None if jvp_state is None else (lambda v: jvp_state(h, v))
    gradient, bwd = implicit_backward(
        lambda v: vjp_state(h, v),
        lambda z: vjp_params(h, z),
        g,
        method,
        jvp_state=jvp,
        contraction=contraction,
        throw=throw,
    )
    return ImplicitGradient(value=h, gradient=gradient, forward=fwd, backward=bwd)
